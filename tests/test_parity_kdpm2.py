"""KDPM2 and KDPM2-ancestral: stepfuse vs diffusers over whole trajectories, step by step and API."""

from __future__ import annotations

import diffusers
import pytest
import torch

from stepfuse.integrations.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from stepfuse.testing.parity import FP32_RTOL, assert_same_construction, assert_scheduler_parity, relative_error, smooth_model

OURS = {"KDPM2DiscreteScheduler": KDPM2DiscreteScheduler,
        "KDPM2AncestralDiscreteScheduler": KDPM2AncestralDiscreteScheduler}
SEED = {"KDPM2DiscreteScheduler": None, "KDPM2AncestralDiscreteScheduler": 3}
CONFIGS = [
    {},
    {"prediction_type": "v_prediction"},
    {"use_karras_sigmas": True, "beta_schedule": "scaled_linear"},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True, "prediction_type": "v_prediction"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing", "beta_schedule": "scaled_linear"},
]


def _classes(name):
    return OURS[name], getattr(diffusers, name)


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_parity_fp32(name, config, steps):
    assert_scheduler_parity(*_classes(name), config, steps, seed=SEED[name], shape=(1, 3, 8, 8))


def test_parity_cosine_schedule():
    # Not for the ancestral variant: there diffusers' float32 sigma_down cancels to 0 from the huge
    # first sigma of this schedule and its midpoint is NaN (stepfuse's plan refuses non-finite coefficients).
    assert_scheduler_parity(*_classes("KDPM2DiscreteScheduler"),
                            {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}, 7)


@pytest.mark.parametrize("name, begin_index", [
    ("KDPM2DiscreteScheduler", 6),
    ("KDPM2DiscreteScheduler", 5),  # odd: diffusers starts with a first stage anyway
    ("KDPM2AncestralDiscreteScheduler", 6),  # odd ones end on a second stage at sigma 0: rejected, see below
], ids=str)
def test_begin_index(name, begin_index):
    assert_scheduler_parity(*_classes(name), {}, 12, seed=SEED[name], begin_index=begin_index)


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True, "prediction_type": "v_prediction"}], ids=str)
def test_parity_bf16(name, config):
    assert_scheduler_parity(*_classes(name), config, 8, dtype=torch.bfloat16, seed=SEED[name])


def test_sample_prediction_matches_epsilon():
    """diffusers rejects prediction_type="sample" at step(); stepfuse runs it: x0 = x - sigma eps, same path."""
    runs = []
    for prediction_type in ("epsilon", "sample"):
        scheduler = KDPM2DiscreteScheduler(prediction_type=prediction_type)
        scheduler.set_timesteps(5)
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            first, i = scheduler.state_in_first_order, scheduler.step_index or 0
            inp = scheduler.scale_model_input(x, t)
            sigma = float((scheduler.sigmas if first else scheduler.sigmas_interpol)[i])
            eps = smooth_model(inp, t)
            x = scheduler.step(eps if prediction_type == "epsilon" else x - sigma * eps, t, x).prev_sample
        runs.append(x)
    assert relative_error(runs[1], runs[0]) < 1e-5


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("return_dict", [True, False])
def test_stepwise_outputs(name, return_dict):
    """Both schedulers get the same input at every step; outputs, stage and generator stream agree."""
    ours_cls, theirs_cls = _classes(name)
    ours = ours_cls(prediction_type="v_prediction")
    theirs = theirs_cls.from_config(ours.config)
    generators = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)]
    for s in (ours, theirs):
        s.set_timesteps(5)
    assert ours.num_inference_steps == theirs.num_inference_steps
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * float(theirs.init_noise_sigma)
    for t in theirs.timesteps:
        assert ours.state_in_first_order == theirs.state_in_first_order
        inp = theirs.scale_model_input(x, t)
        assert torch.equal(ours.scale_model_input(x, t), inp)
        out = smooth_model(inp, t)
        extra = [{"generator": g} if SEED[name] is not None else {} for g in generators]
        results = [s.step(out, t, x, return_dict=return_dict, **e) for s, e in zip((ours, theirs), extra)]
        if return_dict:
            assert type(results[0]) is type(results[1])
            results = [(r.prev_sample, r.pred_original_sample) for r in results]
        (prev, pred), (their_prev, their_pred) = results
        assert relative_error(prev, their_prev) <= FP32_RTOL
        assert relative_error(pred, their_pred) <= FP32_RTOL
        assert ours.step_index == theirs.step_index
        x = their_prev
    assert torch.equal(torch.randn(3, generator=generators[0]), torch.randn(3, generator=generators[1]))


def test_ancestral_philox_noise_is_deterministic():
    runs = []
    for _ in range(2):
        scheduler = KDPM2AncestralDiscreteScheduler()
        scheduler.philox_seed = 7
        scheduler.set_timesteps(3)
        x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(smooth_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        runs.append(x)
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("config", [{"beta_schedule": "scaled_linear"}, {"use_karras_sigmas": True},
                                    {"use_exponential_sigmas": True, "timestep_spacing": "trailing"}], ids=str)
def test_schedule_state_matches(name, config):
    ours_cls, theirs_cls = _classes(name)
    ours = ours_cls(**config)
    theirs = assert_same_construction(ours_cls, theirs_cls, ours)
    ours.set_timesteps(9)
    theirs.set_timesteps(9)
    arrays = ["sigmas", "timesteps", "log_sigmas"] + (["sigmas_up", "sigmas_down"] if "Ancestral" in name else [])
    for attr in arrays:  # sigmas_up ends in NaN (0 / 0) in both
        torch.testing.assert_close(getattr(ours, attr), getattr(theirs, attr), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours.sigmas_interpol[1:], theirs.sigmas_interpol[1:])  # entry 0 is unused (NaN in KDPM2)
    assert ours.init_noise_sigma == float(theirs.init_noise_sigma)
    x0, noise = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    timesteps = theirs.timesteps[[0, 4, 8]]
    assert torch.equal(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))


@pytest.mark.parametrize("name", list(OURS))
@pytest.mark.parametrize("bad, key", [
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"beta_schedule": "exp"}, "beta_schedule"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"use_exponential_sigmas": True, "use_karras_sigmas": True}, "use_"),
], ids=str)
def test_bad_config_names_the_key(name, bad, key):
    with pytest.raises(ValueError, match=key):
        OURS[name](**bad)


@pytest.mark.parametrize("name", list(OURS))
def test_bad_calls(name):
    scheduler = OURS[name]()
    with pytest.raises(ValueError, match="num_train_timesteps"):
        scheduler.set_timesteps(4, num_train_timesteps=500)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(TypeError, match="sample"):
        scheduler.step(x, scheduler.timesteps[0], None)
    generator = torch.Generator().manual_seed(0)
    kwargs = {"generator": generator} if SEED[name] is not None else {}
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x, **kwargs).prev_sample
    with pytest.raises(ValueError, match="past the schedule"):
        scheduler.step(x, scheduler.timesteps[-1], x, **kwargs)


def test_ancestral_second_stage_on_sigma_zero_is_rejected():
    """An odd begin index can make the last step a second stage at sigma_mid = 0 (diffusers divides by 0)."""
    scheduler = KDPM2AncestralDiscreteScheduler()
    scheduler.set_timesteps(3)
    scheduler.set_begin_index(1)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.step(x, scheduler.timesteps[1], x, generator=torch.Generator().manual_seed(0))
