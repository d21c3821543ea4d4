"""DPMSolverSinglestepScheduler: stepfuse vs diffusers over whole trajectories, order lists and API."""

from __future__ import annotations

import diffusers
import pytest
import torch

from stepfuse.integrations.dpmsolver_singlestep import DPMSolverSinglestepScheduler
from stepfuse.testing.parity import (
    LOW_PRECISION_SLACK, assert_scheduler_parity, relative_error, run_trajectory, smooth_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*dpmsolver.*:FutureWarning")

THEIRS = diffusers.DPMSolverSinglestepScheduler


class Float64Sigmas(THEIRS):
    """diffusers' scheduler with its float32 sigmas widened: float64 coefficients from the same schedule."""

    def set_timesteps(self, *args, **kwargs):
        super().set_timesteps(*args, **kwargs)
        self.sigmas = self.sigmas.double()


def _assert_parity(config, steps, shape=(2, 3, 5, 7), **kwargs):
    """Parity with diffusers; where that fails, closeness to the float64 solution of the same schedule.

    Noise-prediction steps that span most of the schedule multiply the sample by
    alpha_t / alpha_s ~ 150, which amplifies diffusers' float32 coefficients (its float64 run
    keeps them): stepfuse's float64 coefficients must then leave it no farther than diffusers
    from the run whose coefficients are float64 too.
    """
    try:
        assert_scheduler_parity(DPMSolverSinglestepScheduler, THEIRS, config, steps, shape, **kwargs)
        return
    except AssertionError:
        if config.get("algorithm_type") != "dpmsolver" or config.get("prediction_type") == "epsilon":
            raise
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact = run_trajectory(Float64Sigmas(**config), x_T.double(), steps, **kwargs)
    got = run_trajectory(DPMSolverSinglestepScheduler(**config), x_T.clone(), steps, **kwargs)
    theirs = run_trajectory(THEIRS(**config), x_T.clone(), steps, **kwargs)
    assert relative_error(got, exact) <= LOW_PRECISION_SLACK * relative_error(theirs, exact)
SCALED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
# Every algorithm, order and solver type, with lower_order_final off and on.
SOLVERS = [
    {"solver_order": order, "algorithm_type": algorithm, "solver_type": solver, "lower_order_final": lof,
     **(SIGMA_MIN if algorithm == "dpmsolver" else {})}
    for algorithm in ("dpmsolver++", "dpmsolver")
    for order in (1, 2, 3)
    for solver in ("midpoint", "heun")
    for lof in (False, True)
    if order > 1 or (solver == "midpoint" and not lof)
]
SCHEDULES = [
    {"solver_order": 3, **SIGMA_MIN},
    {"use_karras_sigmas": True, **SCALED},
    {"use_exponential_sigmas": True, "solver_type": "heun"},
    {"use_beta_sigmas": True, "solver_order": 3},
    {"prediction_type": "v_prediction", **SCALED},
    {"prediction_type": "v_prediction", "algorithm_type": "dpmsolver", "solver_order": 3, **SIGMA_MIN},
    {"prediction_type": "sample", "use_karras_sigmas": True},
    {"prediction_type": "sample", "algorithm_type": "dpmsolver", **SIGMA_MIN},
    {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5, "solver_order": 3},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
    {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "solver_order": 3, "solver_type": "heun"},
]
SDE = [
    {"algorithm_type": "sde-dpmsolver++"},
    {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun", **SIGMA_MIN},
    {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "lower_order_final": True, **SIGMA_MIN},
]


@pytest.mark.parametrize("config", SOLVERS + SCHEDULES, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20])
def test_parity_fp32(config, steps):
    _assert_parity(config, steps)


@pytest.mark.parametrize("steps", [7, 20])
def test_parity_karras_cosine(steps):
    """Karras timesteps of the cosine schedule are rounded onto repeated values: the index must come
    from set_begin_index (diffusers' own timestep lookup then runs past the schedule)."""
    config = {"use_karras_sigmas": True, "solver_order": 3, "beta_schedule": "squaredcos_cap_v2"}
    _assert_parity(config, steps, begin_index=0)


@pytest.mark.parametrize("config", SDE, ids=str)
@pytest.mark.parametrize("steps", [3, 8])
def test_parity_sde_same_noise(config, steps):
    assert_scheduler_parity(DPMSolverSinglestepScheduler, THEIRS, config, steps, seed=123)


@pytest.mark.parametrize("config", [{}, {"solver_order": 3, "prediction_type": "v_prediction", **SCALED}, SDE[0]],
                         ids=str)
def test_parity_bf16(config):
    assert_scheduler_parity(DPMSolverSinglestepScheduler, THEIRS, config, 10, dtype=torch.bfloat16, seed=5)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("begin_index", [1, 4, 5])
def test_begin_index(order, begin_index):
    """Starting inside a group cuts the first orders to the outputs seen, as diffusers does."""
    _assert_parity({"solver_order": order}, 12, begin_index=begin_index)


def test_custom_timesteps_and_mu():
    assert_scheduler_parity(DPMSolverSinglestepScheduler, THEIRS, {"solver_order": 3}, None,
                            set_timesteps_kwargs={"timesteps": [999, 800, 600, 400, 250, 100, 20]})
    config = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "use_dynamic_shifting": True}
    assert_scheduler_parity(DPMSolverSinglestepScheduler, THEIRS, config, 8, set_timesteps_kwargs={"mu": 0.8})


