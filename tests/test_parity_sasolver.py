"""SASolverScheduler: stepfuse vs diffusers over whole trajectories.

diffusers computes SA-Solver's weights on float32 tensors by expanding the Lagrange
polynomials in absolute lambda, which loses up to ~1e-4 (relative) at orders 3-4 over 20
steps.  The sweep therefore compares with diffusers' own algorithm run on float64 sigmas
(``Float64Weights``: every weight in float64, the sample arithmetic unchanged);
``test_stock_diffusers_within_its_own_rounding`` ties that back to the stock class.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.schedulers import scheduling_sasolver
from diffusers.utils.torch_utils import randn_tensor

from stepfuse.integrations.sasolver import SASolverScheduler
from stepfuse.testing.parity import (
    FP32_RTOL, assert_same_construction, assert_scheduler_parity, relative_error, run_trajectory, smooth_model,
)

STOCK = diffusers.SASolverScheduler
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


class Float64Weights(STOCK):
    """diffusers' SA-Solver with its sigmas, hence all its step weights, in float64."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


@pytest.fixture(autouse=True)
def float64_runs_share_the_noise(monkeypatch):
    """diffusers draws noise in the sample's dtype: let its float64 runs (the parity helper's
    ill-conditioning check) draw the float32 noise of the runs they judge, in float64."""

    def randn(shape, generator=None, device=None, dtype=None, **kwargs):
        if dtype == torch.float64:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32, **kwargs).double()
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype, **kwargs)

    monkeypatch.setattr(scheduling_sasolver, "randn_tensor", randn)


def tau_zero(t):
    return 0


def tau_one(t):
    return 1


def tau_ramp(t):
    return 0.8 * float(t) / 1000.0


def tau_window(t):
    return t < 600  # a 0-d bool tensor, as a comparison gives


def _orders(p, c, **extra):
    return {"predictor_order": p, "corrector_order": c, **extra}


NOISE = {"algorithm_type": "noise_prediction"}
CONFIGS = [
    {},
    _orders(1, 1),
    _orders(1, 2),
    _orders(2, 1),
    _orders(3, 2),
    _orders(2, 3),
    _orders(3, 3),
    _orders(4, 4),
    _orders(4, 1),
    _orders(1, 4),
    _orders(1, 1, **NOISE),
    _orders(2, 2, **NOISE),
    _orders(3, 4, **NOISE),
    _orders(4, 2, **NOISE),
    {"tau_func": tau_zero},
    {"tau_func": tau_zero, **_orders(3, 3, **NOISE)},
    {"tau_func": tau_one, **_orders(3, 2)},
    {"tau_func": tau_ramp, **_orders(2, 3, **NOISE)},
    {"tau_func": tau_window, **_orders(3, 3)},
    {"use_karras_sigmas": True, **SD},
    {"use_karras_sigmas": True, "lower_order_final": False, **_orders(3, 3)},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True, **NOISE},
    {"prediction_type": "v_prediction", **SD},
    {"prediction_type": "v_prediction", **NOISE, **SD},
    {"prediction_type": "sample", **_orders(3, 3)},
    {"prediction_type": "sample", **NOISE},
    {"lower_order_final": False, **_orders(4, 4)},
    {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
]


def _id(config: dict) -> str:
    return str({k: getattr(v, "__name__", v) for k, v in config.items()})


@pytest.mark.parametrize("config", CONFIGS, ids=_id)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
def test_parity_fp32(config, steps):
    assert_scheduler_parity(SASolverScheduler, Float64Weights, config, steps, shape=(1, 3, 6, 6), seed=steps)


@pytest.mark.parametrize("config", [{}, _orders(3, 3), _orders(4, 4, **NOISE), {"tau_func": tau_one}], ids=_id)
def test_stock_diffusers_within_its_own_rounding(config):
    """Against the stock class: as close as diffusers' float32 weights are to its float64 ones."""
    ours = SASolverScheduler(**config)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = run_trajectory(ours, x.clone(), 20, seed=7)
    stock = run_trajectory(STOCK.from_config(ours.config), x.clone(), 20, seed=7)
    exact = run_trajectory(Float64Weights.from_config(ours.config), x.clone(), 20, seed=7)
    assert relative_error(got, stock) <= 2.0 * relative_error(stock, exact) + FP32_RTOL


