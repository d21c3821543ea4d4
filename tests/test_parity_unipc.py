"""UniPCMultistepScheduler: stepfuse vs diffusers over whole trajectories."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from stepfuse.schedulers import UniPCMultistepScheduler
from stepfuse.testing.parity import FP32_RTOL, assert_scheduler_parity, relative_error, run_trajectory, smooth_model

THEIRS = diffusers.UniPCMultistepScheduler
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

CONFIGS = [
    {},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_order": 4},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    {"solver_type": "midpoint"},  # legacy name, mapped to bh2 as diffusers does
    {"predict_x0": False, "final_sigmas_type": "sigma_min"},
    {"predict_x0": False, "solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"predict_x0": False, "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min", **SD},
    {"disable_corrector": [0, 1, 3]},
    {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"prediction_type": "v_prediction", **SD},
    {"prediction_type": "sample", "use_karras_sigmas": True},
    {"use_karras_sigmas": True, **SD},
    {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
    {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "lower_order_final": False},  # zero-length last step
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
    {"thresholding": True, "solver_order": 3},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    {"prediction_type": "flow_prediction"},  # flow output on a VP schedule: x0 = x - sigma * v
    {**FLOW, "flow_shift": 3.0},
    {**FLOW, "solver_order": 3, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {**FLOW, "use_karras_sigmas": True},
    {"use_flow_sigmas": True, "prediction_type": "epsilon", "flow_shift": 2.0},
]


def _config_id(config: dict) -> str:
    return str({k: (f"<{len(v)} values>" if isinstance(v, list) and len(v) > 4 else v) for k, v in config.items()})


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("steps", [1, 2, 5, 12, 25])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(UniPCMultistepScheduler, THEIRS, config, steps)


@pytest.mark.parametrize("steps", [2, 5, 12])
def test_parity_shift_terminal(steps):
    # One step has no range to stretch: the schedule rejects it (diffusers divides by zero).
    assert_scheduler_parity(UniPCMultistepScheduler, THEIRS, {**FLOW, "shift_terminal": 0.1, "flow_shift": 2.0}, steps)


@pytest.mark.parametrize(
    "config", [{}, {"solver_order": 3}, {"predict_x0": False, "final_sigmas_type": "sigma_min"},
               {**FLOW, "flow_shift": 3.0}, {"prediction_type": "v_prediction", "thresholding": True}], ids=str
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_low_precision(config, dtype):
    assert_scheduler_parity(UniPCMultistepScheduler, THEIRS, config, 10, dtype=dtype)


class _Float64Sigmas(THEIRS):
    """diffusers with float64 sigmas: its float64 run then really is float64 (it keeps them in fp32)."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


ILL_CONDITIONED = [
    # eps = (x - alpha x0) / sigma amplifies rounding by 1/sigma_min ~ 100.
    {"prediction_type": "sample", "predict_x0": False, "final_sigmas_type": "sigma_min"},
    # Flow schedules start at alpha = 1e-6: the noise-form update is x_t = (alpha_t / 1e-6) (x - eps) + ...
    {**FLOW, "prediction_type": "v_prediction", "predict_x0": False, "final_sigmas_type": "sigma_min"},
]


@pytest.mark.parametrize("config", ILL_CONDITIONED, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 5, 12, 25])
def test_ill_conditioned_noise_form_is_closer_to_float64(config, steps):
    """Here diffusers' fp32 run is far (up to 40%) from its exact value, and its float64 run still
    derives alpha, sigma in fp32. Against a true float64 run stepfuse (which combines the first
    step's coefficients in float64) must be within diffusers' own fp32 error."""
    ours = UniPCMultistepScheduler(**config)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = run_trajectory(ours, x_T.clone(), steps)
    theirs = run_trajectory(THEIRS.from_config(ours.config), x_T.clone(), steps)
    exact = run_trajectory(_Float64Sigmas.from_config(ours.config), x_T.double(), steps)
    assert relative_error(got, theirs) <= FP32_RTOL or relative_error(got, exact) <= 2 * relative_error(theirs, exact)


def test_custom_sigmas():
    for sigmas in (np.array([1.0, 0.8, 0.5, 0.3, 0.1]), np.array([0.9, 0.7, 0.2])):
        for extra in ({}, {"flow_shift": 3.0, "solver_order": 3}):
            assert_scheduler_parity(UniPCMultistepScheduler, THEIRS, {**FLOW, **extra}, None,
                                    set_timesteps_kwargs={"sigmas": sigmas})
    with pytest.raises(ValueError, match="sigmas"):
        UniPCMultistepScheduler().set_timesteps(sigmas=[0.9, 0.5])


@pytest.mark.parametrize("config", [{"solver_order": 3}, {"solver_order": 3, "disable_corrector": [8, 9, 12]},
                                    {"solver_order": 2, "lower_order_final": False, "final_sigmas_type": "sigma_min"}],
                         ids=str)
def test_begin_index(config):
    assert_scheduler_parity(UniPCMultistepScheduler, THEIRS, config, 20, begin_index=8)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_dynamic_shifting_mu(time_shift_type):
    config = {**FLOW, "use_dynamic_shifting": True, "time_shift_type": time_shift_type}
    assert_scheduler_parity(UniPCMultistepScheduler, THEIRS, config, 8, set_timesteps_kwargs={"mu": 0.8})
    with pytest.raises(ValueError, match="mu"):
        UniPCMultistepScheduler(**config).set_timesteps(8)


def test_mu_without_dynamic_shifting_is_ignored_like_diffusers():
    assert_scheduler_parity(UniPCMultistepScheduler, THEIRS, FLOW, 8, set_timesteps_kwargs={"mu": 0.8})


