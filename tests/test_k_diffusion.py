"""stepfuse.k_diffusion vs k-diffusion's sampling module: same trajectories, same calls, checked input."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
import types

import pytest
import torch

import stepfuse.integrations.k_diffusion as impl
from stepfuse import k_diffusion as sfk
from stepfuse.testing import GaussianMixture
from stepfuse.testing.parity import FP32_RTOL, relative_error
from stepfuse.testing.tolerances import EPS


def _load_reference():
    """k-diffusion's ``sampling`` module alone, or None when k-diffusion is not installed.

    ``import k_diffusion`` pulls in its training stack (CLIP, pkg_resources, ...), which may
    not import; the sampling module needs only ``utils``, so both are loaded as submodules
    of a private package object pointing at the installed folder.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    name = "_k_diffusion_reference"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = package
    try:
        return importlib.import_module(name + ".sampling")
    except ImportError:
        return None


K = _load_reference()
# torchsde warns when a Brownian tree is queried at float32-rounded ends of its interval, as
# k-diffusion's default SDE noise (and ours, which queries the same points) does.
pytestmark = pytest.mark.filterwarnings("ignore:Should have t:UserWarning")
needs_k = pytest.mark.skipif(K is None, reason="k-diffusion's sampling module is not importable")

SHAPE = (2, 3, 5)
GMM = GaussianMixture(torch.randn(3, *SHAPE[1:], generator=torch.Generator().manual_seed(1)), [0.3, 0.6, 0.2])


def model(x, sigma):
    return GMM.denoise(x, sigma)


def _x_T(sigma_max: float, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sigma_max).to(dtype)


def _seeded_noise_sampler(seed: int = 7):
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=generator)


def _sigmas(kind: str) -> torch.Tensor:
    if kind == "karras":
        return sfk.get_sigmas_karras(8, 0.03, 20.0)
    return sfk.get_sigmas_exponential(7, 0.05, 10.0)


GRID_CASES = [
    ("sample_euler", {}),
    ("sample_euler", {"s_churn": 2.0}),
    ("sample_euler", {"s_churn": 40.0, "s_noise": 1.003}),  # gamma capped at sqrt(2) - 1
    ("sample_heun", {}),
    ("sample_heun", {"s_churn": 3.0, "s_tmin": 0.1, "s_tmax": 5.0}),  # churn on some steps only
    ("sample_dpm_2", {}),
    ("sample_dpm_2", {"s_churn": 1.0}),
    ("sample_euler_ancestral", {}),
    ("sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}),
    ("sample_euler_ancestral", {"eta": 0.0}),
    ("sample_dpm_2_ancestral", {}),
    ("sample_dpm_2_ancestral", {"eta": 3.0}),  # sigma_up capped at sigma_next: Euler steps to 0
    ("sample_lms", {}),
    ("sample_lms", {"order": 2}),
    ("sample_dpmpp_2s_ancestral", {}),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("sample_dpmpp_sde", {}),
    ("sample_dpmpp_sde", {"eta": 0.5, "r": 0.3}),
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {}),
    ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("sample_dpmpp_2m_sde", {"eta": 0.5, "s_noise": 1.1}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}),
    ("sample_dpmpp_3m_sde", {}),
    ("sample_dpmpp_3m_sde", {"eta": 0.0}),
]


def _takes_noise_sampler(name: str) -> bool:
    return "noise_sampler" in inspect.signature(getattr(sfk, name)).parameters


def _run_both(name, args, kwargs, noise, x):
    """Final samples of k-diffusion and stepfuse from the same start, seed and noise."""
    results = []
    for module in (K, sfk):
        extra = dict(kwargs)
        if noise == "sampler":
            extra["noise_sampler"] = _seeded_noise_sampler()
        torch.manual_seed(5)  # the default noise: torch.randn_like or a Brownian tree seeded from it
        results.append(getattr(module, name)(model, x.clone(), *args, disable=True, **extra))
    return results


