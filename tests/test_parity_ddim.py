"""DDIMScheduler: stepfuse vs diffusers over whole trajectories, plus the diffusers API around step."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput

from stepfuse.schedulers import DDIMScheduler
from stepfuse.testing.parity import assert_scheduler_parity, relative_error, smooth_model

THEIRS = diffusers.DDIMScheduler
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

CONFIGS = [
    {},  # clip_sample=True, leading spacing
    {"clip_sample": False},
    {"clip_sample": False, "set_alpha_to_one": False},
    {"clip_sample_range": 2.5, "prediction_type": "sample"},
    {"prediction_type": "sample", "clip_sample": False},
    {**SD, "prediction_type": "v_prediction", "clip_sample": False},
    {**SD, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
    {"thresholding": True, "sample_max_value": 1.5},
    {"thresholding": True, "prediction_type": "v_prediction", "dynamic_thresholding_ratio": 0.9,
     "sample_max_value": 2.0},
    {"timestep_spacing": "linspace", "clip_sample": False},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
     "clip_sample": False},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "sample"},
    {"beta_schedule": "squaredcos_cap_v2", "set_alpha_to_one": False},
    {"trained_betas": torch.linspace(1e-4, 0.02, 1000).tolist(), "clip_sample": False},
]
NOISY = [  # (config, step kwargs)
    ({"clip_sample": False}, {"eta": 1.0}),
    ({"clip_sample": False}, {"eta": 0.3}),
    ({}, {"eta": 0.5}),
    ({}, {"eta": 1.0, "use_clipped_model_output": True}),
    ({"thresholding": True, "sample_max_value": 1.5}, {"eta": 0.7, "use_clipped_model_output": True}),
    ({**SD, "prediction_type": "v_prediction", "clip_sample": False}, {"eta": 1.0, "use_clipped_model_output": True}),
    ({"prediction_type": "sample", "clip_sample_range": 2.0}, {"eta": 0.5}),
]


def _ids(value):
    text = str(value)
    return text if len(text) < 80 else text[:60] + "..."


@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
@pytest.mark.parametrize("steps", [1, 2, 5, 12, 25])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(DDIMScheduler, THEIRS, config, steps)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[7]], ids=_ids)
def test_parity_clipped_model_output_deterministic(config):
    assert_scheduler_parity(DDIMScheduler, THEIRS, config, 10, step_kwargs={"use_clipped_model_output": True})


@pytest.mark.parametrize("config,step_kwargs", NOISY, ids=_ids)
@pytest.mark.parametrize("steps", [3, 12])
def test_parity_eta_same_noise(config, step_kwargs, steps):
    assert_scheduler_parity(DDIMScheduler, THEIRS, config, steps, seed=123, step_kwargs=step_kwargs)


@pytest.mark.parametrize(
    "config,step_kwargs", [({}, {}), (CONFIGS[5], {}), (CONFIGS[7], {}), NOISY[0], NOISY[3]], ids=_ids
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_low_precision(config, step_kwargs, dtype):
    assert_scheduler_parity(DDIMScheduler, THEIRS, config, 10, dtype=dtype, seed=5, step_kwargs=step_kwargs)


def test_tables_match_diffusers_bit_for_bit():
    for config in CONFIGS:
        ours, theirs = DDIMScheduler(**config), THEIRS(**config)
        for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod"):
            assert torch.equal(getattr(ours, name), getattr(theirs, name)), (config, name)
        assert torch.equal(ours.timesteps, theirs.timesteps)


def _pair(config=None, steps=10):
    ours, theirs = DDIMScheduler(**(config or {})), THEIRS(**(config or {}))
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    return ours, theirs


@pytest.mark.parametrize("config", [{}, {"clip_sample": False}, {"thresholding": True}], ids=_ids)
@pytest.mark.parametrize("return_dict", [False, True])
def test_outputs_and_pred_original(config, return_dict):
    ours, theirs = _pair(config)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps[:4]:
        out = smooth_model(x, t)
        mine, ref = ours.step(out, t, x, return_dict=return_dict), theirs.step(out, t, x, return_dict=return_dict)
        if return_dict:
            assert isinstance(mine, DDIMSchedulerOutput)
            mine, ref = (mine.prev_sample, mine.pred_original_sample), (ref.prev_sample, ref.pred_original_sample)
        assert len(mine) == len(ref) == 2
        for a, b in zip(mine, ref):
            assert relative_error(a, b) < 1e-5
        x = mine[0]


def test_variance_noise():
    ours, theirs = _pair({"clip_sample": False})
    x = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(1))  # odd sizes
    y = x.clone()
    for i, t in enumerate(ours.timesteps):
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        x = ours.step(smooth_model(x, t), t, x, eta=0.8, variance_noise=z).prev_sample
        y = theirs.step(smooth_model(y, t), t, y, eta=0.8, variance_noise=z).prev_sample
    assert relative_error(x, y) < 1e-5


def test_begin_index_and_mid_schedule_start():
    # diffusers' DDIM has no begin index: its steps follow the timestep values alone.
    for use_begin_index in (True, False):
        ours, theirs = _pair({"clip_sample": False}, 20)
        if use_begin_index:
            ours.set_begin_index(8)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        y = x.clone()
        for t in ours.timesteps[8:]:
            x = ours.step(smooth_model(x, t), t, x, return_dict=False)[0]
            y = theirs.step(smooth_model(y, t), t, y, return_dict=False)[0]
        assert relative_error(x, y) < 1e-5


def test_tensor_timesteps_follow_the_step_index():
    # A timestep tensor is never read (on a GPU that would sync); a meta tensor cannot be read at all.
    ours, reference = DDIMScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    ours.set_timesteps(10)
    reference.set_timesteps(10)
    ours.set_begin_index(0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    for t in ours.timesteps:
        x = ours.step(smooth_model(x, t), t.to("meta"), x, return_dict=False)[0]
        y = reference.step(smooth_model(y, t), t, y, return_dict=False)[0]
    assert torch.equal(x, y)
    with pytest.raises(ValueError, match="past the schedule"):
        ours.step(x, ours.timesteps[-1].to("meta"), x)


def test_integer_timesteps_are_followed_out_of_order():
    # Python ints are read for free: repeating one (inversion loops do) gives diffusers' result.
    ours, theirs = _pair({"clip_sample": False})
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    y = x.clone()
    for t in [901, 901, 500, 601, 1]:
        x = ours.step(smooth_model(x, t), t, x, return_dict=False)[0]
        y = theirs.step(smooth_model(y, t), t, y, return_dict=False)[0]
    assert relative_error(x, y) < 1e-5


def test_add_noise_velocity_and_variance():
    ours, theirs = _pair(SD)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    timesteps = torch.tensor([999, 500, 3])
    for dtype in (torch.float32, torch.float16):
        x, z = x0.to(dtype), noise.to(dtype)
        a, b = ours.add_noise(x, z, timesteps), theirs.add_noise(x, z, timesteps)
        assert a.dtype == dtype and relative_error(a, b) < (1e-6 if dtype == torch.float32 else 2e-3)
    assert relative_error(ours.get_velocity(x0, noise, timesteps), theirs.get_velocity(x0, noise, timesteps)) < 1e-6
    for t, prev in [(981, 881), (81, -19)]:
        assert abs(float(ours._get_variance(t, prev)) - float(theirs._get_variance(t, prev))) < 1e-7


def test_from_config_both_ways():
    theirs = THEIRS(**SD, clip_sample=False, prediction_type="v_prediction")
    ours = DDIMScheduler.from_config(theirs.config)
    assert dict(ours.config) == dict(theirs.config)
    back = THEIRS.from_config(ours.config)
    assert dict(back.config) == dict(theirs.config)
    assert ours.scale_model_input(torch.ones(2), 5).equal(torch.ones(2))
    assert ours.order == 1 and ours.init_noise_sigma == 1.0 and len(ours) == 1000


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"beta_schedule": "exp"}, "beta_schedule"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
    ],
)
def test_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DDIMScheduler(**kwargs)


def test_bad_step_arguments():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(x, 999, x)
    ours, _ = _pair()
    t = ours.timesteps[0]
    with pytest.raises(ValueError, match="eta"):
        ours.step(x, t, x, eta=-0.5)
    with pytest.raises(ValueError, match="eta"):
        ours.step(x, t, x, eta=3.0)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        ours.step(x, t, x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="timestep"):
        ours.step(x, 1000, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DDIMScheduler().set_timesteps(1001)
    # Zero terminal SNR: x0 is undefined at t = 999 for epsilon prediction (diffusers returns NaN).
    zsnr = DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    zsnr.set_timesteps(10)
    with pytest.raises(ValueError, match="v_prediction"):
        zsnr.step(x, zsnr.timesteps[0], x)
