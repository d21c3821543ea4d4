"""DEISMultistepScheduler: stepfuse vs diffusers over whole trajectories, coefficients and API."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from stepfuse.integrations.deis_multistep import DEISMultistepScheduler
from stepfuse.solvers.deis import check_schedule, deis_coefficients
from stepfuse.testing.parity import (
    FP32_RTOL,
    assert_scheduler_parity,
    relative_error,
    run_trajectory,
    smooth_model,
)

THEIRS = diffusers.DEISMultistepScheduler
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
STEPS = [1, 2, 3, 7, 20]

# Configurations where diffusers' own float32 coefficients stay within FP32_RTOL of exact.
WELL_CONDITIONED = [
    {},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_order": 3, "lower_order_final": False},
    {"solver_order": 2, "lower_order_final": False, **SD},
    {"prediction_type": "v_prediction", **SD},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"algorithm_type": "dpmsolver++", "solver_type": "midpoint"},  # legacy names, mapped as diffusers does
]
# diffusers evaluates DEIS's closed-form log-rho integrals in float32 from float32 sigmas; on these
# schedules that alone moves its result by 1e-5 .. 1e-2 (cancellation between the log terms),
# while stepfuse matches the same diffusers code run with float64 sigmas to ~1e-7.
ILL_CONDITIONED = [
    {"prediction_type": "sample", "use_karras_sigmas": True},
    {"use_karras_sigmas": True, "solver_order": 3, **SD},
    {"use_karras_sigmas": True, "solver_order": 3, "lower_order_final": False},
    {"use_beta_sigmas": True, "solver_order": 3},
    {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
    {"thresholding": True, "solver_order": 3},
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    FLOW,
    {**FLOW, "solver_order": 3, "lower_order_final": False},
]


class _Float64Sigmas(THEIRS):
    """diffusers' DEIS with its sigmas (hence every coefficient) in float64."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


@pytest.mark.parametrize("config", WELL_CONDITIONED, ids=str)
@pytest.mark.parametrize("steps", STEPS)
def test_parity_fp32(config, steps):
    assert_scheduler_parity(DEISMultistepScheduler, THEIRS, config, steps)


@pytest.mark.parametrize("config", WELL_CONDITIONED + ILL_CONDITIONED, ids=str)
@pytest.mark.parametrize("steps", STEPS)
def test_parity_fp32_float64_coefficients(config, steps):
    assert_scheduler_parity(DEISMultistepScheduler, _Float64Sigmas, config, steps)


def test_duplicate_timesteps_with_begin_index():
    """Cosine betas with karras sigmas repeat timesteps; pipelines then set the begin index."""
    config = {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True, "solver_order": 3}
    assert_scheduler_parity(DEISMultistepScheduler, _Float64Sigmas, config, 7, begin_index=0)


def test_diffusers_fp32_coefficients_are_the_gap():
    """The ill-conditioned gap is diffusers' float32 coefficient math, not the trajectory."""
    ours = DEISMultistepScheduler(use_beta_sigmas=True, solver_order=3)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = run_trajectory(ours, x_T.clone(), 50)
    theirs = run_trajectory(THEIRS.from_config(ours.config), x_T.clone(), 50)
    exact = run_trajectory(_Float64Sigmas.from_config(ours.config), x_T.double(), 50)
    assert relative_error(theirs, exact) > 1e-3
    assert relative_error(got, exact) <= FP32_RTOL


@pytest.mark.parametrize("config", [{}, {"solver_order": 3}, {"prediction_type": "v_prediction", **SD}, FLOW],
                         ids=str)
def test_parity_bf16(config):
    assert_scheduler_parity(DEISMultistepScheduler, THEIRS, config, 10, dtype=torch.bfloat16)


@pytest.mark.parametrize("config", [{"solver_order": 3}, {"solver_order": 2, "lower_order_final": False}], ids=str)
@pytest.mark.parametrize("begin_index", [3, 8])
def test_begin_index(config, begin_index):
    assert_scheduler_parity(DEISMultistepScheduler, THEIRS, config, 12, begin_index=begin_index)


