"""EDMEulerScheduler: stepfuse vs diffusers over whole trajectories, plus the API around step."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput
from diffusers.utils import logging

from stepfuse.integrations.edm_euler import EDMEulerScheduler
from stepfuse.solvers.edm import edm_preconditioning
from stepfuse.testing.parity import FP32_RTOL, assert_scheduler_parity, relative_error, smooth_model

logging.set_verbosity_error()  # diffusers' "call scale_model_input" warnings from the step-by-step tests

OURS, THEIRS = EDMEulerScheduler, diffusers.EDMEulerScheduler
CONFIGS = [
    {},
    {"sigma_schedule": "exponential"},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "v_prediction", "sigma_schedule": "exponential", "final_sigmas_type": "sigma_min"},
    {"sigma_min": 0.02, "sigma_max": 14.6, "sigma_data": 1.0, "rho": 5.0},
]
CHURN = [
    {"s_churn": 1.0},
    {"s_churn": 40.0, "s_noise": 1.003},  # gamma saturates at sqrt(2) - 1
    {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 5.0},  # churn on some steps only
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(OURS, THEIRS, config, steps)


@pytest.mark.parametrize("config", CONFIGS[:3], ids=str)
@pytest.mark.parametrize("step_kwargs", CHURN, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_parity_churn_same_noise(config, step_kwargs, steps):
    assert_scheduler_parity(OURS, THEIRS, config, steps, seed=3, step_kwargs=step_kwargs)


@pytest.mark.parametrize("config, step_kwargs", [({}, None), ({"prediction_type": "v_prediction"}, CHURN[0])], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_low_precision(config, step_kwargs, dtype):
    assert_scheduler_parity(OURS, THEIRS, config, 10, dtype=dtype, seed=5, step_kwargs=step_kwargs)


def test_custom_ramp_and_begin_index():
    for config in ({}, {"sigma_schedule": "exponential"}):
        ramp = torch.tensor([0.0, 0.2, 0.45, 0.7, 1.0], dtype=torch.float64)
        assert_scheduler_parity(OURS, THEIRS, config, None, set_timesteps_kwargs={"sigmas": ramp})
        assert_scheduler_parity(OURS, THEIRS, config, 12, begin_index=5)


@pytest.mark.parametrize("config, step_kwargs", [({}, {}), ({"prediction_type": "v_prediction"}, {"s_churn": 3.0})],
                         ids=str)
@pytest.mark.parametrize("return_dict", [True, False])
def test_stepwise_outputs(config, step_kwargs, return_dict):
    """Same input at every step: prev_sample and pred_original_sample agree, types match."""
    ours, theirs = OURS(**config), THEIRS(**config)
    generators = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)]
    for s in (ours, theirs):
        s.set_timesteps(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        inp = theirs.scale_model_input(x, t)
        assert torch.equal(ours.scale_model_input(x, t), inp)
        out = smooth_model(inp, t)
        results = [s.step(out, t, x, generator=g, return_dict=return_dict, **step_kwargs)
                   for s, g in zip((ours, theirs), generators)]
        if return_dict:
            assert type(results[0]) is type(results[1]) is EDMEulerSchedulerOutput
            results = [(r.prev_sample, r.pred_original_sample) for r in results]
        (prev, pred), (their_prev, their_pred) = results
        assert relative_error(prev, their_prev) <= FP32_RTOL
        assert relative_error(pred, their_pred) <= FP32_RTOL
        assert ours.step_index == theirs.step_index
        x = their_prev


def test_given_pred_original_sample():
    ours, theirs = OURS(), THEIRS()
    for s in (ours, theirs):
        s.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8) * theirs.init_noise_sigma
    for t in theirs.timesteps:
        x0 = torch.tanh(theirs.scale_model_input(x, t))
        ours.scale_model_input(x, t)
        got, ref = ours.step(x, t, x, pred_original_sample=x0), theirs.step(x, t, x, pred_original_sample=x0)
        assert relative_error(got.prev_sample, ref.prev_sample) <= FP32_RTOL
        assert got.pred_original_sample is x0
        x = ref.prev_sample


def test_schedule_state_and_api():
    config = {"sigma_schedule": "exponential", "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"}
    ours, theirs = OURS(**config), THEIRS(**config)
    assert type(OURS.from_config(theirs.config)) is OURS and dict(OURS.from_config(theirs.config).config) == dict(
        theirs.config)
    assert dict(THEIRS.from_config(ours.config).config) == dict(ours.config)
    assert ours.order == theirs.order and len(ours) == len(theirs)
    assert ours.init_noise_sigma == theirs.init_noise_sigma
    for stage in ("init", "set_timesteps"):
        if stage == "set_timesteps":
            ours.set_timesteps(9)
            theirs.set_timesteps(9)
        assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps), stage
    x0, noise = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    timesteps = theirs.timesteps[[0, 3, 5]]
    assert torch.equal(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))
    sigma = torch.tensor(2.5)
    assert torch.equal(ours.precondition_inputs(x0, sigma), theirs.precondition_inputs(x0, sigma))
    assert torch.equal(ours.precondition_noise(2.5), theirs.precondition_noise(2.5))
    assert torch.equal(ours.precondition_outputs(x0, noise, sigma), theirs.precondition_outputs(x0, noise, sigma))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_preconditioning_matches_diffusers(prediction_type):
    c_skip, c_out = edm_preconditioning(prediction_type, 3.0, 0.5)
    x, out = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    ref = THEIRS(prediction_type=prediction_type).precondition_outputs(x, out, 3.0)
    assert torch.allclose(c_skip * x + c_out * out, ref, rtol=1e-12)


@pytest.mark.parametrize("bad, key", [
    ({"sigma_schedule": "linear"}, "sigma_schedule"),
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"sigma_data": 0.0}, "sigma_data"),
    ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"),
], ids=str)
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        OURS(**bad)


def test_bad_calls():
    scheduler = OURS()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="sigmas"):
        scheduler.set_timesteps(sigmas=[0.0, 1.5])
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(x, 1, x)
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(x.numpy(), scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(x[:, :2], scheduler.timesteps[0], x)
    with pytest.raises(TypeError, match="pred_original_sample"):
        scheduler.step(x, scheduler.timesteps[0], x, pred_original_sample=1.0)
    for t in scheduler.timesteps:
        x = scheduler.step(smooth_model(x, t), t, x).prev_sample
    with pytest.raises(ValueError, match="past the schedule"):
        scheduler.step(x, scheduler.timesteps[-1], x)


@pytest.mark.parametrize("step_kwargs", [{}, {"s_churn": 2.0}], ids=str)
def test_step_makes_no_host_sync(step_kwargs):
    """The checks of tests/test_no_sync.py, for this scheduler (stepfuse.schedulers does not list it yet)."""
    from test_no_sync import ALLOWED, NoSyncMode

    scheduler = OURS()
    scheduler.set_timesteps(8)
    scheduler.set_begin_index(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16) * scheduler.init_noise_sigma
    mode = NoSyncMode()
    for t in list(scheduler.timesteps):
        out = torch.tanh(scheduler.scale_model_input(x, t))
        with mode:
            x = scheduler.step(out, t, x, generator=generator, return_dict=False, **step_kwargs)[0]
    assert not sorted(set(mode.ops) - ALLOWED)
    assert "solver_step" in mode.ops