@pytest.mark.parametrize("config", [{}, _orders(3, 3, **NOISE), {"use_karras_sigmas": True, **SD}], ids=_id)
def test_parity_bf16(config):
    assert_scheduler_parity(SASolverScheduler, Float64Weights, config, 10, dtype=torch.bfloat16, seed=5)


@pytest.mark.parametrize("config", [{}, _orders(4, 3), _orders(3, 4, **NOISE)], ids=_id)
@pytest.mark.parametrize("begin_index", [1, 8])
def test_begin_index(config, begin_index):
    assert_scheduler_parity(SASolverScheduler, Float64Weights, config, 20, begin_index=begin_index, seed=3)


def test_learned_variance_keeps_the_sample_channels():
    """diffusers fails here (its noise has the doubled channels); the output's first half is used."""
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))

    def doubled(x, t):
        return torch.cat([smooth_model(x, t), torch.ones_like(x)], dim=1)

    got = run_trajectory(SASolverScheduler(variance_type="learned_range"), x.clone(), 7, model=doubled, seed=1)
    plain = run_trajectory(SASolverScheduler(), x.clone(), 7, seed=1)
    assert torch.equal(got, plain)


def test_noise_prediction_thresholding_runs():
    """diffusers fails here; stepfuse thresholds the step's data prediction and converts it back."""
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    config = {"thresholding": True, "algorithm_type": "noise_prediction", "sample_max_value": 1.5}
    got = run_trajectory(SASolverScheduler(**config), x, 7, seed=1)
    assert torch.isfinite(got).all()


def test_generator_consumption_matches_diffusers():
    """One draw per step as diffusers makes (a later user of the generator sees the same state);
    a run with tau = 0 throughout draws nothing."""
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    for config, draws in (({}, True), ({"tau_func": tau_zero}, False)):
        states = []
        for cls in (SASolverScheduler, STOCK):
            generator = torch.Generator().manual_seed(11)
            scheduler = cls(**config)
            scheduler.set_timesteps(6)
            y = x.clone()
            for t in scheduler.timesteps:
                y = scheduler.step(smooth_model(y, t), t, y, generator=generator).prev_sample
            states.append(generator.get_state())
        assert torch.equal(states[0], states[1]) == draws
        if not draws:
            assert torch.equal(states[0], torch.Generator().manual_seed(11).get_state())


def test_philox_noise_is_reproducible():
    """With ``philox_seed`` the kernel draws the noise; the corrector reuses the draw it stored."""
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    runs = []
    for _ in range(2):
        scheduler = SASolverScheduler(tau_func=tau_one, predictor_order=3, corrector_order=3)
        scheduler.philox_seed = 17
        runs.append(run_trajectory(scheduler, x.clone(), 7))
    assert torch.equal(runs[0], runs[1]) and torch.isfinite(runs[0]).all()


def test_tau_func_setter_rebuilds_the_plan():
    ours = SASolverScheduler()
    ours.set_timesteps(7)
    ours.tau_func = tau_zero
    assert not any(p.uses_noise for p in ours._plan(0))
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    theirs = STOCK(tau_func=tau_zero)
    assert relative_error(run_trajectory(ours, x.clone(), 7), run_trajectory(theirs, x.clone(), 7)) <= FP32_RTOL


def test_tau_func_receives_schedule_timesteps():
    seen = []

    def record(t):
        seen.append(int(t))
        return 0.5

    scheduler = SASolverScheduler(tau_func=record)
    scheduler.set_timesteps(5)
    assert seen == scheduler.timesteps.tolist()


@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True, **SD}, {"tau_func": tau_ramp, **NOISE},
                                    {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}], ids=_id)