def test_dynamic_shifting_mu():
    config = {**FLOW, "use_dynamic_shifting": True}
    assert_scheduler_parity(DEISMultistepScheduler, _Float64Sigmas, config, 8, set_timesteps_kwargs={"mu": 0.8})
    scheduler = DEISMultistepScheduler(**config)
    scheduler.set_timesteps(8, mu=0.8)
    assert scheduler.config.flow_shift == pytest.approx(2.225540928492468)
    with pytest.raises(ValueError, match="mu"):
        DEISMultistepScheduler(**FLOW).set_timesteps(8, mu=0.8)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_coefficients_match_diffusers_float64(order):
    """Each plan weight equals diffusers' update applied to unit inputs (in float64)."""
    ours = DEISMultistepScheduler(solver_order=order, use_karras_sigmas=True, lower_order_final=False)
    theirs = _Float64Sigmas.from_config(ours.config)
    for s in (ours, theirs):
        s.set_timesteps(9)
    update = {1: "deis_first_order_update", 2: "multistep_deis_second_order_update",
              3: "multistep_deis_third_order_update"}[order]
    alpha, sigma = ours._alpha64.tolist(), ours._sigma64.tolist()
    unit = [torch.zeros(order + 1, dtype=torch.float64) for _ in range(order + 1)]
    for k, u in enumerate(unit):
        u[k] = 1.0
    for i in range(order - 1, 9):
        theirs._step_index = i
        outputs = unit[1:] if order == 1 else list(reversed(unit[1:]))  # diffusers lists oldest first
        model_output = outputs[0] if order == 1 else outputs
        got = getattr(theirs, update)(model_output, sample=unit[0])
        coeffs = deis_coefficients(alpha, sigma, i, order)
        expected = torch.tensor([coeffs.a, *coeffs.b], dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12), (i, got, expected)


def test_zero_length_last_step_is_identity():
    """Re-spaced schedules repeat the last sigma: the final step returns the sample unchanged."""
    scheduler = DEISMultistepScheduler(use_karras_sigmas=True, solver_order=3, lower_order_final=False)
    scheduler.set_timesteps(6)
    last = scheduler._plan(0)[-1]
    assert last.row(len(last.targets) - 1) == (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_step_onto_sigma_zero_is_the_limit(order):
    """rho_t -> 0 (a schedule ending at sigma = 0, e.g. a sampling plan's): the weights converge.

    At order 1 the step is DDIM's x0 = (x - sigma_s eps) / alpha_s.
    """
    vp = [3.0, 1.0, 0.5]
    alpha = [1.0 / math.sqrt(1.0 + s * s) for s in vp]
    sigma = [s * a for s, a in zip(vp, alpha)]
    limit = deis_coefficients(alpha + [1.0], sigma + [0.0], 2, order)
    near = deis_coefficients(alpha + [1.0 / math.sqrt(1.0 + 1e-24)], sigma + [1e-12], 2, order)
    assert limit.a == near.a and all(b == pytest.approx(c, rel=1e-9) for b, c in zip(limit.b, near.b))
    if order == 1:
        assert limit.b[0] == pytest.approx(-sigma[2] / alpha[2], rel=1e-15)


@pytest.mark.parametrize("return_dict", [True, False])
def test_stepwise_outputs(return_dict):
    ours, theirs = DEISMultistepScheduler(solver_order=3), THEIRS(solver_order=3)
    for s in (ours, theirs):
        s.set_timesteps(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in theirs.timesteps:
        out = smooth_model(x, t)
        results = [s.step(out, t, x, return_dict=return_dict) for s in (ours, theirs)]
        if return_dict:
            assert all(type(r) is SchedulerOutput for r in results)
            results = [(r.prev_sample,) for r in results]
        assert len(results[0]) == len(results[1]) == 1
        assert relative_error(results[0][0], results[1][0]) <= FP32_RTOL
        assert ours.step_index == theirs.step_index
        x = results[1][0]


@pytest.mark.parametrize("config", [SD, {"use_karras_sigmas": True, "timestep_spacing": "trailing"}, FLOW], ids=str)
def test_schedule_state_matches(config):
    ours = DEISMultistepScheduler(**config)
    theirs = THEIRS.from_config(ours.config)
    back = DEISMultistepScheduler.from_config(theirs.config)
    assert type(back) is DEISMultistepScheduler and dict(back.config) == dict(ours.config)
    assert set(ours.config) == set(theirs.config)
    # The VP tables come from float64 (VPScheduleMixin, as for DPM-Solver and UniPC): equal to rounding.
    for attr in ("betas", "alphas", "alphas_cumprod", "alpha_t"):
        assert torch.allclose(getattr(ours, attr), getattr(theirs, attr), rtol=1e-6, atol=0), attr
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == theirs.timesteps.dtype
    for s in (ours, theirs):
        s.set_timesteps(9)
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == torch.int64
    assert ours.init_noise_sigma == theirs.init_noise_sigma and ours.order == theirs.order == 1
    x = torch.randn(1, 4, 8, 8)
    assert ours.scale_model_input(x, ours.timesteps[0]) is x
    x0, noise = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    timesteps = theirs.timesteps[[0, 3, 5]]
    assert torch.allclose(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps),
                          rtol=1e-6, atol=1e-6)
    for s in (ours, theirs):
        s.set_begin_index(2)
    assert ours.begin_index == theirs.begin_index == 2
    assert torch.allclose(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps),
                          rtol=1e-6, atol=1e-6)
    assert len(ours) == len(theirs) == 1000


