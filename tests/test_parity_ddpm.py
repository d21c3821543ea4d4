"""DDPMScheduler: stepfuse vs diffusers over whole trajectories (same generator, same noise)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from stepfuse.integrations.ddpm import DDPMScheduler
from stepfuse.testing.parity import assert_scheduler_parity, relative_error, smooth_model

THEIRS = diffusers.DDPMScheduler
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

CONFIGS = [
    {},  # fixed_small, clip_sample=True, leading spacing
    {"clip_sample": False},
    {"variance_type": "fixed_small_log", "clip_sample": False},
    {"variance_type": "fixed_large", "prediction_type": "sample", "clip_sample_range": 2.0},
    {**SD, "prediction_type": "v_prediction", "clip_sample": False, "steps_offset": 1},
    {"thresholding": True, "sample_max_value": 1.5},
    {"timestep_spacing": "linspace", "beta_schedule": "squaredcos_cap_v2"},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
     "clip_sample": False},
    {"beta_schedule": "sigmoid", "clip_sample": False},
    {"trained_betas": torch.linspace(1e-4, 0.02, 1000).tolist(), "clip_sample": False},
]


def _ids(value):
    text = str(value)
    return text if len(text) < 80 else text[:60] + "..."


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(DDPMScheduler, THEIRS, config, steps, shape=(2, 3, 5, 7), seed=11)


def _learned_model(x, t):
    out = smooth_model(x, t)
    # Variance channels in (0, 1): a valid variance ("learned") and interpolation weight ("learned_range").
    return torch.cat([out, 0.5 + 0.4 * torch.tanh(out)], dim=1)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
@pytest.mark.parametrize("steps", [2, 7])
def test_parity_learned_variance(variance_type, steps):
    config = {"variance_type": variance_type, "clip_sample": False}
    assert_scheduler_parity(DDPMScheduler, THEIRS, config, steps, seed=4, model=_learned_model)


def test_parity_custom_timesteps_and_bf16():
    assert_scheduler_parity(DDPMScheduler, THEIRS, {}, None, seed=2,
                            set_timesteps_kwargs={"timesteps": [999, 800, 450, 201, 30, 0]})
    assert_scheduler_parity(DDPMScheduler, THEIRS, {"clip_sample": False}, 10, dtype=torch.bfloat16, seed=5)
    assert_scheduler_parity(DDPMScheduler, THEIRS, {"thresholding": True}, 7, dtype=torch.bfloat16, seed=5)


@pytest.mark.parametrize("return_dict", [False, True])
def test_outputs_integer_timesteps_and_forward_process(return_dict):
    ours, theirs = DDPMScheduler(clip_sample=False), THEIRS(clip_sample=False)
    ours.set_timesteps(8)
    theirs.set_timesteps(8)
    x = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps.tolist()[:3]:  # Python ints, as some loops pass them
        out = smooth_model(x, t)
        z = [torch.Generator().manual_seed(t) for _ in range(2)]
        mine = ours.step(out, t, x, generator=z[0], return_dict=return_dict)
        ref = theirs.step(out, t, x, generator=z[1], return_dict=return_dict)
        if return_dict:
            assert isinstance(mine, DDPMSchedulerOutput)
            mine, ref = (mine.prev_sample, mine.pred_original_sample), (ref.prev_sample, ref.pred_original_sample)
        for a, b in zip(mine, ref):
            assert relative_error(a, b) < 1e-5
        x = mine[0]
    assert ours.previous_timestep(ours.timesteps[-1]) == -1 == int(theirs.previous_timestep(theirs.timesteps[-1]))
    timesteps = torch.tensor([999, 400, 0])
    noise = torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    x0 = x[:1].expand(3, -1, -1, -1)
    assert relative_error(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps)) < 1e-6
    assert relative_error(ours.get_velocity(x0, noise, timesteps), theirs.get_velocity(x0, noise, timesteps)) < 1e-6


def test_from_config_both_ways():
    theirs = THEIRS(**SD, variance_type="fixed_large", prediction_type="v_prediction")
    ours = DDPMScheduler.from_config(theirs.config)
    assert dict(ours.config) == dict(theirs.config)
    assert dict(THEIRS.from_config(ours.config).config) == dict(theirs.config)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod) and torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.order == 1 and ours.init_noise_sigma == 1.0 and len(ours) == 1000


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"variance_type": "fixed"}, "variance_type"),
        ({"beta_schedule": "exp"}, "beta_schedule"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ],
)
def test_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DDPMScheduler(**kwargs)


def test_bad_arguments():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDPMScheduler().step(x, 999, x)
    ours = DDPMScheduler()
    for kwargs, key in [({"num_inference_steps": 1001}, "num_inference_steps"),
                        ({"num_inference_steps": 5, "timesteps": [9, 1]}, "num_inference_steps"),
                        ({"timesteps": [1, 9]}, "descending"), ({"timesteps": [1000, 1]}, "timesteps")]:
        with pytest.raises(ValueError, match=key):
            ours.set_timesteps(**kwargs)
    with pytest.raises(ValueError, match="fixed_large_log"):
        DDPMScheduler(variance_type="fixed_large_log").set_timesteps(10)
    ours.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        ours.step(x, 998, x)
    with pytest.raises(TypeError, match="model_output"):
        ours.step(x.numpy(), ours.timesteps[0], x)
    learned = DDPMScheduler(variance_type="learned")
    learned.set_timesteps(10)
    with pytest.raises(ValueError, match="model_output"):
        learned.step(x, learned.timesteps[0], x)
