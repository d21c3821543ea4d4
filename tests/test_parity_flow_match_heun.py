"""FlowMatchHeunDiscreteScheduler: stepfuse vs diffusers over whole trajectories, plus the API around step."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_flow_match_heun_discrete import FlowMatchHeunDiscreteSchedulerOutput

from stepfuse.integrations.flow_match_heun import FlowMatchHeunDiscreteScheduler
from stepfuse.testing.parity import assert_scheduler_parity, relative_error, smooth_model

THEIRS = diffusers.FlowMatchHeunDiscreteScheduler
OURS = FlowMatchHeunDiscreteScheduler
CONFIGS = [{}, {"shift": 3.0}]
CHURN = [{"s_churn": 1.0}, {"s_churn": 4.0, "s_tmin": 0.2, "s_tmax": 0.9, "s_noise": 1.003}]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(OURS, THEIRS, config, steps)


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("churn", CHURN, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_parity_churn_same_noise(config, churn, steps):
    assert_scheduler_parity(OURS, THEIRS, config, steps, seed=11, step_kwargs=churn)


@pytest.mark.parametrize("config,churn", [({}, None), ({"shift": 3.0}, CHURN[0])], ids=str)
def test_parity_bf16(config, churn):
    assert_scheduler_parity(OURS, THEIRS, config, 7, dtype=torch.bfloat16, seed=5, step_kwargs=churn)


@pytest.mark.parametrize("begin_index", [3, 4])
def test_parity_begin_index(begin_index):
    assert_scheduler_parity(OURS, THEIRS, {"shift": 3.0}, 7, begin_index=begin_index)


def _pair(config=None, steps=7):
    ours, theirs = OURS(**(config or {})), THEIRS(**(config or {}))
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    return ours, theirs


def test_tables_match_diffusers_bit_for_bit():
    for config in CONFIGS + [{"num_train_timesteps": 500, "shift": 5.0}]:
        ours, theirs = OURS(**config), THEIRS(**config)
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas), config
        assert (ours.sigma_min, ours.sigma_max) == (theirs.sigma_min, theirs.sigma_max)
        for steps in (1, 2, 9):
            ours.set_timesteps(steps)
            theirs.set_timesteps(steps)
            assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
            assert ours.num_inference_steps == theirs.num_inference_steps == steps


@pytest.mark.parametrize("return_dict", [False, True])
def test_return_types_and_stage_state(return_dict):
    ours, theirs = _pair()
    x = torch.randn(2, 4, 8, 8)
    for t in ours.timesteps[:3]:
        assert ours.state_in_first_order == theirs.state_in_first_order
        out = smooth_model(x, t)
        mine, ref = ours.step(out, t, x, return_dict=return_dict), theirs.step(out, t, x, return_dict=return_dict)
        if return_dict:
            assert isinstance(mine, FlowMatchHeunDiscreteSchedulerOutput)
            mine, ref = mine.to_tuple(), ref.to_tuple()
        assert type(mine) is tuple and len(mine) == len(ref) == 1
        assert relative_error(mine[0], ref[0]) < 1e-6
        assert ours.step_index == theirs.step_index
        x = ref[0]
    assert ours.last_program is not None and ours.order == 2 and len(ours) == 1000


def test_scale_noise_and_begin_index():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    ours, theirs = _pair({"shift": 3.0})
    t = ours.timesteps[3]
    assert relative_error(ours.scale_noise(x0, t, noise), theirs.scale_noise(x0, t, noise)) < 1e-6
    assert ours.step_index == theirs.step_index == 4  # the second of the duplicated timesteps
    ours, theirs = _pair()
    for scheduler in (ours, theirs):
        scheduler.set_begin_index(5)
    assert ours.begin_index == theirs.begin_index == 5
    assert relative_error(ours.scale_noise(x0, t, noise), theirs.scale_noise(x0, t, noise)) < 1e-6


def test_mixed_dtype_returns_model_output_dtype():
    ours, theirs = _pair()
    x = torch.randn(2, 4, 8, 8)
    t = ours.timesteps[0]
    out = smooth_model(x, t).to(torch.bfloat16)
    mine, ref = ours.step(out, t, x, return_dict=False)[0], theirs.step(out, t, x, return_dict=False)[0]
    assert mine.dtype == ref.dtype == torch.bfloat16
    assert relative_error(mine, ref) < 1e-2


def test_from_config_both_ways():
    theirs = THEIRS(num_train_timesteps=800, shift=2.5)
    ours = OURS.from_config(theirs.config)
    assert dict(ours.config) == dict(theirs.config)
    assert dict(THEIRS.from_config(ours.config).config) == dict(theirs.config)


@pytest.mark.parametrize("kwargs,key", [({"shift": 0.0}, "shift"), ({"num_train_timesteps": 0}, "num_train_timesteps")])
def test_bad_config(kwargs, key):
    with pytest.raises(ValueError, match=key):
        OURS(**kwargs)


def test_bad_step_arguments():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        OURS().step(x, torch.tensor(1000.0), x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        OURS().set_timesteps(0)
    ours, _ = _pair(steps=2)
    with pytest.raises(ValueError, match="integer"):
        ours.step(x, 0, x)
    with pytest.raises(ValueError, match="integer"):
        ours.step(x, torch.tensor(999), x)
    with pytest.raises(ValueError, match="s_churn"):
        ours.step(x, ours.timesteps[0], x, s_churn=-1.0)
    with pytest.raises(ValueError, match="s_noise"):
        ours.step(x, ours.timesteps[0], x, s_noise=float("nan"))
    with pytest.raises(TypeError, match="model_output"):
        ours.step(x.numpy(), ours.timesteps[0], x)
    with pytest.raises(ValueError, match="noise"):
        ours.scale_noise(x, ours.timesteps[0], x[:, :2])
    for t in ours.timesteps:
        x = ours.step(smooth_model(x, t), t, x, return_dict=False)[0]
    with pytest.raises(ValueError, match="past the schedule"):
        ours.step(x, ours.timesteps[-1], x)
