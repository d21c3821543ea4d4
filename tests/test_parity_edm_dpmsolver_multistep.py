"""EDMDPMSolverMultistepScheduler: stepfuse vs diffusers over whole trajectories."""

from __future__ import annotations

import diffusers
import pytest
import torch

from stepfuse.integrations.edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
from stepfuse.testing.parity import assert_scheduler_parity, run_trajectory, smooth_model

THEIRS = diffusers.EDMDPMSolverMultistepScheduler
SHAPE = (2, 3, 5, 7)

ODE_CONFIGS = [
    {},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_order": 2, "solver_type": "heun", "prediction_type": "v_prediction"},
    {"sigma_schedule": "exponential", "final_sigmas_type": "sigma_min"},
    {"solver_order": 3, "lower_order_final": False, "prediction_type": "v_prediction", "sigma_data": 1.0},
    {"sigma_schedule": "exponential", "euler_at_final": True, "lower_order_final": False},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False, "rho": 5.0, "sigma_max": 14.6},
    {"thresholding": True, "sample_max_value": 1.5, "solver_order": 3},
]
SDE_CONFIGS = [
    {"algorithm_type": "sde-dpmsolver++", "solver_order": 1},
    {"algorithm_type": "sde-dpmsolver++"},
    {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "sigma_schedule": "exponential",
     "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction", "euler_at_final": True},
]


@pytest.mark.parametrize("config", ODE_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(EDMDPMSolverMultistepScheduler, THEIRS, config, steps, SHAPE)


@pytest.mark.parametrize("config", SDE_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_parity_sde_same_noise(config, steps):
    assert_scheduler_parity(EDMDPMSolverMultistepScheduler, THEIRS, config, steps, SHAPE, seed=123)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_parity_sde_third_order_warmup(steps):
    # Up to 4 steps diffusers never reaches a third-order SDE update (see the test below).
    config = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    assert_scheduler_parity(EDMDPMSolverMultistepScheduler, THEIRS, config, steps, SHAPE, seed=7)


def test_sde_third_order_defined_where_diffusers_fails():
    """diffusers has no third-order SDE update here (its step raises); stepfuse takes SDE-DPM-Solver++(3M)."""
    config = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception):
        run_trajectory(THEIRS(**config), x_T.clone(), 7, seed=1)
    out = run_trajectory(EDMDPMSolverMultistepScheduler(**config), x_T.clone(), 7, seed=1)
    assert torch.isfinite(out).all()


def test_zero_length_final_step_is_identity():
    """Exponential sigmas end exactly at sigma_min, so a "sigma_min" final step has h = 0.

    diffusers' third-order (and heun second-order) update divides 0 by 0 there and returns
    NaN; the limit (and stepfuse's result) is the identity: the state after 19 of 20 steps.
    """
    config = {"solver_order": 3, "sigma_schedule": "exponential", "final_sigmas_type": "sigma_min"}
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(run_trajectory(THEIRS(**config), x_T.clone(), 20)).all()
    ours, theirs = EDMDPMSolverMultistepScheduler(**config), THEIRS(**config)
    got = run_trajectory(ours, x_T.clone(), 20)
    theirs.set_timesteps(20)
    x = x_T * theirs.init_noise_sigma
    for t in theirs.timesteps[:-1]:
        x = theirs.step(smooth_model(theirs.scale_model_input(x, t), t), t, x).prev_sample
    assert torch.allclose(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [ODE_CONFIGS[0], ODE_CONFIGS[2], SDE_CONFIGS[1]], ids=str)
def test_parity_bf16(config):
    assert_scheduler_parity(EDMDPMSolverMultistepScheduler, THEIRS, config, 10, SHAPE, dtype=torch.bfloat16, seed=5)


def test_begin_index_and_schedule_attributes():
    assert_scheduler_parity(EDMDPMSolverMultistepScheduler, THEIRS, {"solver_order": 3}, 20, SHAPE, begin_index=8)
    for config in ({}, {"sigma_schedule": "exponential", "final_sigmas_type": "sigma_min"}):
        ours, theirs = EDMDPMSolverMultistepScheduler(**config), THEIRS(**config)
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
        ours.set_timesteps(9)
        theirs.set_timesteps(9)
        assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
        assert ours.init_noise_sigma == theirs.init_noise_sigma and len(ours) == len(theirs)


def test_from_config_both_ways_and_preconditioning():
    config = {"solver_order": 3, "algorithm_type": "sde-dpmsolver++", "prediction_type": "v_prediction"}
    theirs = THEIRS(**config)
    ours = EDMDPMSolverMultistepScheduler.from_config(theirs.config)
    assert THEIRS.from_config(ours.config).config == theirs.config
    assert dict(ours.config) == dict(theirs.config)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    sigma = torch.tensor(3.7)
    assert torch.equal(ours.precondition_inputs(x, sigma), theirs.precondition_inputs(x, sigma))
    assert torch.equal(ours.precondition_noise(sigma), theirs.precondition_noise(sigma))
    assert torch.equal(ours.precondition_outputs(x, out, sigma), theirs.precondition_outputs(x, out, sigma))
    for s in (ours, theirs):
        s.set_timesteps(6)
    t = ours.timesteps[2]
    assert torch.equal(ours.scale_model_input(x, t), theirs.scale_model_input(x, t))
    assert ours.step_index == theirs.step_index == 2 and ours.begin_index is theirs.begin_index is None
    noise = torch.randn_like(x)
    noisy = [s.add_noise(x, noise, s.timesteps[[1, 4]]) for s in (ours, theirs)]
    assert torch.equal(*noisy)
    result = ours.step(out, t, x)
    assert isinstance(result, diffusers.schedulers.scheduling_utils.SchedulerOutput)


def test_one_fused_call_per_step(monkeypatch):
    import stepfuse.integrations.diffusers_base as base

    calls = []
    real = base.solver_step
    monkeypatch.setattr(base, "solver_step", lambda *a: calls.append(1) or real(*a))
    scheduler = EDMDPMSolverMultistepScheduler(solver_order=3)
    run_trajectory(scheduler, torch.randn(SHAPE), 7)
    assert len(calls) == 7


@pytest.mark.parametrize("kwargs, name", [
    ({"solver_order": 4}, "solver_order"),
    ({"algorithm_type": "dpmsolver"}, "algorithm_type"),
    ({"solver_type": "euler"}, "solver_type"),
    ({"prediction_type": "sample"}, "prediction_type"),
    ({"sigma_schedule": "linear"}, "sigma_schedule"),
    ({"final_sigmas_type": "last"}, "final_sigmas_type"),
    ({"sigma_data": 0.0}, "sigma_data"),
])
def test_bad_config_names_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EDMDPMSolverMultistepScheduler(**kwargs)


def test_bad_call_names_argument():
    scheduler = EDMDPMSolverMultistepScheduler()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.step(x, scheduler.timesteps[0], x)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad)
    scheduler.set_timesteps(3)
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(x.numpy(), scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(x[:1], scheduler.timesteps[0], x)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, x).prev_sample
    with pytest.raises(ValueError, match="step index"):
        scheduler.step(x, scheduler.timesteps[-1], x)
