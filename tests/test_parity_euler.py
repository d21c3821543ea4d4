"""Euler, Euler-ancestral and Heun: stepfuse vs diffusers over whole trajectories and step by step."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.utils import logging

import stepfuse.schedulers as sf
from stepfuse.ref.philox import philox_normal
from stepfuse.solvers.euler import data_prediction
from stepfuse.testing.parity import (
    FP32_RTOL, assert_same_construction, assert_scheduler_parity, relative_error, run_trajectory, smooth_model,
)

logging.set_verbosity_error()  # diffusers' "call scale_model_input" warnings from the step-by-step tests

SCALED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ZERO_SNR = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
EULER = [
    {},
    {"prediction_type": "v_prediction", **SCALED},
    {"prediction_type": "sample"},
    {"prediction_type": "original_sample", "beta_schedule": "squaredcos_cap_v2"},
    {"use_karras_sigmas": True, **SCALED},
    {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True},
    {"interpolation_type": "log_linear"},
    {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
    {"timestep_type": "continuous", "prediction_type": "v_prediction", "use_karras_sigmas": True},
    {"timestep_spacing": "leading", "steps_offset": 1, **SCALED},
    ZERO_SNR,
]
ANCESTRAL = [
    {},
    {"prediction_type": "v_prediction", **SCALED},
    {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "squaredcos_cap_v2"},
    ZERO_SNR,
]
HEUN = [
    {},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 1.5},
    {"clip_sample": True},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True, "prediction_type": "v_prediction"},
    {"use_beta_sigmas": True},
    {"beta_schedule": "exp"},
    {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "trailing", "beta_schedule": "squaredcos_cap_v2"},
]
CASES = (
    [("EulerDiscreteScheduler", c, None) for c in EULER]
    + [("EulerAncestralDiscreteScheduler", c, 7) for c in ANCESTRAL]
    + [("HeunDiscreteScheduler", c, None) for c in HEUN]
)
CHURN = [
    {"s_churn": 1.0},
    {"s_churn": 40.0, "s_noise": 1.003},  # gamma saturates at sqrt(2) - 1
    {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 5.0},  # churn on some steps only
    {"s_churn": 2.0, "s_noise": 0.0},  # noise drawn but scaled by 0
]


def _classes(name):
    return getattr(sf, name), getattr(diffusers, name)


@pytest.mark.parametrize("name, config, seed", CASES, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 5, 12, 25])
def test_parity_fp32(name, config, seed, steps):
    assert_scheduler_parity(*_classes(name), config, steps, seed=seed)


@pytest.mark.parametrize("config", [{}, {"prediction_type": "v_prediction"}, {"prediction_type": "sample"}], ids=str)
@pytest.mark.parametrize("step_kwargs", CHURN, ids=str)
def test_parity_euler_churn_same_noise(config, step_kwargs):
    assert_scheduler_parity(*_classes("EulerDiscreteScheduler"), config, 10, seed=3, step_kwargs=step_kwargs)


LOW_PRECISION = [
    ("EulerDiscreteScheduler", {}, None, None),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, **SCALED}, 11, {"s_churn": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, 5, None),
    ("HeunDiscreteScheduler", {}, None, None),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, None, None),
]


@pytest.mark.parametrize("name, config, seed, step_kwargs", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_parity_low_precision(name, config, seed, step_kwargs, dtype):
    assert_scheduler_parity(*_classes(name), config, 10, dtype=dtype, seed=seed, step_kwargs=step_kwargs)


def test_custom_timesteps_and_sigmas():
    euler = _classes("EulerDiscreteScheduler")
    assert_scheduler_parity(*euler, {}, None, set_timesteps_kwargs={"timesteps": [999, 800, 600.5, 400, 250, 100, 20]})
    sigmas = [14.6, 8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.0]
    assert_scheduler_parity(*euler, {}, None, set_timesteps_kwargs={"sigmas": sigmas})
    # diffusers keeps custom sigmas as given, even with use_karras_sigmas.
    assert_scheduler_parity(*euler, {"use_karras_sigmas": True, "prediction_type": "v_prediction"}, None,
                            set_timesteps_kwargs={"sigmas": sigmas[:-1] + [0.02]})
    assert_scheduler_parity(*_classes("HeunDiscreteScheduler"), {}, None,
                            set_timesteps_kwargs={"timesteps": [999, 800, 600, 400, 250, 100, 20]})


@pytest.mark.parametrize("name, config, seed, begin_index", [
    ("EulerDiscreteScheduler", {}, None, 8),
    ("EulerAncestralDiscreteScheduler", {}, 2, 5),
    ("HeunDiscreteScheduler", {}, None, 10),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, None, 7),  # odd: diffusers starts with a predictor
], ids=str)
def test_begin_index(name, config, seed, begin_index):
    assert_scheduler_parity(*_classes(name), config, 12, seed=seed, begin_index=begin_index)


def _float64_euler_reference(name, config, steps, seed=7):
    """Euler / ancestral Euler in float64 on diffusers' float32 sigmas, with the same noise draws."""
    theirs = getattr(diffusers, name)(**config)
    theirs.set_timesteps(steps)
    sigmas = theirs.sigmas.double().tolist()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).double() * float(theirs.init_noise_sigma)
    for i, t in enumerate(theirs.timesteps):
        sigma, sigma_to = sigmas[i], sigmas[i + 1]
        out = smooth_model((x / (sigma**2 + 1) ** 0.5).float(), t).double()
        p, q = data_prediction(config.get("prediction_type", "epsilon"), sigma)
        slope = (x - p * x - q * out) / sigma
        if name == "EulerAncestralDiscreteScheduler":
            sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
            noise = torch.randn(x.shape, generator=generator).double()
            x = x + slope * (sigma_to**2 / sigma - sigma) + sigma_up * noise
        else:
            x = x + slope * (sigma_to - sigma)
    return x


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("config", [ZERO_SNR, {"beta_schedule": "squaredcos_cap_v2"}], ids=str)
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_accuracy_against_float64(name, config, steps):
    """From a huge sigma_max diffusers' float32 ``dt = sigma_next - sigma`` cancels (errors up to ~1e-3,
    where the parity tests fall back); the float64 plan stays at fp32 rounding of the exact path."""
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = run_trajectory(getattr(sf, name)(**config), x_T, steps, seed=7)
    assert relative_error(got, _float64_euler_reference(name, config, steps)) < 5e-7