# Each case with k-diffusion's default noise, and with a seeded noise_sampler where the sampler takes one.
NOISE_CASES = [(n, k, noise) for n, k in GRID_CASES for noise in ("default", "sampler")
               if noise == "default" or _takes_noise_sampler(n)]


@needs_k
@pytest.mark.parametrize("schedule", ["karras", "exponential"])
@pytest.mark.parametrize("name,kwargs,noise", NOISE_CASES, ids=[f"{n}-{k}-{z}" for n, k, z in NOISE_CASES])
def test_grid_sampler_parity(name, kwargs, noise, schedule):
    sigmas = _sigmas(schedule)
    ref, got = _run_both(name, (sigmas,), kwargs, noise, _x_T(float(sigmas[0])))
    assert got.shape == ref.shape and got.dtype == ref.dtype
    err = relative_error(got, ref)
    assert err <= FP32_RTOL, f"relative error {err:.2e} vs k-diffusion"


@needs_k
@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_dpmpp_2m_sde"])
def test_batch_one_non_contiguous(name):
    x = (torch.randn(1, SHAPE[1], 2 * SHAPE[2], generator=torch.Generator().manual_seed(2)) * 20.0)[..., ::2]
    assert not x.is_contiguous() and x.shape == (1, *SHAPE[1:])
    ref, got = _run_both(name, (_sigmas("karras"),), {}, "default", x)
    assert relative_error(got, ref) <= FP32_RTOL


@needs_k
@pytest.mark.parametrize("noise", ["default", "sampler"])
@pytest.mark.parametrize("kwargs", [{"n": 10}, {"n": 9}, {"n": 7, "eta": 0.5}, {"n": 2}])
def test_dpm_fast_parity(kwargs, noise):
    kwargs = dict(kwargs)
    args = (0.03, 20.0, kwargs.pop("n"))
    ref, got = _run_both("sample_dpm_fast", args, kwargs, noise, _x_T(20.0))
    assert relative_error(got, ref) <= FP32_RTOL


@needs_k
@pytest.mark.parametrize("kwargs", [{}, {"order": 2}, {"eta": 0.5}, {"order": 2, "rtol": 0.01, "atol": 0.001}])
def test_dpm_adaptive_parity(kwargs):
    """Same accepted/rejected steps; the step sizes follow an error estimate that sits near fp32
    rounding on easy steps, so the trajectories agree to the controller's noise, far inside rtol."""
    (ref, ref_info), (got, got_info) = _run_both("sample_dpm_adaptive", (0.03, 20.0), dict(kwargs, return_info=True),
                                                 "default", _x_T(20.0))
    assert got_info == ref_info
    assert relative_error(got, ref) <= 1e-3


@needs_k
@pytest.mark.parametrize("name", sorted({n for n, _ in GRID_CASES}))
def test_callbacks_match(name):
    sigmas = _sigmas("karras")
    calls = {}
    for module in (K, sfk):
        log = calls[module] = []
        torch.manual_seed(0)
        getattr(module, name)(model, _x_T(20.0), sigmas, disable=True, callback=log.append)
    ref, got = calls[K], calls[sfk]
    assert len(got) == len(ref) == len(sigmas) - 1
    for r, g in zip(ref, got):
        assert set(g) == set(r) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert g["i"] == r["i"] and torch.equal(g["sigma"], r["sigma"])
        assert torch.allclose(g["sigma_hat"], r["sigma_hat"]) and relative_error(g["x"], r["x"]) <= FP32_RTOL


@needs_k
@pytest.mark.parametrize("name,args", [("sample_dpm_fast", (0.03, 20.0, 8)), ("sample_dpm_adaptive", (0.03, 20.0))])
def test_dpm_callbacks_match(name, args):
    calls = {}
    for module in (K, sfk):
        log = calls[module] = []
        getattr(module, name)(model, _x_T(20.0), *args, disable=True, callback=log.append)
    assert len(calls[sfk]) == len(calls[K]) > 0
    assert [set(c) for c in calls[sfk]] == [set(c) for c in calls[K]]


