"""DPMSolverMultistepScheduler: stepfuse vs diffusers over whole trajectories."""

from __future__ import annotations

import diffusers
import pytest
import torch

from stepfuse.schedulers import DPMSolverMultistepScheduler
from stepfuse.testing.parity import assert_scheduler_parity

THEIRS = diffusers.DPMSolverMultistepScheduler

CONFIGS = [
    {},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_order": 2, "solver_type": "heun"},
    {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "dpmsolver", "solver_type": "heun", "solver_order": 3, "final_sigmas_type": "sigma_min"},
    {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"prediction_type": "sample", "use_karras_sigmas": True},
    {"use_karras_sigmas": True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"use_lu_lambdas": True},
    {"euler_at_final": True, "lower_order_final": False},
    {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
    {"thresholding": True, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"variance_type": "learned_range"},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
]
SDE_CONFIGS = [
    {"algorithm_type": "sde-dpmsolver++"},
    {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True},
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "sde-dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
]


def _shape(config):
    return (2, 3, 8, 8) if config.get("variance_type") else (2, 4, 8, 8)


def _model_for(config):
    if not config.get("variance_type"):
        return None
    from stepfuse.testing.parity import smooth_model

    return lambda x, t: torch.cat([smooth_model(x, t), smooth_model(x, t)], dim=1)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 5, 12, 25])
def test_parity_fp32(config, steps):
    extra = {"model": _model_for(config)} if config.get("variance_type") else {}
    assert_scheduler_parity(DPMSolverMultistepScheduler, THEIRS, config, steps, _shape(config), **extra)


@pytest.mark.parametrize("config", SDE_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [3, 12])
def test_parity_sde_same_noise(config, steps):
    assert_scheduler_parity(DPMSolverMultistepScheduler, THEIRS, config, steps, seed=123)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2], CONFIGS[7], SDE_CONFIGS[0]], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_low_precision(config, dtype):
    assert_scheduler_parity(DPMSolverMultistepScheduler, THEIRS, config, 10, dtype=dtype, seed=5)


def test_custom_timesteps_and_begin_index():
    assert_scheduler_parity(DPMSolverMultistepScheduler, THEIRS, {}, None,
                            set_timesteps_kwargs={"timesteps": [999, 800, 600, 400, 250, 100, 20]})
    assert_scheduler_parity(DPMSolverMultistepScheduler, THEIRS, {"solver_order": 3}, 20, begin_index=8)


def test_dynamic_shifting_mu():
    config = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "use_dynamic_shifting": True}
    assert_scheduler_parity(DPMSolverMultistepScheduler, THEIRS, config, 8, set_timesteps_kwargs={"mu": 0.8})
