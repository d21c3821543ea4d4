"""IPNDMScheduler: stepfuse vs diffusers over whole trajectories, schedule state and API."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_utils import SchedulerOutput

import stepfuse.integrations.diffusers_base as diffusers_base
from stepfuse.integrations.ipndm import AB_WEIGHTS, IPNDMScheduler
from stepfuse.testing.parity import FP32_RTOL, assert_scheduler_parity, relative_error, smooth_model

THEIRS = diffusers.IPNDMScheduler


def _trained_betas(num_steps: int, t_max: float = 1.0) -> list:
    """A non-uniform grid (quadratic in t) from t_max down to 0, as diffusers' sin^2 betas."""
    t = t_max * np.linspace(1.0, 0.0, num_steps + 1) ** 2
    return (np.sin(t * math.pi / 2) ** 2).tolist()


@pytest.mark.parametrize("steps", [1, 2, 4, 7, 20])
def test_parity_fp32(steps):
    assert_scheduler_parity(IPNDMScheduler, THEIRS, {}, steps)


@pytest.mark.parametrize("steps, t_max", [(1, 0.9), (4, 1.0), (7, 0.8), (20, 1.0)])
def test_parity_trained_betas(steps, t_max):
    # trained_betas fixes the grid: diffusers runs len(trained_betas) - 1 steps.
    assert_scheduler_parity(IPNDMScheduler, THEIRS, {"trained_betas": _trained_betas(steps, t_max)}, steps)


@pytest.mark.parametrize("begin_index", [2, 5])
def test_begin_index(begin_index):
    # diffusers' ets list starts empty at the begin index: the warm-up restarts there.
    assert_scheduler_parity(IPNDMScheduler, THEIRS, {}, 10, begin_index=begin_index)


@pytest.mark.parametrize("config", [{}, {"trained_betas": _trained_betas(12, 0.95)}], ids=["default", "trained"])
def test_parity_bf16(config):
    assert_scheduler_parity(IPNDMScheduler, THEIRS, config, 12, dtype=torch.bfloat16)


def test_one_fused_op_per_step(monkeypatch):
    calls = []
    real = diffusers_base.solver_step

    def counting(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(diffusers_base, "solver_step", counting)
    scheduler = IPNDMScheduler()
    scheduler.set_timesteps(6)
    x = torch.randn(1, 3, 5, 7)
    for t in scheduler.timesteps:
        x = scheduler.step(smooth_model(x, t), t, x).prev_sample
    assert len(calls) == 6
    # Warm-up orders 1, 2, 3, 4, 4, 4: the output row weighs that many ring slots.
    for i, program in enumerate(calls):
        out_row = program.row(len(program.targets) - 1)
        assert sum(c != 0.0 for c in out_row[2:2 + program.num_slots]) == len(AB_WEIGHTS[min(i, 3)]) - 1
    assert calls[-1].targets == (-1,)  # the last step stores nothing


@pytest.mark.parametrize("return_dict", [True, False])
def test_stepwise_outputs(return_dict):
    ours, theirs = IPNDMScheduler(), THEIRS()
    for s in (ours, theirs):
        s.set_timesteps(7)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in theirs.timesteps:
        assert torch.equal(ours.scale_model_input(x, t), theirs.scale_model_input(x, t))
        out = smooth_model(x, t)
        results = [s.step(out, t, x, return_dict=return_dict) for s in (ours, theirs)]
        assert type(results[0]) is type(results[1])
        if return_dict:
            assert isinstance(results[0], SchedulerOutput)
            results = [(r.prev_sample,) for r in results]
        assert len(results[0]) == 1
        assert relative_error(results[0][0], results[1][0]) <= FP32_RTOL
        assert ours.step_index == theirs.step_index
        x = results[1][0]


@pytest.mark.parametrize("config", [{}, {"num_train_timesteps": 50}, {"trained_betas": _trained_betas(9, 0.9)}],
                         ids=["default", "short", "trained"])
def test_schedule_state_matches(config):
    ours = IPNDMScheduler(**config)
    theirs = THEIRS.from_config(ours.config)
    again = IPNDMScheduler.from_config(theirs.config)
    assert type(again) is IPNDMScheduler and dict(again.config) == dict(ours.config)
    assert ours.order == theirs.order and len(ours) == len(theirs)
    assert ours.init_noise_sigma == theirs.init_noise_sigma and ours.pndm_order == theirs.pndm_order
    for stage in ("init", "set_timesteps"):
        if stage == "set_timesteps":
            ours.set_timesteps(9)
            theirs.set_timesteps(9)
        for attr in ("betas", "alphas", "timesteps"):
            assert torch.equal(getattr(ours, attr), getattr(theirs, attr)), (stage, attr)
        assert ours.step_index is None and ours.begin_index is None
    ours.set_begin_index(3)
    assert ours.begin_index == 3


@pytest.mark.parametrize("bad, error, key", [
    ({"num_train_timesteps": 0}, ValueError, "num_train_timesteps"),
    ({"trained_betas": [[0.5, 0.1]]}, ValueError, "trained_betas"),
    ({"trained_betas": [0.5]}, ValueError, "trained_betas"),
    ({"trained_betas": [1.5, 0.0]}, ValueError, "trained_betas"),
    ({"trained_betas": [float("nan"), 0.0]}, ValueError, "trained_betas"),
    ({"trained_betas": ["a", "b"]}, TypeError, "trained_betas"),
], ids=str)
def test_bad_config_names_the_key(bad, error, key):
    with pytest.raises(error, match=key):
        IPNDMScheduler(**bad)


def test_bad_calls():
    scheduler = IPNDMScheduler()
    for steps in (0, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(steps)
    scheduler.set_timesteps(2)
    t = scheduler.timesteps
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(x.numpy(), t[0], x)
    with pytest.raises(TypeError, match="sample"):
        scheduler.step(x, t[0], x.numpy())
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(-1)
    x = scheduler.step(x, t[0], x).prev_sample
    with pytest.raises(ValueError, match="sample changed"):
        scheduler.step(x[:, :2], t[1], x[:, :2])
    x = scheduler.step(x, t[1], x).prev_sample
    with pytest.raises(ValueError, match="past the schedule"):
        scheduler.step(x, t[1], x)
