"""Optimal step schedules: the C++ dynamic program against its reference, the local-error
matrix against direct evaluation, and the schedule's benefit on the Gaussian mixture."""

import math

import numpy as np
import pytest
import torch

from stepfuse.ref.step_schedule_dp import optimal_step_indices as ref_indices
from stepfuse.schedules import karras_sigmas
from stepfuse.solvers.optimal_schedule import first_order_step_costs, optimal_sigmas, optimal_step_indices
from stepfuse.testing import GaussianMixture


def _path_cost(cost, path):
    return sum(cost[a][b] for a, b in zip(path[:-1], path[1:]))


@pytest.mark.parametrize("n_points, num_steps", [(2, 1), (5, 1), (5, 4), (9, 3), (17, 6), (33, 8)])
def test_dp_matches_reference(n_points, num_steps):
    rng = np.random.default_rng(n_points * 100 + num_steps)
    cost = rng.random((n_points, n_points))
    cost[rng.random(cost.shape) < 0.1] = np.inf  # forbidden steps
    cost[0, -1] = 0.5  # keep at least one finite path
    for j in range(n_points - 1):
        cost[j, j + 1] = rng.random()
    path = optimal_step_indices(cost, num_steps)
    expected = ref_indices(cost.tolist(), num_steps)
    assert path[0] == 0 and path[-1] == n_points - 1 and len(path) == num_steps + 1
    assert all(a < b for a, b in zip(path[:-1], path[1:]))
    assert _path_cost(cost, path) == pytest.approx(_path_cost(cost, expected), rel=1e-12)


def test_dp_accepts_tensors_and_finds_the_obvious_path():
    cost = torch.full((4, 4), 10.0, dtype=torch.float64)
    cost[0, 2] = cost[2, 3] = 1.0
    assert optimal_step_indices(cost, 2) == [0, 2, 3]
    assert optimal_step_indices(cost, 3) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "cost, num_steps, error, match",
    [
        (np.ones((3, 4)), 1, ValueError, "square"),
        (np.ones((1, 1)), 1, ValueError, "n_points"),
        (np.ones((4, 4)), 0, ValueError, "num_steps"),
        (np.ones((4, 4)), 4, ValueError, "num_steps"),
        (np.ones((4, 4)), 2.0, TypeError, "num_steps"),
        (np.array([[0, np.nan], [0, 0]]), 1, ValueError, "cost"),
        (np.array([[0, -1.0], [0, 0]]), 1, ValueError, "non-negative"),
        (np.array([[0, np.inf], [0, 0]]), 1, ValueError, "forbids every schedule"),
    ],
)
def test_dp_bad_input(cost, num_steps, error, match):
    with pytest.raises(error, match=match):
        optimal_step_indices(cost, num_steps)


def test_first_order_costs_match_direct_steps():
    gen = torch.Generator().manual_seed(0)
    sigmas = [5.0, 2.0, 0.7, 0.1, 0.0]
    states = torch.randn(5, 3, 4, generator=gen)
    denoised = torch.randn(4, 3, 4, generator=gen)
    cost = first_order_step_costs(states, denoised, sigmas)
    for j in range(4):
        for i in range(5):
            if i <= j:
                assert math.isinf(cost[j, i])
                continue
            r = sigmas[i] / sigmas[j]
            step = r * states[j].double() + (1 - r) * denoised[j].double()
            assert cost[j, i] == pytest.approx(float((step - states[i].double()).pow(2).mean()), rel=1e-9, abs=1e-12)


def test_first_order_costs_bad_input():
    x, d = torch.zeros(3, 2), torch.zeros(2, 2)
    with pytest.raises(ValueError, match="decreasing"):
        first_order_step_costs(x, d, [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="states"):
        first_order_step_costs(torch.zeros(4, 2), d, [3.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="denoised"):
        first_order_step_costs(x, torch.zeros(2, 3), [3.0, 2.0, 0.0])
    with pytest.raises(TypeError, match="torch.Tensors"):
        first_order_step_costs(x.numpy(), d, [3.0, 2.0, 0.0])


def _euler(gmm, x, sigmas):
    """Teacher/student: Euler on the VE probability-flow ODE, returning every state and D."""
    states, denoised = [x], []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = gmm.denoise(x, float(s))
        x = (s_next / s) * x + (1 - s_next / s) * d
        states.append(x)
        denoised.append(d)
    return torch.stack(states), torch.stack(denoised)


def test_optimal_schedule_beats_karras_on_the_gaussian_mixture():
    """At 6 steps the DP schedule from a 160-step teacher has lower error than Karras rho=7."""
    gmm = GaussianMixture.random(4, 8, seed=3)
    sigma_max, sigma_min, steps = 80.0, 0.002, 6
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(256, 8, generator=gen, dtype=torch.float64) * sigma_max
    exact = gmm.ode_solution(x_T, sigma_max, sigma_min)
    teacher_sigmas = karras_sigmas(160, sigma_min, sigma_max)
    states, denoised = _euler(gmm, x_T, teacher_sigmas)
    # Tune on one half of the batch, evaluate on the other.
    chosen = optimal_sigmas(states[:, :128], denoised[:, :128], teacher_sigmas, steps)
    assert chosen[0] == teacher_sigmas[0] and chosen[-1] == teacher_sigmas[-1] and len(chosen) == steps + 1

    def error(sigmas):
        final = _euler(gmm, x_T[128:], list(sigmas))[0][-1]
        return float((final - exact[128:]).pow(2).mean().sqrt())

    karras = karras_sigmas(steps, sigma_min, sigma_max)
    assert error(chosen) < 0.8 * error(karras)