# -- step by step: pred_original_sample, return types, generator stream ----------------------

STEPWISE = [
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {"prediction_type": "v_prediction"}, {"s_churn": 1.0}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {"s_churn": 1.0, "s_noise": 0.0}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "v_prediction"}, {}),
    ("HeunDiscreteScheduler", {"prediction_type": "v_prediction"}, {}),
    ("HeunDiscreteScheduler", {"clip_sample": True}, {}),
]


@pytest.mark.parametrize("name, config, step_kwargs", STEPWISE, ids=str)
@pytest.mark.parametrize("return_dict", [True, False])
def test_stepwise_outputs(name, config, step_kwargs, return_dict):
    """Both schedulers get the same input at every step; prev_sample and pred_original_sample agree."""
    ours_cls, theirs_cls = _classes(name)
    ours = ours_cls(**config)
    theirs = theirs_cls.from_config(ours.config)
    stochastic = name == "EulerAncestralDiscreteScheduler" or step_kwargs.get("s_churn")
    generators = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)]
    for s in (ours, theirs):
        s.set_timesteps(6)
    assert ours.num_inference_steps == theirs.num_inference_steps
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * float(theirs.init_noise_sigma)
    for t in theirs.timesteps:
        if name == "HeunDiscreteScheduler":
            assert ours.state_in_first_order == theirs.state_in_first_order
        inp = theirs.scale_model_input(x, t)
        assert torch.equal(ours.scale_model_input(x, t), inp)
        out = smooth_model(inp, t)
        kwargs = dict(step_kwargs, return_dict=return_dict)
        results = []
        for s, g in zip((ours, theirs), generators):
            extra = {"generator": g} if stochastic else {}
            results.append(s.step(out, t, x, **kwargs, **extra))
        if return_dict:
            assert type(results[0]) is type(results[1])
            results = [(r.prev_sample, r.pred_original_sample) for r in results]
        (prev, pred), (their_prev, their_pred) = results
        assert relative_error(prev, their_prev) <= FP32_RTOL
        assert relative_error(pred, their_pred) <= FP32_RTOL
        assert ours.step_index == theirs.step_index
        x = their_prev
    if stochastic:  # the same number of draws, so a shared generator stays in step with diffusers
        assert torch.equal(torch.randn(3, generator=generators[0]), torch.randn(3, generator=generators[1]))