def test_construction_and_schedule_state(config):
    ours = SASolverScheduler(**config)
    theirs = assert_same_construction(SASolverScheduler, STOCK, ours)
    assert ours.config.tau_func is theirs.config.tau_func
    assert ours.predict_x0 == theirs.predict_x0 and ours.init_noise_sigma == theirs.init_noise_sigma
    ours.set_timesteps(9)
    theirs.set_timesteps(9)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.sigmas, theirs.sigmas)
    assert ours.num_inference_steps == theirs.num_inference_steps
    x0, noise = torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6)
    timesteps = theirs.timesteps[[0, 3, 5]]
    assert relative_error(ours.add_noise(x0, noise, timesteps), theirs.add_noise(x0, noise, timesteps)) <= 1e-6
    assert ours.scale_model_input(x0, timesteps[0]) is x0


def test_step_index_protocol():
    ours, theirs = SASolverScheduler(), STOCK()
    for s in (ours, theirs):
        s.set_timesteps(6)
        assert s.step_index is None and s.begin_index is None
        s.set_begin_index(2)
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    generators = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)]
    for t in ours.timesteps[2:]:
        out = smooth_model(x, t)
        a = ours.step(out, t, x, generator=generators[0], return_dict=False)
        b = theirs.step(out, t, x, generator=generators[1], return_dict=False)
        assert len(a) == 1 and ours.step_index == theirs.step_index and ours.begin_index == 2
        assert relative_error(a[0], b[0]) <= FP32_RTOL
        x = b[0]


@pytest.mark.parametrize("kwargs, error, key", [
    ({"predictor_order": 0}, ValueError, "predictor_order"),
    ({"predictor_order": 5}, ValueError, "predictor_order"),
    ({"corrector_order": 2.0}, TypeError, "corrector_order"),
    ({"corrector_order": True}, TypeError, "corrector_order"),
    ({"algorithm_type": "dpmsolver++"}, ValueError, "algorithm_type"),
    ({"prediction_type": "x0"}, ValueError, "prediction_type"),
    ({"prediction_type": "flow_prediction", **NOISE}, ValueError, "flow_prediction"),
    ({"tau_func": 0.5}, TypeError, "tau_func"),
    ({"timestep_spacing": "uniform"}, ValueError, "timestep_spacing"),
    ({"beta_schedule": "exp"}, ValueError, "beta_schedule"),
    ({"use_karras_sigmas": True, "use_beta_sigmas": True}, ValueError, "use_"),
    ({"variance_type": "huge"}, ValueError, "variance_type"),
], ids=str)
def test_bad_config_names_the_argument(kwargs, error, key):
    with pytest.raises(error, match=key):
        SASolverScheduler(**kwargs)


def test_bad_calls_name_the_argument():
    for bad_tau in (float("nan"), "0.5", torch.ones(2)):
        scheduler = SASolverScheduler(tau_func=lambda t: bad_tau)
        with pytest.raises(ValueError, match="tau_func"):
            scheduler.set_timesteps(4)
    scheduler = SASolverScheduler()
    with pytest.raises(TypeError, match="tau_func"):
        scheduler.tau_func = "sde"
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(None)
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(-1)
    scheduler.set_timesteps(3)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(x.numpy(), scheduler.timesteps[0], x, generator=generator)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(x[:, :2], scheduler.timesteps[0], x, generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(smooth_model(x, t), t, x, generator=generator).prev_sample
    with pytest.raises(ValueError, match="past the schedule"):
        scheduler.step(x, scheduler.timesteps[-1], x, generator=generator)


@pytest.mark.parametrize("config", [{}, _orders(4, 4), _orders(3, 2, **NOISE), {"thresholding": True}], ids=_id)
def test_step_makes_no_host_sync(config):
    """The checks of tests/test_no_sync.py, for this scheduler (stepfuse.schedulers does not list it yet)."""
    from test_no_sync import ALLOWED, NoSyncMode

    scheduler = SASolverScheduler(**config)
    scheduler.set_timesteps(8)
    scheduler.set_begin_index(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16)
    mode = NoSyncMode()
    for t in list(scheduler.timesteps):
        out = torch.tanh(scheduler.scale_model_input(x, t))
        with mode:
            x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
    if not config.get("thresholding"):  # the threshold's quantile pass is the one extra kernel
        assert not sorted(set(mode.ops) - ALLOWED)
    assert "solver_step" in mode.ops
