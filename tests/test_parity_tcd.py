"""TCDScheduler: stepfuse vs diffusers over whole trajectories (same generator, same noise)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

from stepfuse.integrations.tcd import TCDScheduler
from stepfuse.testing.parity import assert_scheduler_parity, relative_error, smooth_model

THEIRS = diffusers.TCDScheduler

CONFIGS = [
    {},  # scaled_linear, epsilon, original_inference_steps=50
    {"prediction_type": "v_prediction", "set_alpha_to_one": False},
    {"prediction_type": "sample", "original_inference_steps": 20},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_scaling": 2.0},
]


def _ids(value):
    text = str(value)
    return text if len(text) < 80 else text[:60] + "..."


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("steps", [1, 2, 4, 7])
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.75, 1.0])
def test_parity_fp32(config, steps, eta):
    assert_scheduler_parity(TCDScheduler, THEIRS, config, steps, shape=(2, 3, 5, 7), seed=9, step_kwargs={"eta": eta})


@pytest.mark.parametrize(
    "kwargs",
    [{"original_inference_steps": 100}, {"original_inference_steps": 8, "strength": 0.5}, {"strength": 0.6}],
    ids=_ids,
)
def test_parity_set_timesteps_arguments(kwargs):
    assert_scheduler_parity(TCDScheduler, THEIRS, {}, 6, seed=1, set_timesteps_kwargs=kwargs)


def test_parity_default_eta_custom_timesteps_and_bf16():
    assert_scheduler_parity(TCDScheduler, THEIRS, {}, 4, seed=3)  # step's default eta = 0.3
    assert_scheduler_parity(TCDScheduler, THEIRS, {}, None, seed=3,
                            set_timesteps_kwargs={"timesteps": [999, 759, 499, 259]})
    assert_scheduler_parity(TCDScheduler, THEIRS, {}, 4, dtype=torch.bfloat16, seed=5)
    assert_scheduler_parity(TCDScheduler, THEIRS, CONFIGS[1], 7, dtype=torch.bfloat16, seed=5,
                            step_kwargs={"eta": 0.8})


def test_outputs_pred_noised_sample_and_eta_change():
    ours, theirs = TCDScheduler(), THEIRS()
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for eta, t in zip([0.3, 0.9, 0.0, 0.5], ours.timesteps):  # eta may change from step to step
        out = smooth_model(x, t)
        mine = ours.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(4))
        ref = theirs.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(4))
        assert isinstance(mine, TCDSchedulerOutput)
        assert relative_error(mine.prev_sample, ref.prev_sample) < 1e-5
        assert relative_error(mine.pred_noised_sample, ref.pred_noised_sample) < 1e-5
        x = mine.prev_sample
    assert float(ours._get_variance(999, 759)) == pytest.approx(float(theirs._get_variance(999, 759)), rel=1e-6)


def test_from_config_both_ways():
    theirs = THEIRS(original_inference_steps=25, prediction_type="v_prediction")
    ours = TCDScheduler.from_config(theirs.config)
    assert dict(ours.config) == dict(theirs.config)
    assert dict(THEIRS.from_config(ours.config).config) == dict(theirs.config)
    x0, noise, ts = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([999, 500, 1])
    assert relative_error(ours.get_velocity(x0, noise, ts), theirs.get_velocity(x0, noise, ts)) < 1e-6


def test_bad_arguments():
    with pytest.raises(ValueError, match="timestep_spacing"):
        TCDScheduler(timestep_spacing="karras")
    ours = TCDScheduler()
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours.set_timesteps(51)
    ours.set_timesteps(4)
    for eta in (-0.1, 1.5, float("nan"), "0.3"):
        with pytest.raises(ValueError, match="eta"):
            ours.step(x, ours.timesteps[0], x, eta=eta)
    with pytest.raises(TypeError, match="model_output"):
        ours.step([1.0], ours.timesteps[0], x)