def test_ancestral_sample_prediction_matches_epsilon():
    """diffusers rejects prediction_type="sample" at step(); stepfuse runs it: x0 = x - sigma eps, same path."""
    runs = []
    for prediction_type in ("epsilon", "sample"):
        scheduler = sf.EulerAncestralDiscreteScheduler(prediction_type=prediction_type)
        scheduler.set_timesteps(8)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            sigma = float(scheduler.sigmas[scheduler.step_index or 0])
            eps = smooth_model(scheduler.scale_model_input(x, t), t)
            out = eps if prediction_type == "epsilon" else x - sigma * eps
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        runs.append(x)
    assert relative_error(runs[1], runs[0]) < 1e-5


def test_churn_pred_original_with_philox_noise():
    """In-kernel noise: pred_original_sample is built from the same Philox draw as the step."""
    scheduler = sf.EulerDiscreteScheduler()
    scheduler.philox_seed = 1234
    scheduler.set_timesteps(4)
    x = torch.randn(1, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:2]:  # the second step checks that the captured offset has advanced
        out = smooth_model(scheduler.scale_model_input(x, t), t)
        i, offset = scheduler.step_index or 0, scheduler._philox_offset
        prev, pred = scheduler.step(out, t, x, s_churn=1.0, return_dict=False)
        sigma = float(scheduler.sigmas[i])
        gamma = min(1.0 / 4, 2**0.5 - 1)
        z = philox_normal(x.numel(), 1234, offset).reshape(x.shape)
        x_hat = x.double() + z * sigma * ((1 + gamma) ** 2 - 1) ** 0.5
        expected = x_hat - sigma * (1 + gamma) * out.double()
        assert relative_error(pred, expected) < 1e-6
        sigma_next = float(scheduler.sigmas[i + 1])
        expected_prev = x_hat + (sigma_next - sigma * (1 + gamma)) * out.double()
        assert relative_error(prev, expected_prev) < 1e-6
        x = prev


def test_ancestral_philox_is_deterministic_and_standard():
    runs = []
    for _ in range(2):
        scheduler = sf.EulerAncestralDiscreteScheduler()
        scheduler.philox_seed = 99
        scheduler.set_timesteps(3)
        x = torch.zeros(4, 4, 32, 32)
        t = scheduler.timesteps[0]
        # A perfect denoiser of x0 = 0 (eps = x / sigma) leaves only the fresh noise: std sigma_up.
        out = x / float(scheduler.sigmas[0])
        runs.append(scheduler.step(out, t, x, return_dict=False)[0])
    assert torch.equal(runs[0], runs[1])
    s, s_to = float(scheduler.sigmas[0]), float(scheduler.sigmas[1])
    sigma_up = (s_to**2 * (s**2 - s_to**2) / s**2) ** 0.5
    assert abs(float(runs[0].std()) / sigma_up - 1.0) < 0.03


# -- schedule state and the rest of the scheduler API -----------------------------------------

STATE = [
    ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1, **SCALED}),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
    ("EulerDiscreteScheduler", {"trained_betas": [0.001 * (i + 1) for i in range(100)], "num_train_timesteps": 100}),
    ("EulerAncestralDiscreteScheduler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}),
    ("HeunDiscreteScheduler", {"timestep_spacing": "leading"}),
]


