"""FlowMatchEulerDiscreteScheduler: stepfuse vs diffusers over whole trajectories, plus the API around step."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from stepfuse.schedulers import FlowMatchEulerDiscreteScheduler
from stepfuse.testing.parity import assert_scheduler_parity, relative_error, smooth_model

THEIRS = diffusers.FlowMatchEulerDiscreteScheduler
OURS = FlowMatchEulerDiscreteScheduler

CONFIGS = [
    {},
    {"shift": 3.0},
    {"shift": 3.0, "shift_terminal": 0.1},
    {"use_karras_sigmas": True, "shift": 3.0},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True, "shift": 2.0},
    {"invert_sigmas": True},
    {"num_train_timesteps": 500, "shift": 5.0},
]
STOCHASTIC = [{"stochastic_sampling": True}, {"stochastic_sampling": True, "shift": 3.0, "use_karras_sigmas": True}]
DYNAMIC = [  # (config, mu)
    ({"use_dynamic_shifting": True}, 0.5),
    ({"use_dynamic_shifting": True}, 1.15),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.5),
    ({"use_dynamic_shifting": True, "shift_terminal": 0.02, "use_exponential_sigmas": True}, 0.9),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 5, 12, 25])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_parity_fp32(config, steps):
    if steps == 1 and config.get("shift_terminal"):
        # One sigma cannot be stretched to shift_terminal: diffusers divides by zero, we refuse.
        theirs = THEIRS(**config)
        theirs.set_timesteps(1)
        assert not torch.isfinite(theirs.sigmas).all()
        with pytest.raises(ValueError, match="shift_terminal"):
            OURS(**config).set_timesteps(1)
        return
    assert_scheduler_parity(OURS, THEIRS, config, steps)


@pytest.mark.parametrize("config", STOCHASTIC, ids=str)
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_parity_stochastic_same_noise(config, steps):
    assert_scheduler_parity(OURS, THEIRS, config, steps, seed=123)


@pytest.mark.parametrize("config,mu", DYNAMIC, ids=str)
@pytest.mark.parametrize("steps", [4, 28])
def test_parity_dynamic_shifting_mu(config, mu, steps):
    assert_scheduler_parity(OURS, THEIRS, config, steps, set_timesteps_kwargs={"mu": mu})


@pytest.mark.parametrize(
    "config,kwargs",
    [
        ({}, {"sigmas": [1.0, 0.8, 0.55, 0.3, 0.1]}),
        ({"shift": 3.0}, {"sigmas": [0.9, 0.7, 0.4, 0.05]}),
        ({}, {"timesteps": [1000.0, 750.0, 420.5, 100.0]}),
        ({"shift": 3.0}, {"sigmas": [1.0, 0.6, 0.2], "timesteps": [999.0, 500.0, 100.0]}),
        ({"use_dynamic_shifting": True}, {"sigmas": [1.0, 0.75, 0.5, 0.25], "mu": 0.7}),
    ],
    ids=str,
)
def test_parity_custom_sigmas_and_timesteps(config, kwargs):
    assert_scheduler_parity(OURS, THEIRS, config, None, set_timesteps_kwargs=kwargs)


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, STOCHASTIC[0]], ids=str)
def test_parity_begin_index(config):
    assert_scheduler_parity(OURS, THEIRS, config, 20, begin_index=8, seed=7)


@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, STOCHASTIC[0]], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_low_precision(config, dtype):
    assert_scheduler_parity(OURS, THEIRS, config, 10, dtype=dtype, seed=5)


def test_init_tables_match_diffusers_bit_for_bit():
    for config in CONFIGS + [{"use_dynamic_shifting": True}]:
        ours, theirs = OURS(**config), THEIRS(**config)
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas), config
        assert (ours.sigma_min, ours.sigma_max, ours.shift) == (theirs.sigma_min, theirs.sigma_max, theirs.shift)


def _pair(config=None, steps=10, **kwargs):
    ours, theirs = OURS(**(config or {})), THEIRS(**(config or {}))
    ours.set_timesteps(steps, **kwargs)
    theirs.set_timesteps(steps, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("return_dict", [False, True])
def test_return_types(return_dict):
    ours, theirs = _pair()
    x = torch.randn(2, 4, 8, 8)
    t = ours.timesteps[0]
    mine, ref = ours.step(smooth_model(x, t), t, x, return_dict=return_dict), theirs.step(
        smooth_model(x, t), t, x, return_dict=return_dict
    )
    if return_dict:
        assert isinstance(mine, FlowMatchEulerDiscreteSchedulerOutput)
        mine, ref = mine.to_tuple(), ref.to_tuple()
    assert type(mine) is tuple and len(mine) == len(ref) == 1
    assert relative_error(mine[0], ref[0]) < 1e-6
    assert ours.step_index == theirs.step_index == 1


def test_set_shift():
    for kwargs in ({}, {"sigmas": [1.0, 0.7, 0.4, 0.1]}, {"timesteps": [1000.0, 600.0, 300.0, 50.0]}):
        ours, theirs = OURS(shift=2.0), THEIRS(shift=2.0)
        ours.set_shift(4.5)
        theirs.set_shift(4.5)
        steps = None if kwargs else 12
        ours.set_timesteps(steps, **kwargs)
        theirs.set_timesteps(steps, **kwargs)
        assert ours.shift == theirs.shift == 4.5
        torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-6, atol=1e-4)


def test_scale_noise():
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    ours, theirs = _pair({"shift": 3.0})
    t = ours.timesteps[[1, 4, 7]]
    assert relative_error(ours.scale_noise(x0, t, noise), theirs.scale_noise(x0, t, noise)) < 1e-6
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(4)  # img2img: every sample at the begin index
    t = ours.timesteps[4:5].expand(3)
    assert relative_error(ours.scale_noise(x0, t, noise), theirs.scale_noise(x0, t, noise)) < 1e-6
    # Before set_timesteps the training schedule is used.
    t = OURS().timesteps[[0, 500, 999]]
    assert relative_error(OURS().scale_noise(x0, t, noise), THEIRS().scale_noise(x0, t, noise)) < 1e-6


def test_mixed_dtype_returns_model_output_dtype():
    ours, theirs = _pair()
    x = torch.randn(2, 4, 8, 8)
    t = ours.timesteps[0]
    out = smooth_model(x, t).to(torch.bfloat16)
    mine, ref = ours.step(out, t, x, return_dict=False)[0], theirs.step(out, t, x, return_dict=False)[0]
    assert mine.dtype == ref.dtype == torch.bfloat16
    assert relative_error(mine, ref) <= relative_error(ref, x + (ours.sigmas[1] - ours.sigmas[0]) * out.float()) * 2


def test_from_config_both_ways():
    theirs = THEIRS(shift=3.0, use_dynamic_shifting=True, base_shift=0.4, max_image_seq_len=8192)
    ours = OURS.from_config(theirs.config)
    assert dict(ours.config) == dict(theirs.config)
    back = THEIRS.from_config(ours.config)
    assert dict(back.config) == dict(theirs.config)
    assert ours.order == 1 and len(ours) == 1000


def test_time_shift_helpers():
    config = {"time_shift_type": "linear", "shift_terminal": 0.1}
    ours, theirs = OURS(**config), THEIRS(**config)
    t = torch.linspace(0.9, 0.1, 5, dtype=torch.float64)
    torch.testing.assert_close(ours.time_shift(1.3, 1.0, t), theirs.time_shift(1.3, 1.0, t))
    torch.testing.assert_close(ours.stretch_shift_to_terminal(t), theirs.stretch_shift_to_terminal(t))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_"),
        ({"time_shift_type": "cosine"}, "time_shift_type"),
        ({"shift": 0.0}, "shift"),
        ({"shift_terminal": 1.5}, "shift_terminal"),
    ],
)
def test_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OURS(**kwargs)


def test_bad_step_arguments():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        OURS().step(x, torch.tensor(1000.0), x)
    with pytest.raises(ValueError, match="mu"):
        OURS(use_dynamic_shifting=True).set_timesteps(10)
    ours, _ = _pair(steps=2)
    with pytest.raises(ValueError, match="integer"):
        ours.step(x, 0, x)
    with pytest.raises(ValueError, match="integer"):
        ours.step(x, torch.tensor(999), x)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        ours.step(x, ours.timesteps[0], x, per_token_timesteps=torch.full((1, 64), 999.0))
    with pytest.raises(ValueError, match="noise"):
        ours.scale_noise(x, ours.timesteps[:1])
    for t in ours.timesteps:
        x = ours.step(smooth_model(x, t), t, x, return_dict=False)[0]
    with pytest.raises(ValueError, match="past the schedule"):
        ours.step(x, ours.timesteps[-1], x)