def test_solver_p_predicts_from_the_corrected_sample():
    # "solver_p + UniC": both wrap the same diffusers DPM-Solver (reset by set_timesteps).
    assert_scheduler_parity(UniPCMultistepScheduler, THEIRS, {"solver_p": diffusers.DPMSolverMultistepScheduler()}, 10)


@pytest.mark.parametrize("config", [{"solver_type": "bh1"}, {"predict_x0": False}, {"solver_type": "bh1", **FLOW},
                                    {"predict_x0": False, "prediction_type": "v_prediction", **SD}], ids=str)
@pytest.mark.parametrize("steps", [1, 5])
def test_last_step_onto_sigma_zero_returns_the_limit(config, steps):
    """diffusers evaluates 0 * inf there (NaN); its update tends to alpha_t * x0 = x0 (alpha_t = 1).

    x0 from the corrected sample diffusers keeps (``last_sample``) and its converted output.
    """
    ours = UniPCMultistepScheduler(**config)
    theirs = THEIRS.from_config(ours.config)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(run_trajectory(theirs, x_T.clone(), steps)).all()
    m = theirs.model_outputs[-1].double()
    if ours.config.predict_x0:
        x0 = m
    else:
        s = theirs.sigmas[steps - 1].double()
        alpha, sigma = (1 - s, s) if ours.config.use_flow_sigmas else (1 / (s**2 + 1) ** 0.5, s / (s**2 + 1) ** 0.5)
        x0 = (theirs.last_sample.double() - sigma * m) / alpha
    got = run_trajectory(ours, x_T.clone(), steps)
    assert relative_error(got, x0) <= FP32_RTOL


def test_zero_length_last_step_is_identity():
    """final_sigmas_type="sigma_min" with karras sigmas repeats the last sigma; at order 3 diffusers'
    system is singular there (NaN); the step is the identity on the corrected sample."""
    ours = UniPCMultistepScheduler(use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False,
                                   solver_order=3)
    theirs = THEIRS.from_config(ours.config)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert not torch.isfinite(run_trajectory(theirs, x_T.clone(), 5)).all()
    assert relative_error(run_trajectory(ours, x_T.clone(), 5), theirs.last_sample) <= FP32_RTOL


def test_higher_order_step_onto_sigma_zero_raises():
    scheduler = UniPCMultistepScheduler(lower_order_final=False)
    x = torch.randn(1, 4, 8, 8)
    run_trajectory(scheduler, x, 1)  # a single step is first order: fine
    with pytest.raises(ValueError, match="lower_order_final"):
        run_trajectory(scheduler, x, 3)


def test_config_round_trip():
    ours = UniPCMultistepScheduler(solver_order=3, disable_corrector=[1], use_karras_sigmas=True)
    theirs = THEIRS.from_config(ours.config)
    assert set(ours.config) == set(theirs.config)
    back = UniPCMultistepScheduler.from_config(theirs.config)
    assert dict(back.config) == dict(ours.config)
    assert UniPCMultistepScheduler.from_config(THEIRS(solver_type="heun").config).config.solver_type == "bh2"


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"solver_type": "rk4"}, "solver_type"),
        ({"prediction_type": "score"}, "prediction_type"),
        ({"final_sigmas_type": "max"}, "final_sigmas_type"),
        ({"timestep_spacing": "cosine"}, "timestep_spacing"),
        ({"time_shift_type": "log"}, "time_shift_type"),
        ({"beta_schedule": "exp"}, "beta_schedule"),
        ({"solver_order": 0}, "solver_order"),
        ({"solver_order": 8}, "solver_order"),
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_"),
        ({"shift_terminal": 0.1}, "shift_terminal"),
        ({"prediction_type": "flow_prediction", "predict_x0": False}, "predict_x0"),
        ({"disable_corrector": ["first"]}, "disable_corrector"),
        ({"solver_p": "dpm"}, "solver_p"),
    ],
)
def test_bad_config_raises(kwargs, key):
    with pytest.raises(ValueError, match=key):
        UniPCMultistepScheduler(**kwargs)


def test_scheduler_api():
    ours, theirs = UniPCMultistepScheduler(), THEIRS()
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == theirs.timesteps.dtype
    for s in (ours, theirs):
        s.set_timesteps(10)
    assert ours.timesteps.dtype == theirs.timesteps.dtype == torch.int64
    assert torch.equal(ours.sigmas, theirs.sigmas)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = ours.timesteps[[0, 4, 9]]
    assert torch.allclose(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)
    x = torch.randn(1, 4, 8, 8)
    assert ours.scale_model_input(x, t[0]) is x and ours.init_noise_sigma == 1.0 and ours.order == 1
    out = ours.step(smooth_model(x, t[0]), ours.timesteps[0], x)
    assert isinstance(out, SchedulerOutput) and out.prev_sample.shape == x.shape and ours.step_index == 1
    assert len(ours) == 1000


def test_step_misuse_raises():
    scheduler = UniPCMultistepScheduler()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    scheduler.set_timesteps(2)
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(x.numpy(), scheduler.timesteps[0], x)
    run_trajectory(scheduler, x, 2)
    with pytest.raises(ValueError, match="past the schedule"):
        scheduler.step(x, scheduler.timesteps[-1], x)


def test_one_fused_program_per_step():
    """Corrector and predictor share one program: UniC row, ring write, UniP output."""
    scheduler = UniPCMultistepScheduler(solver_order=3)
    scheduler.set_timesteps(6)
    plan = scheduler._build_plan(0)
    assert [len(p.targets) for p in plan] == [3, 3, 3, 3, 3, 2]  # first: copy x for the next corrector
    assert all(p.num_slots == 4 and not p.uses_noise for p in plan)
