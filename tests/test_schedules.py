"""stepfuse.schedules against diffusers 0.42.1: every scheduler, spacing and sigma option.

Each parity test instantiates the diffusers scheduler with a config, calls ``set_timesteps``
and compares ``scheduler.timesteps`` / ``scheduler.sigmas`` with what stepfuse computes for
the same config. diffusers stores float32, so values are compared with rtol 1e-6 and integer
timesteps exactly. The primitives are also checked one by one against the diffusers helpers
they mirror, and bad input must raise.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import diffusers
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as hf_rescale_zero_terminal_snr

from stepfuse import schedules as S

RTOL = 1e-6
STEPS = (1, 2, 7, 10, 25, 50, 999)
FEW_STEPS = (1, 2, 7, 25)
SPACINGS = ("linspace", "leading", "trailing")
SIGMA_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
BETAS = {
    "linear": {},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
}
VP_SCHEDULERS = (
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
)
SIGMA_SCHEDULERS = (
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def make(name: str, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, name)(**config)


def hf_set_timesteps(name: str, config: dict, n, **kwargs):
    sched = make(name, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n is None:
            sched.set_timesteps(**kwargs)
        else:
            sched.set_timesteps(n, **kwargs)
    return sched


def assert_timesteps_equal(ours: np.ndarray, theirs: torch.Tensor) -> None:
    theirs = theirs.detach().cpu().numpy()
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    if theirs.dtype == np.int64:
        assert ours.dtype == np.int64
        np.testing.assert_array_equal(ours, theirs)
    else:
        # atol: continuous (log-sigma) timesteps cross zero, where rtol alone means nothing.
        np.testing.assert_allclose(ours, theirs.astype(np.float64), rtol=RTOL, atol=1e-6)


def assert_sigmas_close(ours: np.ndarray, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    theirs = theirs.detach().cpu().numpy().astype(np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=0)


def check_parity(name: str, config: dict, n, **kwargs) -> None:
    """diffusers' set_timesteps(n, **kwargs) vs stepfuse's reproduction of it."""
    sched = hf_set_timesteps(name, config, n, **kwargs)
    ours = S.diffusers_set_timesteps(name, n, sched.config, **kwargs)
    assert_timesteps_equal(ours.timesteps, sched.timesteps)
    if ours.sigmas is None:
        assert not hasattr(sched, "sigmas")
    else:
        assert_sigmas_close(ours.sigmas, sched.sigmas)


# ----------------------------------------------------------------------------------------
# training schedules
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", sorted(BETAS))
@pytest.mark.parametrize("num_train_timesteps", [1000, 700])
def test_betas_alphas_cumprod_sigmas_match_diffusers(beta, num_train_timesteps):
    config = dict(BETAS[beta], num_train_timesteps=num_train_timesteps)
    sched = make("EulerDiscreteScheduler", **config)
    args = (
        config.get("beta_schedule", "linear"),
        num_train_timesteps,
        config.get("beta_start", 0.0001),
        config.get("beta_end", 0.02),
    )
    hf_betas = sched.betas.double().numpy()
    hf_acp = sched.alphas_cumprod.double().numpy()
    hf_sig = sched.sigmas[:-1].flip(0).double().numpy()

    # float32 mode reproduces diffusers' storage exactly.
    betas32 = S.betas_for_schedule(*args, precision="float32")
    acp32 = S.alphas_cumprod_from_betas(betas32, precision="float32")
    np.testing.assert_array_equal(betas32, hf_betas)
    np.testing.assert_array_equal(acp32, hf_acp)
    np.testing.assert_allclose(S.vp_sigmas(acp32, precision="float32"), hf_sig, rtol=RTOL, atol=0)

    # float64 mode is the exact math: close to diffusers up to its float32 rounding.
    betas = S.betas_for_schedule(*args)
    acp = S.alphas_cumprod_from_betas(betas)
    assert betas.dtype == acp.dtype == np.float64
    np.testing.assert_allclose(betas, hf_betas, rtol=3e-7)
    np.testing.assert_allclose(acp, hf_acp, rtol=3e-5)
    np.testing.assert_allclose(S.vp_sigmas(acp), np.sqrt((1 - acp) / acp), rtol=1e-15)
    np.testing.assert_allclose(S.vp_sigmas(acp), hf_sig, rtol=5e-4)


def test_exp_beta_schedule_matches_heun():
    sched = make("HeunDiscreteScheduler", beta_schedule="exp")
    np.testing.assert_array_equal(
        S.betas_for_schedule("exp", 1000, precision="float32"), sched.betas.double().numpy()
    )
    check_parity("HeunDiscreteScheduler", {"beta_schedule": "exp"}, 10)


def test_cosine_betas_are_capped():
    betas = S.betas_for_schedule("squaredcos_cap_v2", 1000)
    assert betas.max() == pytest.approx(0.999)
    assert (betas > 0).all()


@pytest.mark.parametrize("beta", sorted(BETAS))
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_rescale_zero_terminal_snr(beta, precision):
    config = BETAS[beta]
    betas = S.betas_for_schedule(
        config.get("beta_schedule", "linear"), 1000, config.get("beta_start", 1e-4), config.get("beta_end", 0.02),
        precision=precision,
    )
    ours = S.rescale_zero_terminal_snr(betas, precision=precision)
    hf = hf_rescale_zero_terminal_snr(torch.from_numpy(betas).float()).double().numpy()
    if precision == "float32":
        np.testing.assert_array_equal(ours, hf)
    else:
        np.testing.assert_allclose(ours[:-1], hf[:-1], rtol=2e-3, atol=1e-6)
    acp = S.alphas_cumprod_from_betas(ours)
    assert ours[-1] == 1.0 and acp[-1] == 0.0
    # Alg. 1 keeps the first sqrt(alpha_bar) unchanged.
    assert math.sqrt(acp[0]) == pytest.approx(math.sqrt(S.alphas_cumprod_from_betas(betas)[0]), rel=1e-6)
    floored = S.alphas_cumprod_from_betas(ours, final_alpha_cumprod=S.ZERO_SNR_ALPHA_CUMPROD)
    assert floored[-1] == 2.0**-24
    assert np.isfinite(S.vp_sigmas(floored)).all()


@pytest.mark.parametrize("name", VP_SCHEDULERS)
@pytest.mark.parametrize("n", (1, 7, 50))
def test_trained_betas(name, n):
    betas = (np.linspace(1e-4, 0.03, 1000) ** 1.1).tolist()
    check_parity(name, {"trained_betas": betas}, n)
    np.testing.assert_array_equal(
        S.betas_for_schedule("linear", None, trained_betas=betas, precision="float32"),
        make(name, trained_betas=betas).betas.double().numpy(),
    )


# ----------------------------------------------------------------------------------------
# spacings
# ----------------------------------------------------------------------------------------

SPACING_CASES = [
    ("ddim", "DDIMScheduler"),
    ("euler", "EulerDiscreteScheduler"),
    ("euler", "EulerAncestralDiscreteScheduler"),
    ("multistep", "DPMSolverMultistepScheduler"),
    ("multistep", "UniPCMultistepScheduler"),
]


@pytest.mark.parametrize("variant,name", SPACING_CASES)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_from_spacing(variant, name, spacing, n, steps_offset):
    config = dict(timestep_spacing=spacing, steps_offset=steps_offset)
    ours_fn = lambda: S.timesteps_from_spacing(n, 1000, spacing, steps_offset, variant)  # noqa: E731
    if variant == "multistep" and spacing == "leading" and steps_offset and n == 999:
        # diffusers returns timestep 1000 here, outside the trained range.
        assert hf_set_timesteps(name, config, n).timesteps.max() == 1000
        with pytest.raises(ValueError, match="steps_offset"):
            ours_fn()
        return
    ours = ours_fn()
    assert ours.dtype == (np.float64 if variant == "euler" else np.int64)
    assert_timesteps_equal(ours, hf_set_timesteps(name, config, n).timesteps)


@pytest.mark.parametrize("num_train_timesteps", [1000, 100])
@pytest.mark.parametrize("variant", S.SPACING_VARIANTS)
def test_trailing_spacing_drops_diffusers_negative_timestep(num_train_timesteps, variant):
    """Float arange gives diffusers an extra t = -1 for some n; stepfuse returns n steps."""
    name = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "multistep": "UniPCMultistepScheduler"}[variant]
    T = num_train_timesteps
    buggy = [n for n in range(1, T + 1) if len(np.arange(T, 0, -T / n)) != n]
    assert buggy, "expected diffusers' trailing spacing to overshoot for some n"
    for n in buggy[:3]:
        theirs = hf_set_timesteps(name, dict(timestep_spacing="trailing", num_train_timesteps=T), n).timesteps
        assert theirs[-1].item() == -1 and len(theirs) == n + 1
        ours = S.timesteps_from_spacing(n, T, "trailing", variant=variant)
        assert len(ours) == n
        assert_timesteps_equal(ours, theirs[:-1])


@pytest.mark.parametrize("lambda_min_clipped", [-5.1, -3.0])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", (1, 7, 25, 200))
def test_lambda_min_clipped(lambda_min_clipped, spacing, n):
    config = dict(BETAS["cosine"], lambda_min_clipped=lambda_min_clipped, timestep_spacing=spacing)
    check_parity("DPMSolverMultistepScheduler", config, n)
    sched = make("DPMSolverMultistepScheduler", **config)
    idx = torch.searchsorted(torch.flip(sched.lambda_t, [0]), lambda_min_clipped)
    acp = sched.alphas_cumprod.double().numpy()
    last = S.last_timestep_for_lambda_min(acp, lambda_min_clipped, precision="float32")
    assert last == 1000 - idx.item() < 1000


# ----------------------------------------------------------------------------------------
# full set_timesteps parity, VP schedulers
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VP_SCHEDULERS)
@pytest.mark.parametrize("beta", sorted(BETAS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", STEPS)
def test_vp_schedulers_default_sigmas(name, beta, spacing, n):
    # An offset would push the multistep leading spacing past T - 1 at 999 steps (see test_errors).
    multistep_overflow = n == 999 and name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
    offset = 1 if spacing == "leading" and not multistep_overflow else 0
    check_parity(name, dict(BETAS[beta], timestep_spacing=spacing, steps_offset=offset), n)


# 999 steps once per scheduler and option (diffusers' per-sigma loops are slow there).
SIGMA_OPTION_CASES = [(beta, n) for beta in sorted(BETAS) for n in STEPS if n != 999 or beta == "scaled_linear"]


@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
@pytest.mark.parametrize("flag", SIGMA_FLAGS)
@pytest.mark.parametrize("beta,n", SIGMA_OPTION_CASES)
def test_karras_exponential_beta_sigmas(name, flag, beta, n):
    spacing = "trailing" if n in (7, 25) else "linspace"  # Euler/Heun take sigma_min from the spacing
    check_parity(name, dict(BETAS[beta], **{flag: True}, timestep_spacing=spacing), n)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("flag", SIGMA_FLAGS)
@pytest.mark.parametrize("n", FEW_STEPS)
def test_sigma_min_max_config(name, flag, n):
    check_parity(name, {flag: True, "sigma_min": 0.05, "sigma_max": 10.0}, n)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("flag", (None,) + SIGMA_FLAGS)
@pytest.mark.parametrize("n", FEW_STEPS)
def test_final_sigmas_type_sigma_min(name, flag, n):
    config = {"final_sigmas_type": "sigma_min", **({flag: True} if flag else {})}
    check_parity(name, config, n)


@pytest.mark.parametrize("beta", sorted(BETAS))
@pytest.mark.parametrize("n", STEPS)
def test_dpmsolver_lu_lambdas(beta, n):
    check_parity("DPMSolverMultistepScheduler", dict(BETAS[beta], use_lu_lambdas=True), n)


@pytest.mark.parametrize("n", STEPS)
def test_euler_log_linear_interpolation(n):
    check_parity("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, n)


@pytest.mark.parametrize("n", STEPS)
def test_euler_continuous_v_prediction_timesteps(n):
    check_parity("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, n)


@pytest.mark.parametrize("name", [s for s in VP_SCHEDULERS if s != "HeunDiscreteScheduler"])
@pytest.mark.parametrize("beta", sorted(BETAS))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", (1, 10, 50))
def test_rescale_betas_zero_snr(name, beta, spacing, n):
    check_parity(name, dict(BETAS[beta], rescale_betas_zero_snr=True, timestep_spacing=spacing), n)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("EulerDiscreteScheduler", {"sigmas": [14.6, 9.0, 3.0, 1.0, 0.3, 0.03, 0.0]}),
        ("EulerDiscreteScheduler", {"timesteps": [999, 800, 500, 201, 0]}),
        ("HeunDiscreteScheduler", {"timesteps": [999, 800, 500, 201, 0]}),
        ("DPMSolverMultistepScheduler", {"timesteps": [999, 800, 500, 201, 0]}),
    ],
)
def test_custom_timesteps_and_sigmas(name, kwargs):
    check_parity(name, {}, None, **kwargs)


# ----------------------------------------------------------------------------------------
# flow matching
# ----------------------------------------------------------------------------------------


FLOW_OPTIONS = {
    "plain": {},
    "invert": {"invert_sigmas": True},
    "terminal": {"shift_terminal": 0.02},
    **{flag.split("_")[1]: {flag: True} for flag in SIGMA_FLAGS},
}
# One step cannot be stretched to a terminal value (diffusers returns NaN; see test_errors).
FLOW_CASES = [(k, n) for k in FLOW_OPTIONS for n in STEPS if not (k == "terminal" and n == 1)]


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.7])
@pytest.mark.parametrize("option,n", FLOW_CASES)
def test_flow_match_euler_static_shift(shift, option, n):
    extra = FLOW_OPTIONS[option]
    check_parity("FlowMatchEulerDiscreteScheduler", dict(shift=shift, **extra), n)


@pytest.mark.parametrize("time_shift_type", S.TIME_SHIFT_TYPES)
@pytest.mark.parametrize("mu", [0.5, 1.15, 2.0])
@pytest.mark.parametrize(
    "extra", [{}, {"shift_terminal": 0.1}, {"use_karras_sigmas": True}], ids=["plain", "terminal", "karras"]
)
@pytest.mark.parametrize("n", (2, 7, 28, 50))
def test_flow_match_euler_dynamic_shift(time_shift_type, mu, extra, n):
    config = dict(use_dynamic_shifting=True, time_shift_type=time_shift_type, **extra)
    check_parity("FlowMatchEulerDiscreteScheduler", config, n, mu=mu)


@pytest.mark.parametrize(
    "n,kwargs",
    [
        (None, {"sigmas": np.linspace(1.0, 0.05, 9)}),
        (5, {"sigmas": np.linspace(1.0, 0.05, 5)}),
        (None, {"timesteps": np.linspace(1000, 50, 9)}),
        (None, {"timesteps": np.linspace(1000, 50, 9), "sigmas": np.linspace(1.0, 0.05, 9)}),
    ],
)
def test_flow_match_euler_custom(n, kwargs):
    check_parity("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, n, **kwargs)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("flow_shift", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("final", S.FINAL_SIGMAS_TYPES)
@pytest.mark.parametrize("n", STEPS)
def test_multistep_flow_sigmas(name, flow_shift, final, n):
    config = dict(use_flow_sigmas=True, flow_shift=flow_shift, final_sigmas_type=final)
    check_parity(name, config, n)


@pytest.mark.parametrize("n", STEPS)
def test_unipc_flow_karras(n):
    check_parity("UniPCMultistepScheduler", dict(use_flow_sigmas=True, use_karras_sigmas=True, flow_shift=3.0), n)


@pytest.mark.parametrize(
    "name,time_shift_type",
    [
        ("DPMSolverMultistepScheduler", "exponential"),
        ("UniPCMultistepScheduler", "exponential"),
        ("UniPCMultistepScheduler", "linear"),
    ],
)
@pytest.mark.parametrize("mu", [0.3, 1.15])
@pytest.mark.parametrize("n", (2, 10, 50))
def test_multistep_flow_dynamic_shift(name, time_shift_type, mu, n):
    config = dict(use_flow_sigmas=True, use_dynamic_shifting=True, time_shift_type=time_shift_type)
    check_parity(name, config, n, mu=mu)


@pytest.mark.parametrize("n", (2, 10, 50))
@pytest.mark.parametrize("kwargs", [{}, {"sigmas": np.linspace(1.0, 0.05, 9)}], ids=["steps", "custom"])
def test_unipc_flow_shift_terminal_and_custom(n, kwargs):
    config = dict(use_flow_sigmas=True, flow_shift=3.0, shift_terminal=0.1)
    check_parity("UniPCMultistepScheduler", config, None if kwargs else n, **kwargs)


# ----------------------------------------------------------------------------------------
# EDM
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize(
    "extra", [{}, {"final_sigmas_type": "sigma_min", "rho": 5.0, "sigma_min": 0.01, "sigma_max": 50.0}]
)
@pytest.mark.parametrize("n", STEPS)
def test_edm_euler(schedule, extra, n):
    check_parity("EDMEulerScheduler", dict(sigma_schedule=schedule, **extra), n)


def test_edm_custom_ramp():
    ramp = np.linspace(0, 1, 7) ** 1.3
    sched = hf_set_timesteps("EDMEulerScheduler", {}, None, sigmas=torch.from_numpy(ramp))
    ours = S.diffusers_set_timesteps("EDMEulerScheduler", None, sched.config, sigmas=ramp)
    assert_timesteps_equal(ours.timesteps, sched.timesteps)
    assert_sigmas_close(ours.sigmas, sched.sigmas)
    np.testing.assert_allclose(S.edm_sigmas(7, ramp=ramp)[[0, -1]], [80.0, 0.002], rtol=1e-12)


# ----------------------------------------------------------------------------------------
# primitives against the diffusers helpers they mirror
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("bounds", [(0.0292, 14.6146), (0.002, 80.0), (0.3, 0.31)])
def test_sigma_schedule_primitives(n, bounds):
    lo, hi = bounds
    sched = make("EulerDiscreteScheduler")
    dpm = make("DPMSolverMultistepScheduler")
    in_sigmas = np.array([hi, lo])
    np.testing.assert_allclose(S.karras_sigmas(n, lo, hi), sched._convert_to_karras(in_sigmas, n), rtol=1e-14)
    np.testing.assert_allclose(S.exponential_sigmas(n, lo, hi), sched._convert_to_exponential(in_sigmas, n), rtol=1e-14)
    np.testing.assert_allclose(S.beta_sigmas(n, lo, hi), sched._convert_to_beta(in_sigmas, n), rtol=1e-14)
    lu = np.exp(dpm._convert_to_lu(np.log(in_sigmas), n))
    np.testing.assert_allclose(S.uniform_lambda_sigmas(n, lo, hi), lu, rtol=1e-14)
    np.testing.assert_allclose(S.uniform_lambda_sigmas(n, lo, hi), S.exponential_sigmas(n, lo, hi), rtol=1e-12)
    for sig in (S.karras_sigmas(n, lo, hi), S.exponential_sigmas(n, lo, hi), S.beta_sigmas(n, lo, hi)):
        assert sig[0] == pytest.approx(hi, rel=1e-12)
        if n > 1:
            assert sig[-1] == pytest.approx(lo, rel=1e-12)
            assert (np.diff(sig) < 0).all()


@pytest.mark.parametrize("table_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("beta", sorted(BETAS))
def test_sigma_to_t_matches_per_element_loop(table_dtype, beta):
    sched = make("EulerDiscreteScheduler", **BETAS[beta])
    train = np.array(((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).astype(table_dtype)
    log_sigmas = np.log(train)
    rng = np.random.default_rng(0)
    probes = np.concatenate(
        [
            np.exp(rng.uniform(np.log(train[0]) - 1, np.log(train[-1]) + 1, 200)),  # includes out of range
            train.astype(np.float64)[[0, 1, 500, -2, -1]],  # exactly on the grid
            [0.0, 1e-12, 1e3],
        ]
    )
    theirs = np.array([sched._sigma_to_t(s, log_sigmas) for s in probes])
    ours = S.sigma_to_t(probes, log_sigmas)
    np.testing.assert_array_equal(ours, theirs)
    assert S.sigma_to_t(probes.reshape(2, -1), log_sigmas).shape == (2, probes.size // 2)
    assert S.sigma_to_t(train[0], log_sigmas).shape == ()


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_sigma_to_alpha_sigma_t(kind):
    sigmas = np.array([0.0, 0.02, 0.5, 0.999]) if kind == "flow" else np.array([0.0, 0.03, 1.0, 14.6, 80.0])
    sched = make("DPMSolverMultistepScheduler", use_flow_sigmas=(kind == "flow"))
    hf_alpha, hf_sigma = sched._sigma_to_alpha_sigma_t(torch.from_numpy(sigmas))
    alpha_t, sigma_t = S.sigma_to_alpha_sigma_t(sigmas, kind)
    np.testing.assert_allclose(alpha_t, hf_alpha.numpy(), rtol=1e-15)
    np.testing.assert_allclose(sigma_t, hf_sigma.numpy(), rtol=1e-15)
    if kind == "vp":
        np.testing.assert_allclose(alpha_t**2 + sigma_t**2, 1.0, rtol=1e-14)
        np.testing.assert_allclose(sigma_t[1:] / alpha_t[1:], sigmas[1:], rtol=1e-14)


@pytest.mark.parametrize("kind", S.TIME_SHIFT_TYPES)
@pytest.mark.parametrize("mu", [0.3, 1.15, 2.5])
@pytest.mark.parametrize("sigma", [1.0, 0.8])
def test_time_shift_matches_diffusers(kind, mu, sigma):
    t = np.linspace(1.0, 1e-3, 50)
    sched = make("FlowMatchEulerDiscreteScheduler", use_dynamic_shifting=True, time_shift_type=kind)
    np.testing.assert_allclose(S.time_shift(mu, sigma, t, kind), sched.time_shift(mu, sigma, t), rtol=1e-15)
    if kind == "exponential" and sigma == 1.0:
        np.testing.assert_allclose(S.time_shift(mu, 1.0, t), S.shift_sigmas(t, math.exp(mu)), rtol=1e-13)
    assert S.time_shift(mu, sigma, np.array([0.0]), kind)[0] == 0.0


@pytest.mark.parametrize("shift_terminal", [0.0, 0.02, 0.3])
def test_stretch_shift_to_terminal_matches_diffusers(shift_terminal):
    t = S.shift_sigmas(np.linspace(1.0, 0.01, 30), 3.0)
    sched = make("FlowMatchEulerDiscreteScheduler", shift_terminal=shift_terminal)
    ours = S.stretch_shift_to_terminal(t, shift_terminal)
    np.testing.assert_allclose(ours, sched.stretch_shift_to_terminal(t), rtol=1e-15)
    assert ours[-1] == pytest.approx(shift_terminal, abs=1e-15)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0])
def test_shift_sigmas_properties(shift):
    s = np.linspace(0, 1, 11)
    out = S.shift_sigmas(s, shift)
    assert out[0] == 0.0 and out[-1] == 1.0
    assert (np.diff(out) > 0).all()
    if shift == 1.0:
        np.testing.assert_array_equal(out, s)


def test_calculate_shift():
    # Values of diffusers.pipelines.flux.pipeline_flux.calculate_shift (not imported: it pulls in transformers).
    assert S.calculate_shift(256) == pytest.approx(0.5)
    assert S.calculate_shift(4096) == pytest.approx(1.15)
    assert S.calculate_shift(1024) == pytest.approx(0.63)
    assert S.calculate_shift(4096, 256, 4096, 0.5, 1.15) == pytest.approx(1.15)


@pytest.mark.parametrize("variant,n", [("dpmsolver", 10), ("unipc", 10), ("unipc", 1)])
def test_multistep_flow_sigmas_shape(variant, n):
    s = S.multistep_flow_sigmas(n, 1000, 3.0, variant=variant)
    assert s.shape == (n,)
    assert (s <= 1.0).all() and (s > 0).all()


def test_flow_sigmas_default_ends():
    s = S.flow_sigmas(10, 1000, shift=1.0)
    assert s[0] == 1.0 and s[-1] == pytest.approx(1e-3)
    np.testing.assert_allclose(np.diff(s), np.diff(s)[0], rtol=1e-9)


def test_append_final_sigma_and_heun_interleave():
    s = np.array([3.0, 2.0, 1.0])
    np.testing.assert_array_equal(S.append_final_sigma(s), [3.0, 2.0, 1.0, 0.0])
    np.testing.assert_array_equal(S.append_final_sigma(s, "sigma_min"), [3.0, 2.0, 1.0, 1.0])
    np.testing.assert_array_equal(S.append_final_sigma(s, "sigma_min", 0.5), [3.0, 2.0, 1.0, 0.5])
    t, s2 = S.heun_interleave(np.array([900.0, 500.0, 100.0]), S.append_final_sigma(s))
    np.testing.assert_array_equal(t, [900, 500, 500, 100, 100])
    np.testing.assert_array_equal(s2, [3, 2, 2, 1, 1, 0])


def test_edm_noise_conditioning():
    np.testing.assert_allclose(S.edm_noise_conditioning([1.0, math.e]), [0.0, 0.25])


# ----------------------------------------------------------------------------------------
# float64 mode: the exact math stays within diffusers' float32 rounding
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SIGMA_SCHEDULERS)
@pytest.mark.parametrize("flag", (None,) + SIGMA_FLAGS)
@pytest.mark.parametrize("beta", sorted(BETAS))
def test_float64_mode_close_to_diffusers(name, flag, beta):
    config = dict(BETAS[beta], **({flag: True} if flag else {}))
    sched = hf_set_timesteps(name, config, 25)
    ours = S.diffusers_set_timesteps(name, 25, sched.config, precision="float64")
    assert_sigmas_close(ours.sigmas, sched.sigmas, rtol=5e-4)
    theirs_t = sched.timesteps.numpy().astype(np.float64)
    # Integer timesteps may round the other way; fractional ones move by < 0.1 step.
    np.testing.assert_allclose(ours.timesteps, theirs_t, atol=1.0 if ours.timesteps.dtype == np.int64 else 0.1)


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------

SET = S.diffusers_set_timesteps
ERROR_CASES = [
    (lambda: S.betas_for_schedule("cosine", 1000), ValueError, "beta_schedule"),
    (lambda: S.betas_for_schedule("linear", 0), ValueError, "num_train_timesteps"),
    (lambda: S.betas_for_schedule("linear", 10.0), TypeError, "num_train_timesteps"),
    (lambda: S.betas_for_schedule("linear", 1000, beta_start=float("nan")), ValueError, "beta_start"),
    (lambda: S.betas_for_schedule("linear", 1000, beta_end=-0.1), ValueError, "beta_end"),
    (lambda: S.betas_for_schedule("linear", 1000, precision="float16"), ValueError, "precision"),
    (lambda: S.betas_for_schedule("linear", 10, trained_betas=[0.1] * 5), ValueError, "trained_betas"),
    (lambda: S.betas_for_schedule("linear", None, trained_betas=[0.1, float("inf")]), ValueError, "trained_betas"),
    (lambda: S.betas_for_schedule("linear", None, trained_betas=[[0.1, 0.2]]), ValueError, "trained_betas"),
    (lambda: S.rescale_zero_terminal_snr([0.1]), ValueError, "betas"),
    (lambda: S.vp_sigmas([0.5, 0.0]), ValueError, "alphas_cumprod"),
    (lambda: S.vp_sigmas([0.5, 1.5]), ValueError, "alphas_cumprod"),
    (lambda: S.alphas_cumprod_from_betas([0.1, 2.0]), ValueError, "betas"),
    (lambda: S.timesteps_from_spacing(1001, 1000, "leading"), ValueError, "num_inference_steps"),
    (lambda: S.timesteps_from_spacing(0, 1000, "leading"), ValueError, "num_inference_steps"),
    (lambda: S.timesteps_from_spacing(-3, 1000, "leading"), ValueError, "num_inference_steps"),
    (lambda: S.timesteps_from_spacing(10, 1000, "uniform"), ValueError, "spacing"),
    (lambda: S.timesteps_from_spacing(10, 1000, "leading", variant="pndm"), ValueError, "variant"),
    (lambda: S.timesteps_from_spacing(10, 1000, "leading", steps_offset=-1), ValueError, "steps_offset"),
    (lambda: S.timesteps_from_spacing(1000, 1000, "leading", steps_offset=1), ValueError, "steps_offset"),
    (lambda: S.timesteps_from_spacing(1000, 1000, "linspace", variant="multistep"), ValueError, "num_inference_steps"),
    (lambda: S.timesteps_from_spacing(10, 1000, "linspace", last_timestep=900), ValueError, "last_timestep"),
    (lambda: S.karras_sigmas(10, 1.0, 0.5), ValueError, "sigma_min"),
    (lambda: S.karras_sigmas(10, 0.1, float("inf")), ValueError, "sigma_max"),
    (lambda: S.karras_sigmas(10, 0.1, 10.0, rho=0.0), ValueError, "rho"),
    (lambda: S.exponential_sigmas(10, 0.0, 10.0), ValueError, "sigma_min"),
    (lambda: S.beta_sigmas(10, 0.1, 10.0, alpha=-1.0), ValueError, "alpha"),
    (lambda: S.edm_sigmas(10, schedule="cosine"), ValueError, "schedule"),
    (lambda: S.sigma_to_t([1.0], [0.0, 1.0, 0.5]), ValueError, "log_sigmas"),
    (lambda: S.sigma_to_t([float("nan")], [0.0, 1.0]), ValueError, "sigmas"),
    (lambda: S.sigma_to_alpha_sigma_t([0.5], "ve"), ValueError, "kind"),
    (lambda: S.sigma_to_alpha_sigma_t([1.5], "flow"), ValueError, "sigmas"),
    (lambda: S.shift_sigmas([0.5], 0.0), ValueError, "shift"),
    (lambda: S.shift_sigmas([1.5], 2.0), ValueError, "sigmas"),
    (lambda: S.time_shift(1.0, 1.0, [0.5], "cubic"), ValueError, "kind"),
    (lambda: S.time_shift(-1.0, 1.0, [0.5], "linear"), ValueError, "mu"),
    (lambda: S.time_shift(1.0, 1.0, [1.5]), ValueError, "t"),
    (lambda: S.stretch_shift_to_terminal([1.0], 0.1), ValueError, "sigmas"),
    (lambda: S.stretch_shift_to_terminal([0.9, 0.1], 1.0), ValueError, "shift_terminal"),
    (lambda: S.flow_sigmas(10, use_dynamic_shifting=True), ValueError, "mu"),
    (lambda: S.flow_sigmas(None, sigmas=[0.5, 0.9]), ValueError, "sigmas"),
    (lambda: S.flow_sigmas(None, sigmas=[0.9, 0.5, 0.5]), ValueError, "sigmas"),
    (lambda: S.flow_sigmas(3, sigmas=[0.9, 0.5]), ValueError, "num_inference_steps"),
    (lambda: S.flow_sigmas(10, sigma_schedule="cosine"), ValueError, "sigma_schedule"),
    (lambda: S.flow_sigmas(1, shift_terminal=0.1), ValueError, "shift_terminal"),
    (lambda: S.multistep_flow_sigmas(10, variant="dpmsolver", shift_terminal=0.1), ValueError, "shift_terminal"),
    (lambda: S.multistep_flow_sigmas(10, variant="deis"), ValueError, "variant"),
    (lambda: S.append_final_sigma([1.0], "one"), ValueError, "final_sigmas_type"),
    (lambda: S.heun_interleave([1.0, 2.0], [1.0, 0.0]), ValueError, "timesteps"),
    (lambda: S.calculate_shift(1024, 256, 256), ValueError, "max_seq_len"),
    (lambda: SET("PNDMScheduler", 10), ValueError, "scheduler"),
    (lambda: SET("EulerDiscreteScheduler", 10, {"use_karras_sigmas": True, "use_beta_sigmas": True}),
     ValueError, "use_karras_sigmas"),
    (lambda: SET("EulerDiscreteScheduler", 10, {"beta_schedule": "exp"}), ValueError, "beta_schedule"),
    (lambda: SET("EulerDiscreteScheduler", None, {"use_karras_sigmas": True}, timesteps=[999, 500]),
     ValueError, "timesteps"),
    (lambda: SET("EulerDiscreteScheduler", None, sigmas=[1.0, 2.0, 0.0]), ValueError, "sigmas"),
    (lambda: SET("UniPCMultistepScheduler", 10, {"shift_terminal": 0.1}), ValueError, "shift_terminal"),
    (lambda: SET("UniPCMultistepScheduler", None, sigmas=[0.9, 0.5]), ValueError, "sigmas"),
    (lambda: SET("FlowMatchEulerDiscreteScheduler", 10, {"use_dynamic_shifting": True}),
     ValueError, "mu"),
    (lambda: SET("DPMSolverMultistepScheduler", 10, mu=1.0), ValueError, "mu"),
    (lambda: SET("DDIMScheduler", 10, sigmas=[1.0, 0.0]), ValueError, "sigmas"),
    (lambda: SET("DDIMScheduler", 2000), ValueError, "num_inference_steps"),
]


@pytest.mark.parametrize("fn,exc,match", ERROR_CASES, ids=[f"case{i}" for i in range(len(ERROR_CASES))])
def test_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()
