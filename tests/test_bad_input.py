"""Bad input to the drop-in schedulers raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import inspect

import pytest
import torch

import stepfuse.schedulers as sf

NAMES = sorted(sf.__all__)


def _ready(name: str, steps: int = 4):
    scheduler = getattr(sf, name)()
    scheduler.set_timesteps(steps)
    return scheduler


def _step(scheduler, model_output, timestep, sample, **kwargs):
    if "generator" in inspect.signature(scheduler.step).parameters:
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return scheduler.step(model_output, timestep, sample, return_dict=False, **kwargs)[0]


@pytest.mark.parametrize("name", NAMES)
def test_model_output_shape_mismatch(name):
    scheduler = _ready(name)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        _step(scheduler, torch.randn(1, 4, 8, 9), t, torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_model_output_dtype_mismatch(name):
    scheduler = _ready(name)
    t = scheduler.timesteps[0]
    # float64 is no working dtype of the fused step: rejected whatever the scheduler promotes to.
    with pytest.raises(TypeError, match="dtype"):
        _step(scheduler, torch.randn(1, 4, 8, 8, dtype=torch.float64), t, torch.randn(1, 4, 8, 8, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_model_output_device_mismatch(name):
    scheduler = _ready(name)
    t = scheduler.timesteps[0]
    with pytest.raises(ValueError, match="model_output must be on"):
        _step(scheduler, torch.randn(1, 4, 8, 8, device="meta"), t, torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_non_tensor_model_output(name):
    scheduler = _ready(name)
    with pytest.raises(TypeError, match="model_output"):
        _step(scheduler, [1.0, 2.0], scheduler.timesteps[0], torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_step_past_the_schedule(name):
    scheduler = _ready(name, steps=4)  # PNDM's Runge-Kutta warm-up needs at least 4 steps
    x = torch.randn(1, 4, 8, 8)
    for t in scheduler.timesteps:
        x = _step(scheduler, torch.tanh(x), t, x)
    with pytest.raises(ValueError, match="past the schedule"):
        _step(scheduler, torch.tanh(x), scheduler.timesteps[-1], x)


# These set a full training schedule in __init__, as diffusers' do, so step() works at once.
SCHEDULE_AT_INIT = {"HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler", "IPNDMScheduler"}


@pytest.mark.parametrize("name", [n for n in NAMES if n not in SCHEDULE_AT_INIT])
def test_step_before_set_timesteps(name):
    scheduler = getattr(sf, name)()
    with pytest.raises(ValueError, match="set_timesteps"):
        _step(scheduler, torch.randn(1, 4, 8, 8), torch.tensor(999.0), torch.randn(1, 4, 8, 8))


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_model_output_with_check_finite(name):
    scheduler = _ready(name)
    scheduler.check_finite = True
    out = torch.randn(1, 4, 8, 8)
    out[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        _step(scheduler, out, scheduler.timesteps[0], torch.randn(1, 4, 8, 8))


UNKNOWN_CONFIG = [
    ("DPMSolverMultistepScheduler", "algorithm_type", "dpmsolver+++"),
    ("DPMSolverMultistepScheduler", "solver_type", "rk4"),
    ("DPMSolverMultistepScheduler", "prediction_type", "noise"),
    ("DPMSolverMultistepScheduler", "final_sigmas_type", "one"),
    ("DPMSolverMultistepScheduler", "solver_order", 5),
    ("DPMSolverMultistepScheduler", "beta_schedule", "quadratic"),
    ("UniPCMultistepScheduler", "solver_type", "bh3"),
    ("UniPCMultistepScheduler", "prediction_type", "noise"),
    ("EulerDiscreteScheduler", "prediction_type", "noise"),
    ("EulerDiscreteScheduler", "interpolation_type", "cubic"),
    ("EulerAncestralDiscreteScheduler", "beta_schedule", "quadratic"),
    ("HeunDiscreteScheduler", "prediction_type", "noise"),
    ("DDIMScheduler", "prediction_type", "noise"),
    ("DDIMScheduler", "timestep_spacing", "uniform"),
    ("FlowMatchEulerDiscreteScheduler", "time_shift_type", "cubic"),
]


@pytest.mark.parametrize("name, key, value", UNKNOWN_CONFIG)
def test_unknown_config_value(name, key, value):
    with pytest.raises(ValueError, match=key):
        scheduler = getattr(sf, name)(**{key: value})
        # Some values are only read when timesteps are set, as in diffusers.
        scheduler.set_timesteps(4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [0, -3])
def test_bad_num_inference_steps(name, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        getattr(sf, name)().set_timesteps(steps)


def test_variance_noise_wins_over_philox_seed():
    """A caller's variance_noise is used even when in-kernel noise is configured."""
    x = torch.randn(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8)
    runs = []
    for philox_seed in (None, 123):
        scheduler = sf.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
        scheduler.philox_seed = philox_seed
        scheduler.set_timesteps(4)
        runs.append(scheduler.step(torch.tanh(x), scheduler.timesteps[0], x, variance_noise=noise).prev_sample)
    torch.testing.assert_close(runs[0], runs[1])
