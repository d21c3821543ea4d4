"""PNDMScheduler: stepfuse vs diffusers over whole trajectories, plus the diffusers API around step."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from stepfuse.integrations.pndm import PNDMScheduler
from stepfuse.testing.parity import assert_scheduler_parity, relative_error, smooth_model

THEIRS = diffusers.PNDMScheduler
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
PLMS = {"skip_prk_steps": True}

CONFIGS = [
    {},  # PRK then PLMS, leading spacing
    PLMS,
    {**SD, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1},
    {**SD, "set_alpha_to_one": True, "steps_offset": 1},
    {**PLMS, "timestep_spacing": "trailing"},
    {**PLMS, "timestep_spacing": "linspace", "prediction_type": "v_prediction"},
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"},
    {**SD, **PLMS, "prediction_type": "v_prediction", "set_alpha_to_one": True},
]


def _ids(value):
    return str(value)[:70]


# diffusers' PRK phase needs four grid points (fewer steps: see test_bad_input).
CASES = [(c, n) for c in CONFIGS for n in ([1, 2, 7, 20] if c.get("skip_prk_steps") else [4, 7, 20])]


@pytest.mark.parametrize("config,steps", CASES, ids=_ids)
def test_parity_fp32(config, steps):
    assert_scheduler_parity(PNDMScheduler, THEIRS, config, steps)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[5]], ids=_ids)
def test_parity_bf16(config):
    assert_scheduler_parity(PNDMScheduler, THEIRS, config, 10, dtype=torch.bfloat16)


def test_tables_timesteps_and_phases_match_diffusers():
    for config in CONFIGS:
        ours, theirs = PNDMScheduler(**config), THEIRS(**config)
        for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), (config, name)
        for steps in (4, 7, 20):
            ours.set_timesteps(steps)
            theirs.set_timesteps(steps)
            assert torch.equal(ours.timesteps, theirs.timesteps)
            for name in ("_timesteps", "prk_timesteps", "plms_timesteps"):
                assert np.array_equal(getattr(ours, name), getattr(theirs, name)), (config, steps, name)


@pytest.mark.parametrize("config", [{}, PLMS], ids=_ids)
def test_step_prk_plms_and_counter(config):
    ours, theirs = PNDMScheduler(**config), THEIRS(**config)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    x = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(1))  # odd sizes
    y = x.clone()
    num_prk = len(theirs.prk_timesteps) if not theirs.config.skip_prk_steps else 0
    for i, t in enumerate(ours.timesteps):
        explicit = ours.step_prk if i < num_prk else ours.step_plms
        x = explicit(smooth_model(x, t), t, x).prev_sample
        y = theirs.step(smooth_model(y, t), t, y, return_dict=False)[0]
        assert ours.counter == theirs.counter == i + 1
    assert relative_error(x, y) < 1e-5
    with pytest.raises(ValueError, match="past the schedule"):
        ours.step(x, ours.timesteps[-1], x)
    ours.set_timesteps(8)
    assert ours.counter == 0
    if num_prk:
        with pytest.raises(ValueError, match="step_plms"):
            ours.step_plms(x, ours.timesteps[0], x)
    else:
        with pytest.raises(ValueError, match="step_prk"):
            ours.step_prk(x, ours.timesteps[0], x)


def test_add_noise_and_from_config_both_ways():
    theirs = THEIRS(**SD, skip_prk_steps=True, prediction_type="v_prediction", steps_offset=1)
    ours = PNDMScheduler.from_config(theirs.config)
    assert dict(ours.config) == dict(theirs.config)
    assert dict(THEIRS.from_config(ours.config).config) == dict(theirs.config)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    timesteps = torch.tensor([999, 500, 3])
    assert relative_error(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps)) < 1e-6
    assert ours.scale_model_input(torch.ones(2), 5).equal(torch.ones(2))
    assert ours.order == 1 and ours.init_noise_sigma == 1.0 and len(ours) == 1000 and ours.timesteps is None


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"beta_schedule": "exp"}, "beta_schedule"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ],
)
def test_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=key):
        PNDMScheduler(**kwargs)


def test_bad_input():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        PNDMScheduler().step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        PNDMScheduler().set_timesteps(3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        PNDMScheduler(skip_prk_steps=True).set_timesteps(1001)
    ours = PNDMScheduler(skip_prk_steps=True)
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        ours.step(x, 500, x)
    with pytest.raises(TypeError, match="model_output"):
        ours.step(x.numpy(), ours.timesteps[0], x)
    with pytest.raises(TypeError, match="sample"):
        ours.step(x, ours.timesteps[0], None)


def test_tensor_timesteps_are_not_read():
    # The counter picks the program; a meta tensor (unreadable, like a sync-free GPU value) suffices.
    ours, reference = PNDMScheduler(), PNDMScheduler()
    ours.set_timesteps(6)
    reference.set_timesteps(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    for t in ours.timesteps:
        x = ours.step(smooth_model(x, t), t.to("meta"), x, return_dict=False)[0]
        y = reference.step(smooth_model(y, t), int(t), y, return_dict=False)[0]
    assert torch.equal(x, y)