@needs_k
@pytest.mark.parametrize("seed", [3, [3, 4]])
def test_brownian_noise_sampler_matches(seed):
    x = _x_T(1.0)
    ref = K.BrownianTreeNoiseSampler(x, 0.03, 20.0, seed=seed)
    got = sfk.BrownianTreeNoiseSampler(x, 0.03, 20.0, seed=seed)
    for a, b in [(20.0, 5.0), (5.0, 0.5), (0.5, 0.03), (0.5, 5.0)]:
        assert relative_error(got(a, b), ref(torch.tensor(a), torch.tensor(b))) <= FP32_RTOL


@needs_k
@pytest.mark.parametrize("name,args", [
    ("get_sigmas_karras", (10, 0.0292, 14.6)),
    ("get_sigmas_karras", (1, 0.1, 10.0, 3.0)),
    ("get_sigmas_karras", (6, 0.0, 80.0)),
    ("get_sigmas_exponential", (10, 0.0292, 14.6)),
    ("get_sigmas_polyexponential", (10, 0.0292, 14.6)),
    ("get_sigmas_polyexponential", (7, 0.002, 80.0, 2.5)),
    ("get_sigmas_vp", (10,)),
    ("get_sigmas_vp", (5, 10.0, 0.2, 0.01)),
])
@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_sigma_schedules_match(name, args, default_dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        ref, got = getattr(K, name)(*args), getattr(sfk, name)(*args)
    finally:
        torch.set_default_dtype(previous)
    assert got.dtype == ref.dtype == default_dtype and got.shape == ref.shape and got[-1] == 0
    # stepfuse computes in float64 whatever the default dtype; k-diffusion in the default dtype,
    # where the Karras ramp cancels near sigma_min = 0 and `exp(...) - 1` of the VP schedule
    # loses digits at its low-noise end.
    rtol = 1e-12 if default_dtype == torch.float64 else (2e-3 if name == "get_sigmas_vp" else 1e-5)
    assert torch.allclose(got.double(), ref.double(), rtol=rtol, atol=0.0)


@needs_k
def test_ancestral_step_matches():
    cases = [(10.0, 5.0, 1.0), (1.0, 0.2, 0.5), (3.0, 2.9, 2.0), (1.0, 0.0, 1.0), (2.0, 1.0, 0)]
    for sigma_from, sigma_to, eta in cases:
        ref = K.get_ancestral_step(torch.tensor(sigma_from, dtype=torch.float64),
                                   torch.tensor(sigma_to, dtype=torch.float64), eta)
        got = sfk.get_ancestral_step(sigma_from, sigma_to, eta)
        assert got == pytest.approx([float(v) for v in ref], rel=1e-12, abs=1e-12)


LOW_PRECISION_CASES = [("sample_euler", {}), ("sample_heun", {}), ("sample_dpm_2", {}), ("sample_lms", {}),
                       ("sample_dpmpp_2m", {}), ("sample_dpmpp_3m_sde", {"eta": 0.0})]


@pytest.mark.parametrize("name,kwargs", LOW_PRECISION_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_fp32(name, kwargs, dtype):
    # fp32 accumulation with one rounding per update: a few units of the dtype's roundoff. (k-diffusion
    # is no baseline here: its slopes divide by a float32 sigma tensor and promote the sample to float32.)
    sigmas = _sigmas("karras")
    runs = []
    for x_dtype in (torch.float32, dtype):
        runs.append(getattr(sfk, name)(model, _x_T(20.0, x_dtype), sigmas, disable=True, **kwargs))
    assert runs[1].dtype == dtype
    assert relative_error(runs[1], runs[0]) <= 4.0 * EPS[dtype]


@pytest.mark.parametrize("name,per_step", [("sample_euler", 1), ("sample_euler_ancestral", 1), ("sample_heun", 2),
                                           ("sample_dpm_2", 2), ("sample_dpmpp_2m", 1), ("sample_dpmpp_3m_sde", 1),
                                           ("sample_lms", 1), ("sample_dpmpp_2s_ancestral", 2)])
def test_one_fused_step_per_update(monkeypatch, name, per_step):
    """Every update is one call of the fused op (two-stage samplers: one per stage)."""
    from stepfuse.ops import solver_step

    calls = []
    monkeypatch.setattr(impl, "solver_step", lambda *a, **k: calls.append(a) or solver_step(*a, **k))
    evaluations = []
    sigmas = _sigmas("karras")
    getattr(sfk, name)(lambda x, s: evaluations.append(s) or model(x, s), _x_T(20.0), sigmas, disable=True)
    assert len(calls) == len(evaluations)  # one update per model evaluation
    steps = len(sigmas) - 1
    assert len(calls) == per_step * steps - (per_step - 1)  # the step into sigma = 0 is single-stage


def test_no_steps_returns_x():
    x = _x_T(1.0)
    assert sfk.sample_dpmpp_2m(model, x, torch.tensor([1.0])) is x


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    sfk.sample_euler(model, _x_T(20.0), _sigmas("karras"), disable=False)
    assert "8/8" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# bad input: ValueError/TypeError naming the argument
# ----------------------------------------------------------------------------------------

SIGMAS = torch.tensor([10.0, 3.0, 1.0, 0.0])


@pytest.mark.parametrize("call,exc,match", [
    (lambda: sfk.sample_euler(model, _x_T(1.0), SIGMAS.reshape(2, 2)), ValueError, "sigmas"),
    (lambda: sfk.sample_euler(model, _x_T(1.0), [10.0, 1.0, 0.0]), TypeError, "sigmas"),
    (lambda: sfk.sample_euler(model, _x_T(1.0), torch.tensor([10, 1, 0])), TypeError, "sigmas"),
    (lambda: sfk.sample_euler(model, _x_T(1.0), torch.tensor([10.0, float("nan"), 0.0])), ValueError, "sigmas"),
    (lambda: sfk.sample_euler(model, _x_T(1.0), torch.tensor([10.0, 0.0, 1.0])), ValueError, "sigmas"),
    (lambda: sfk.sample_euler(model, _x_T(1.0), torch.tensor([])), ValueError, "sigmas"),
    (lambda: sfk.sample_dpmpp_2m(model, _x_T(1.0), torch.tensor([1.0, 3.0, 0.0])), ValueError, "sigmas"),
    (lambda: sfk.sample_dpmpp_3m_sde(model, _x_T(1.0), torch.tensor([3.0, 3.0, 0.0])), ValueError, "sigmas"),
    (lambda: sfk.sample_lms(model, _x_T(1.0), torch.tensor([1.0, 3.0, 0.0])), ValueError, "sigmas"),
    (lambda: sfk.sample_euler_ancestral(model, _x_T(1.0), torch.tensor([1.0, 3.0, 0.0])), ValueError, "sigmas"),
    (lambda: sfk.sample_euler(model, _x_T(1.0).double(), SIGMAS), TypeError, "x"),
    (lambda: sfk.sample_euler(model, _x_T(1.0).numpy(), SIGMAS), TypeError, "x"),
    (lambda: sfk.sample_euler("model", _x_T(1.0), SIGMAS), TypeError, "model"),
    (lambda: sfk.sample_euler(model, _x_T(1.0), SIGMAS, extra_args=[1]), TypeError, "extra_args"),
    (lambda: sfk.sample_euler(model, _x_T(1.0), SIGMAS, callback=3), TypeError, "callback"),
    (lambda: sfk.sample_euler_ancestral(model, _x_T(1.0), SIGMAS, noise_sampler=1), TypeError, "noise_sampler"),
    (lambda: sfk.sample_euler(lambda x, s: x[:1], _x_T(1.0), SIGMAS), ValueError, "model output"),
    (lambda: sfk.sample_euler_ancestral(model, _x_T(1.0), SIGMAS, noise_sampler=lambda a, b: torch.zeros(3)),
     ValueError, "noise"),
    (lambda: sfk.sample_euler(model, _x_T(1.0), SIGMAS, s_churn=-1.0), ValueError, "s_churn"),
    (lambda: sfk.sample_heun(model, _x_T(1.0), SIGMAS, s_tmin=float("nan")), ValueError, "s_tmin"),
    (lambda: sfk.sample_dpm_2(model, _x_T(1.0), SIGMAS, s_tmax="inf"), TypeError, "s_tmax"),
    (lambda: sfk.sample_euler_ancestral(model, _x_T(1.0), SIGMAS, eta=-0.5), ValueError, "eta"),
    (lambda: sfk.sample_dpmpp_2m_sde(model, _x_T(1.0), SIGMAS, solver_type="euler"), ValueError, "solver_type"),
    (lambda: sfk.sample_dpmpp_sde(model, _x_T(1.0), SIGMAS, r=0.0), ValueError, "r"),
    (lambda: sfk.sample_lms(model, _x_T(1.0), SIGMAS, order=0), ValueError, "order"),
    (lambda: sfk.sample_lms(model, _x_T(1.0), SIGMAS, order=9), ValueError, "order"),
    (lambda: sfk.sample_lms(model, _x_T(1.0), SIGMAS, order=2.5), TypeError, "order"),
    (lambda: sfk.sample_dpm_fast(model, _x_T(1.0), 0.0, 10.0, 5), ValueError, "sigma_min"),
    (lambda: sfk.sample_dpm_fast(model, _x_T(1.0), 0.1, 0.1, 5), ValueError, "sigma_min"),
    (lambda: sfk.sample_dpm_fast(model, _x_T(1.0), 0.1, 10.0, 0), ValueError, "n"),
    (lambda: sfk.sample_dpm_fast(model, _x_T(1.0), 10.0, 0.1, 5, eta=1.0), ValueError, "eta"),
    (lambda: sfk.sample_dpm_adaptive(model, _x_T(1.0), 0.1, 10.0, order=4), ValueError, "order"),
    (lambda: sfk.sample_dpm_adaptive(model, _x_T(1.0), 0.1, 10.0, rtol=0.0, atol=0.0), ValueError, "rtol"),
    (lambda: sfk.sample_dpm_adaptive(model, _x_T(1.0), 0.1, 10.0, h_init=0.0), ValueError, "h_init"),
    (lambda: sfk.get_sigmas_karras(0, 0.1, 10.0), ValueError, "n"),
    (lambda: sfk.get_sigmas_karras(2.5, 0.1, 10.0), TypeError, "n"),
    (lambda: sfk.get_sigmas_karras(5, 10.0, 0.1), ValueError, "sigma_min"),
    (lambda: sfk.get_sigmas_exponential(5, 0.0, 10.0), ValueError, "sigma_min"),
    (lambda: sfk.get_sigmas_polyexponential(5, 0.1, 10.0, rho=0.0), ValueError, "rho"),
    (lambda: sfk.get_sigmas_vp(5, eps_s=0.0), ValueError, "eps_s"),
    (lambda: sfk.get_sigmas_vp(5, beta_d=0.0, beta_min=0.0), ValueError, "beta_d"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_reexports():
    assert set(sfk.__all__) <= set(dir(sfk))
    for name in sfk.__all__:
        if name.startswith("sample_") and K is not None:
            ours, theirs = inspect.signature(getattr(sfk, name)), inspect.signature(getattr(K, name))
            # k-diffusion's parameters in its order; grid samplers add only the keyword-only plan.
            extra = [p for p in ours.parameters if p not in theirs.parameters]
            assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters), name
            assert extra in ([], ["plan"]), name
            if extra:
                assert ours.parameters["plan"].kind is inspect.Parameter.KEYWORD_ONLY, name
            for p in theirs.parameters.values():
                default = ours.parameters[p.name].default
                assert default == p.default or (isinstance(default, float) and math.isclose(default, p.default)), name
