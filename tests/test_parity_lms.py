"""LMSDiscreteScheduler: stepfuse vs diffusers over whole trajectories, coefficients and API."""

from __future__ import annotations

import warnings

import diffusers
import pytest
import torch

from stepfuse.integrations.k_diffusion import _lagrange_integrals
from stepfuse.integrations.lms import LMSDiscreteScheduler
from stepfuse.testing.parity import FP32_RTOL, assert_same_construction, assert_scheduler_parity, relative_error, smooth_model

pytestmark = pytest.mark.filterwarnings("ignore:.*scale_model_input")

THEIRS = diffusers.LMSDiscreteScheduler
SCALED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
CONFIGS = [
    {},
    {"prediction_type": "v_prediction", **SCALED},
    {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"},
    {"use_karras_sigmas": True, **SCALED},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True, "prediction_type": "v_prediction"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing"},
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(LMSDiscreteScheduler, THEIRS, config, steps)


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_parity_order(order):
    assert_scheduler_parity(LMSDiscreteScheduler, THEIRS, {"use_karras_sigmas": True}, 9, step_kwargs={"order": order})


@pytest.mark.parametrize("begin_index", [3, 6])
def test_begin_index(begin_index):
    assert_scheduler_parity(LMSDiscreteScheduler, THEIRS, SCALED, 10, begin_index=begin_index)


@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True, "prediction_type": "v_prediction"}], ids=str)
def test_parity_bf16(config):
    assert_scheduler_parity(LMSDiscreteScheduler, THEIRS, config, 10, dtype=torch.bfloat16)


def test_coefficients_match_scipy_quad():
    """The exact float64 integrals agree with diffusers' per-step scipy quadrature to ~1e-6."""
    ours, theirs = LMSDiscreteScheduler(use_karras_sigmas=True), THEIRS(use_karras_sigmas=True)
    for s in (ours, theirs):
        s.set_timesteps(8)
    sigmas = ours.sigmas.double().tolist()
    plan = ours._plan(0)
    for i in range(8):
        order = min(i + 1, 4)
        expected = [theirs.get_lms_coefficient(order, i, k) for k in range(order)]
        got = _lagrange_integrals([sigmas[i - k] for k in range(order)], sigmas[i], sigmas[i + 1])
        for a, b in zip(got, expected):
            assert abs(a - b) <= 1e-6 * max(abs(b), 1e-3)
        # epsilon: the slope is the model output, so the output row weighs it by c_0.
        assert abs(plan[i].row(len(plan[i].targets) - 1)[1] - got[0]) <= 1e-12 * abs(got[0])


@pytest.mark.parametrize("return_dict", [True, False])
def test_stepwise_outputs(return_dict):
    ours, theirs = LMSDiscreteScheduler(prediction_type="v_prediction"), THEIRS(prediction_type="v_prediction")
    for s in (ours, theirs):
        s.set_timesteps(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * float(theirs.init_noise_sigma)
    for t in theirs.timesteps:
        inp = theirs.scale_model_input(x, t)
        assert torch.equal(ours.scale_model_input(x, t), inp)
        out = smooth_model(inp, t)
        results = [s.step(out, t, x, return_dict=return_dict) for s in (ours, theirs)]
        if return_dict:
            assert type(results[0]) is type(results[1])
            results = [(r.prev_sample, r.pred_original_sample) for r in results]
        (prev, pred), (their_prev, their_pred) = results
        assert relative_error(prev, their_prev) <= FP32_RTOL
        assert relative_error(pred, their_pred) <= FP32_RTOL
        assert ours.step_index == theirs.step_index
        x = their_prev


@pytest.mark.parametrize("config", [SCALED, {"timestep_spacing": "leading", "use_karras_sigmas": True}],
                         ids=str)
def test_schedule_state_matches(config):
    ours = LMSDiscreteScheduler(**config)
    theirs = assert_same_construction(LMSDiscreteScheduler, THEIRS, ours)
    for stage in ("init", "set_timesteps"):
        if stage == "set_timesteps":
            ours.set_timesteps(9)
            theirs.set_timesteps(9)
        assert torch.equal(ours.sigmas, theirs.sigmas), stage
        assert torch.equal(ours.timesteps, theirs.timesteps), stage
        assert ours.init_noise_sigma == float(theirs.init_noise_sigma), stage
    x0, noise = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    timesteps = theirs.timesteps[[0, 3, 5]]
    assert torch.equal(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))


@pytest.mark.parametrize("bad, key", [
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ({"beta_schedule": "exp"}, "beta_schedule"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_"),
], ids=str)
def test_bad_config_names_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        LMSDiscreteScheduler(**bad)


def test_bad_calls():
    scheduler = LMSDiscreteScheduler()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(3)
    t = scheduler.timesteps
    with pytest.raises(ValueError, match="order"):
        scheduler.step(x, t[0], x, order=0)
    with pytest.raises(ValueError, match="order"):
        scheduler.step(x, t[0], x, order=9)
    with pytest.raises(TypeError, match="order"):
        scheduler.step(x, t[0], x, order=2.0)
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(x.numpy(), t[0], x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = scheduler.step(x, t[0], x).prev_sample
        with pytest.raises(ValueError, match="order"):
            scheduler.step(x, t[1], x, order=2)  # the run started with order 4
        x = scheduler.step(x, t[1], x).prev_sample
        x = scheduler.step(x, t[2], x).prev_sample
        with pytest.raises(ValueError, match="past the schedule"):
            scheduler.step(x, t[2], x)