@pytest.mark.parametrize("name, config", STATE, ids=str)
def test_schedule_state_matches(name, config):
    ours_cls, theirs_cls = _classes(name)
    ours = ours_cls(**config)
    theirs = assert_same_construction(ours_cls, theirs_cls, ours)
    for stage in ("init", "set_timesteps"):
        if stage == "set_timesteps":
            ours.set_timesteps(9)
            theirs.set_timesteps(9)
        assert torch.equal(ours.sigmas, theirs.sigmas), stage
        assert torch.equal(ours.timesteps.float(), theirs.timesteps.float()), stage
        assert ours.init_noise_sigma == float(theirs.init_noise_sigma), stage
    x0 = torch.randn(3, 4, 6, 6)
    noise = torch.randn(3, 4, 6, 6)
    timesteps = theirs.timesteps[[0, 3, 5]]
    assert torch.equal(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))
    for s in (ours, theirs):
        s.set_begin_index(2)
    assert torch.equal(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps))


@pytest.mark.parametrize("name, bad", [
    ("EulerDiscreteScheduler", {"prediction_type": "flow_prediction"}),
    ("EulerDiscreteScheduler", {"interpolation_type": "cubic"}),
    ("EulerDiscreteScheduler", {"timestep_type": "integer"}),
    ("EulerDiscreteScheduler", {"final_sigmas_type": "one"}),
    ("EulerDiscreteScheduler", {"beta_schedule": "exp"}),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "use_beta_sigmas": True}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "uniform"}),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "original_sample"}),
    ("HeunDiscreteScheduler", {"prediction_type": "flow_prediction"}),
    ("HeunDiscreteScheduler", {"use_exponential_sigmas": True, "use_karras_sigmas": True}),
], ids=str)
def test_bad_config_names_the_key(name, bad):
    key = next(iter(bad)) if len(bad) == 1 else "use_"
    with pytest.raises(ValueError, match=key):
        getattr(sf, name)(**bad)


def test_bad_calls():
    euler = sf.EulerDiscreteScheduler()
    euler.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="timestep"):
        euler.step(x, 3, x)  # an index from enumerate(), not a timestep
    with pytest.raises(ValueError, match="sigmas"):
        euler.set_timesteps(timesteps=[900, 500], sigmas=[3.0, 1.0, 0.0])
    heun = sf.HeunDiscreteScheduler()
    with pytest.raises(ValueError, match="num_train_timesteps"):
        heun.set_timesteps(4, num_train_timesteps=500)
    heun.set_timesteps(2)
    for t in heun.timesteps:
        x = heun.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="past the schedule"):
        heun.step(x, heun.timesteps[-1], x)


def test_mixed_dtypes_follow_diffusers():
    """fp32 latents with an fp16 model output: diffusers' Euler returns the model's dtype, Heun promotes."""
    x = torch.randn(1, 4, 8, 8)
    for name in ("EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        ours_cls, theirs_cls = _classes(name)
        ours, theirs = ours_cls(), theirs_cls()
        for s in (ours, theirs):
            s.set_timesteps(3)
        t = theirs.timesteps[0]
        out = smooth_model(theirs.scale_model_input(x, t), t).half()
        ours.scale_model_input(x, t)
        got, expected = ours.step(out, t, x).prev_sample, theirs.step(out, t, x).prev_sample
        assert got.dtype == expected.dtype
        assert relative_error(got, expected) < 1e-3


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_data_prediction_recovers_x0(prediction_type):
    """D = p x + q out is exact for a noised x0 and the matching model output."""
    x0, eps, sigma = 0.7, -1.3, 2.5
    x = x0 + sigma * eps
    alpha = (1 + sigma**2) ** -0.5  # the VP coefficients of the scaled input
    out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * alpha * x0, "sample": x0}[prediction_type]
    p, q = data_prediction(prediction_type, sigma)
    assert abs(p * x + q * out - x0) < 1e-12
