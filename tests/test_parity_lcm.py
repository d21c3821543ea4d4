"""LCMScheduler: stepfuse vs diffusers over whole trajectories (same generator, same noise)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from stepfuse.integrations.lcm import LCMScheduler
from stepfuse.testing.parity import assert_scheduler_parity, relative_error, smooth_model

THEIRS = diffusers.LCMScheduler

CONFIGS = [
    {},  # scaled_linear, epsilon, original_inference_steps=50
    {"original_inference_steps": 20, "set_alpha_to_one": False},
    {"prediction_type": "v_prediction", "timestep_scaling": 5.0},
    {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5},
    {"clip_sample": True},
    {"thresholding": True, "sample_max_value": 2.0, "dynamic_thresholding_ratio": 0.9},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "original_inference_steps": 100},
    {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
]


def _ids(value):
    text = str(value)
    return text if len(text) < 80 else text[:60] + "..."


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(LCMScheduler, THEIRS, config, steps, shape=(2, 3, 5, 7), seed=7)


@pytest.mark.parametrize(
    "kwargs",
    [{"original_inference_steps": 100}, {"original_inference_steps": 30, "strength": 0.5}, {"strength": 0.6}],
    ids=_ids,
)
def test_parity_set_timesteps_arguments(kwargs):
    assert_scheduler_parity(LCMScheduler, THEIRS, {}, 6, seed=1, set_timesteps_kwargs=kwargs)


def test_parity_custom_timesteps_begin_index_and_bf16():
    custom = {"timesteps": [999, 759, 499, 259]}
    assert_scheduler_parity(LCMScheduler, THEIRS, {}, None, seed=2, set_timesteps_kwargs=custom)
    assert_scheduler_parity(LCMScheduler, THEIRS, {}, 8, seed=2, begin_index=3)
    assert_scheduler_parity(LCMScheduler, THEIRS, {}, 4, dtype=torch.bfloat16, seed=5)
    assert_scheduler_parity(LCMScheduler, THEIRS, CONFIGS[4], 4, dtype=torch.bfloat16, seed=5)


@pytest.mark.parametrize("config", [{}, {"clip_sample": True}], ids=_ids)
def test_outputs_denoised(config):
    ours, theirs = LCMScheduler(**config), THEIRS(**config)
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        out = smooth_model(x, t)
        mine = ours.step(out, t, x, generator=torch.Generator().manual_seed(3))
        ref = theirs.step(out, t, x, generator=torch.Generator().manual_seed(3))
        assert isinstance(mine, LCMSchedulerOutput)
        assert relative_error(mine.prev_sample, ref.prev_sample) < 1e-5
        assert relative_error(mine.denoised, ref.denoised) < 1e-5
        x = mine.prev_sample
    assert ours.get_scalings_for_boundary_condition_discrete(499) == pytest.approx(
        theirs.get_scalings_for_boundary_condition_discrete(499), rel=1e-12)


def test_from_config_both_ways():
    theirs = THEIRS(original_inference_steps=25, prediction_type="v_prediction")
    ours = LCMScheduler.from_config(theirs.config)
    assert dict(ours.config) == dict(theirs.config)
    assert dict(THEIRS.from_config(ours.config).config) == dict(theirs.config)
    for name in ("betas", "alphas_cumprod", "final_alpha_cumprod", "timesteps"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    x0, noise, ts = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([999, 500, 1])
    assert relative_error(ours.add_noise(x0, noise, ts), theirs.add_noise(x0, noise, ts)) < 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="prediction_type"):
        LCMScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="beta_schedule"):
        LCMScheduler(beta_schedule="sigmoid")
    ours = LCMScheduler()
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(x, 999, x)
    for kwargs, key in [({}, "num_inference_steps"), ({"num_inference_steps": 4, "timesteps": [999]}, "timesteps"),
                        ({"num_inference_steps": 51}, "num_inference_steps"),
                        ({"num_inference_steps": 4, "original_inference_steps": 1001}, "original_inference_steps"),
                        ({"num_inference_steps": 4, "strength": 0.0}, "strength"),
                        ({"timesteps": [259, 999]}, "descending")]:
        with pytest.raises(ValueError, match=key):
            ours.set_timesteps(**kwargs)
    ours.set_timesteps(2)
    with pytest.raises(TypeError, match="sample"):
        ours.step(x, ours.timesteps[0], None)
    for t in ours.timesteps:
        ours.step(x, t, x)
    with pytest.raises(ValueError, match="past the schedule"):
        ours.step(x, ours.timesteps[-1], x)