@pytest.mark.parametrize("config", [{"algorithm_type": "dpmsolver", **SIGMA_MIN}, {"sample_max_value": 1.5}], ids=str)
def test_thresholded_first_order_is_the_multistep_one(config):
    """Order 1 is the same DDIM-like update in both diffusers classes; this also covers thresholding
    of noise predictions, where diffusers' singlestep class fails on a tensor shape."""
    config = {"solver_order": 1, "thresholding": True, **config}
    assert_scheduler_parity(DPMSolverSinglestepScheduler, diffusers.DPMSolverMultistepScheduler, config, 6)


def test_learned_variance_output_is_split():
    def model(x, t):
        return torch.cat([smooth_model(x, t), smooth_model(x, t)], dim=1)

    assert_scheduler_parity(DPMSolverSinglestepScheduler, THEIRS, {"variance_type": "learned_range"}, 6,
                            shape=(2, 3, 8, 8), model=model)


ORDER_CONFIGS = [{}, {"solver_order": 3, **SIGMA_MIN}, {"solver_order": 1, "lower_order_final": True},
                 {"solver_order": 3, "lower_order_final": True}]


@pytest.mark.parametrize("config", ORDER_CONFIGS, ids=str)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 9, 10])
def test_order_list_and_config(config, steps):
    ours = DPMSolverSinglestepScheduler(**config)
    theirs = THEIRS.from_config(ours.config)
    back = DPMSolverSinglestepScheduler.from_config(theirs.config)
    assert type(back) is DPMSolverSinglestepScheduler and dict(back.config) == dict(ours.config)
    assert ours.order == theirs.order and len(ours) == len(theirs)
    # The VP training tables are float64 rounded once to float32, diffusers' are built in float32.
    for attr in ("betas", "alphas_cumprod"):
        torch.testing.assert_close(getattr(ours, attr), getattr(theirs, attr), rtol=1e-5, atol=1e-8)
    assert ours.order_list == theirs.order_list
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    # lower_order_final is switched on by set_timesteps when the run cannot end on a whole group.
    assert dict(ours.config) == dict(theirs.config)
    assert ours.order_list == theirs.order_list
    assert ours.get_order_list(steps) == theirs.get_order_list(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)


@pytest.mark.parametrize("return_dict", [True, False])
def test_stepwise_outputs_add_noise_and_index(return_dict):
    config = {"solver_order": 3, "prediction_type": "v_prediction"}
    ours, theirs = DPMSolverSinglestepScheduler(**config), THEIRS(**config)
    x0 = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    for s in (ours, theirs):
        s.set_timesteps(7)
    t = theirs.timesteps[[1, 4]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    x = noise.clone()
    for t in theirs.timesteps:
        assert torch.equal(ours.scale_model_input(x, t), theirs.scale_model_input(x, t))
        out = smooth_model(x, t)
        results = [s.step(out, t, x, return_dict=return_dict) for s in (ours, theirs)]
        got, ref = (r.prev_sample if return_dict else r[0] for r in results)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert ours.step_index == theirs.step_index
        x = ref
    assert ours.begin_index is None and ours.step_index == 7


def test_bad_input():
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver")
    with pytest.raises(ValueError, match="solver_order"):
        DPMSolverSinglestepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DPMSolverSinglestepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="prediction_type"):
        DPMSolverSinglestepScheduler(algorithm_type="dpmsolver", prediction_type="flow_prediction", **SIGMA_MIN)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverSinglestepScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    scheduler = DPMSolverSinglestepScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.step(torch.zeros(1, 4, 4, 4), 999, torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.get_order_list(0)
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError, match="timesteps"):
        DPMSolverSinglestepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[999, 500, 10])
    scheduler.set_timesteps(2)
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(TypeError, match="model_output"):
        scheduler.step(x.numpy(), scheduler.timesteps[0], x)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.tanh(x), t, x).prev_sample
    with pytest.raises(ValueError, match="step index"):
        scheduler.step(x, scheduler.timesteps[-1], x)


def test_plan_keeps_group_start_and_philox_noise():
    """Order-2 steps read the group's start sample from history; Philox noise needs no generator."""
    ours = DPMSolverSinglestepScheduler(algorithm_type="sde-dpmsolver++", **SIGMA_MIN)
    ours.philox_seed = 7
    ours.set_timesteps(4)
    plan = ours._plan(0)
    assert [len(p.targets) for p in plan] == [3, 1, 3, 1]  # order 1 writes x_g and its output
    x = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    for t in ours.timesteps:
        x = ours.step(smooth_model(x, t), t, x).prev_sample
    assert torch.isfinite(x).all()