def test_config_round_trip_maps_legacy_names():
    for source in (diffusers.DPMSolverMultistepScheduler(), THEIRS(algorithm_type="dpmsolver", solver_type="heun")):
        ours = DEISMultistepScheduler.from_config(source.config)
        assert (ours.config.algorithm_type, ours.config.solver_type) == ("deis", "logrho")
    ours = DEISMultistepScheduler(solver_order=3, use_exponential_sigmas=True)
    assert dict(DEISMultistepScheduler.from_config(THEIRS.from_config(ours.config).config).config) == dict(ours.config)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({"solver_type": "rk4"}, "solver_type"),
        ({"prediction_type": "score"}, "prediction_type"),
        ({"timestep_spacing": "cosine"}, "timestep_spacing"),
        ({"time_shift_type": "linear"}, "time_shift_type"),
        ({"beta_schedule": "exp"}, "beta_schedule"),
        ({"solver_order": 0}, "solver_order"),
        ({"solver_order": 4}, "solver_order"),
        ({"solver_order": True}, "solver_order"),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_"),
    ],
    ids=str,
)
def test_bad_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DEISMultistepScheduler(**kwargs).set_timesteps(4)


def test_bad_calls():
    scheduler = DEISMultistepScheduler()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(None)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(-1)
    scheduler.set_timesteps(2)
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(x.numpy(), scheduler.timesteps[0], x)
    with pytest.raises(TypeError, match="sample"):
        scheduler.step(x, scheduler.timesteps[0], x.numpy())
    run_trajectory(scheduler, x, 2)
    with pytest.raises(ValueError, match="past the schedule"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="order"):
        deis_coefficients([1.0, 0.5, 0.2], [0.1, 0.8, 0.9], 0, 2)
    with pytest.raises(ValueError, match="sigma"):
        check_schedule(np.array([0.5, 1.0]), np.array([0.0, 0.0]))
    with pytest.raises(ValueError, match="alpha"):
        check_schedule(np.array([0.0, 1.0]), np.array([1.0, 0.0]))


def test_one_fused_op_per_step(monkeypatch):
    """Without thresholding every step is a single solver_step call; the ring holds solver_order slots."""
    import stepfuse.integrations.diffusers_base as base

    calls = []
    real = base.solver_step
    monkeypatch.setattr(base, "solver_step", lambda *a: calls.append(a[3]) or real(*a))
    scheduler = DEISMultistepScheduler(solver_order=3)
    run_trajectory(scheduler, torch.randn(1, 4, 8, 8), 7)
    assert len(calls) == 7 and all(p.num_slots == 3 and not p.uses_noise for p in calls)
