"""Optimal step schedules: choose K of a teacher's N steps by dynamic programming.

A fine teacher run visits sigmas ``s_0 > s_1 > ... > s_N`` with states ``x_n`` and data
predictions ``D_n``.  A student that may only take K steps is restricted to that grid: one
student step from grid point j to grid point i starts from the teacher state ``x_j`` and should
land on ``x_i``.  For the first-order (DDIM / Euler) step on the VE probability-flow ODE,

    x_hat(j -> i) = (s_i / s_j) x_j + (1 - s_i / s_j) D_j

(Karras et al. 2022, Alg. 1 without the Heun correction; DDIM in VE form, Song et al. 2021
eq. 13), so the local error ``cost[j][i] = mean |x_hat(j -> i) - x_i|^2`` of every pair follows
from three Gram matrices of the teacher's states and predictions: no extra model evaluations.
The schedule minimising the summed local error over exactly K steps is then a shortest path
with K edges (Watson et al. 2021; "Optimal Stepsize for Diffusion Sampling", Pei et al. 2025),
solved in C++ (``stepfuse._C.optimal_step_indices``, O(K N^2)).
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from .. import _C


def optimal_step_indices(cost, num_steps: int) -> List[int]:
    """Indices ``0 = i_0 < ... < i_K = N`` minimising ``sum_k cost[i_{k-1}][i_k]``.

    Args:
        cost: ``(N + 1, N + 1)`` array-like of non-negative step costs (only ``j < i`` is read;
            ``inf`` forbids a step).
        num_steps: K, in ``[1, N]``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().to("cpu", torch.float64).numpy()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    return list(_C.optimal_step_indices(cost, int(num_steps)))


def first_order_step_costs(states: torch.Tensor, denoised: torch.Tensor, sigmas: Sequence[float]) -> np.ndarray:
    """``cost[j][i]`` (j < i) of one DDIM/Euler step from teacher point j to teacher point i.

    Args:
        states: ``[N + 1, *shape]`` teacher states at ``sigmas`` (VE form, ``x = x0 + sigma * eps``).
        denoised: ``[N, *shape]`` (or ``[N + 1, ...]``) teacher data predictions at ``sigmas[:N]``.
        sigmas: ``N + 1`` decreasing noise levels, positive except possibly the last.

    Returns the ``(N + 1, N + 1)`` float64 matrix of mean squared errors; entries with ``j >= i``
    are ``inf``.
    """
    sig = np.asarray([float(s) for s in sigmas], dtype=np.float64)
    n_points = len(sig)
    if n_points < 2 or not np.all(np.isfinite(sig)) or np.any(np.diff(sig) >= 0) or np.any(sig[:-1] <= 0):
        raise ValueError("sigmas must be at least 2 finite, strictly decreasing values, positive except the last")
    if not isinstance(states, torch.Tensor) or not isinstance(denoised, torch.Tensor):
        raise TypeError("states and denoised must be torch.Tensors")
    if states.shape[0] != n_points:
        raise ValueError(f"states must have {n_points} entries (one per sigma), got {states.shape[0]}")
    if denoised.shape[0] < n_points - 1 or denoised.shape[1:] != states.shape[1:]:
        raise ValueError(f"denoised must be [{n_points - 1}, *{tuple(states.shape[1:])}], got {tuple(denoised.shape)}")
    x = states.detach().flatten(1).double()
    d = denoised[: n_points - 1].detach().flatten(1).double()
    numel = x.shape[1]
    # |r x_j + (1 - r) D_j - x_i|^2 expanded into inner products (float64 Gram matrices).
    xx = (x @ x.T).cpu().numpy()
    dd = (d @ d.T).cpu().numpy().diagonal()
    xd = (x @ d.T).cpu().numpy()  # xd[i, j] = <x_i, D_j>
    j = np.arange(n_points - 1)[:, None]
    i = np.arange(n_points)[None, :]
    r = sig[i] / sig[j]
    sq = (r**2 * xx[j, j] + (1 - r) ** 2 * dd[j] + xx[i, i] + 2 * r * (1 - r) * xd[j, j]
          - 2 * r * xx[j, i] - 2 * (1 - r) * xd[i, j])
    cost = np.full((n_points, n_points), np.inf)
    upper = i > j
    cost[:-1][upper] = np.maximum(sq[upper], 0.0) / numel
    return cost


def optimal_sigmas(states: torch.Tensor, denoised: torch.Tensor, sigmas: Sequence[float], num_steps: int) -> np.ndarray:
    """The ``num_steps + 1`` teacher sigmas a first-order student should visit (float64)."""
    cost = first_order_step_costs(states, denoised, sigmas)
    return np.asarray([float(sigmas[k]) for k in optimal_step_indices(cost, num_steps)], dtype=np.float64)


__all__ = ["first_order_step_costs", "optimal_sigmas", "optimal_step_indices"]
