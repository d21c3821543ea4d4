"""DEIS multistep coefficients (log-rho Adams-Bashforth, orders 1-3).

Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator" (ICLR 2023).
With ``rho = sigma_t / alpha_t`` the probability-flow ODE of a VP (or flow) model is
``d(x / alpha) = eps d(rho)``, so one step from ``s0`` to ``t`` is exactly

    x_t / alpha_t = x_s0 / alpha_s0 + int_{rho_s0}^{rho_t} eps(rho) d(rho).

DEIS replaces ``eps`` by the polynomial through the last ``order`` noise predictions; the
variant diffusers ships (``solver_type="logrho"``) interpolates in ``u = log rho``. Each
weight is then ``int e^u l_j(u) du`` for a Lagrange basis polynomial ``l_j``, which has the
closed form ``[e^u (l_j - l_j' + l_j'' - ...)]`` (repeated integration by parts), evaluated
here in float64 with ``u`` measured from ``log rho_s0`` so that short steps stay accurate.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from numpy.polynomial import Polynomial

from .dpmsolver import StepCoefficients

ALGORITHMS = ("deis",)
SOLVER_TYPES = ("logrho",)


def exp_lagrange_integrals(nodes: Sequence[float], hi: float) -> list:
    """``int_0^hi e^u l_j(u) du`` for the Lagrange basis ``l_j`` on ``nodes`` (exact, float64).

    ``hi = -inf`` (a step onto sigma = 0) is the limit: e^u times a polynomial vanishes there.
    """
    weights = []
    for j, node in enumerate(nodes):
        basis = Polynomial([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * Polynomial([-other, 1.0]) / (node - other)
        # e^u P(u) has the antiderivative e^u (P - P' + P'' - ...); P has degree < len(nodes).
        primitive = sum(((-1) ** m) * basis.deriv(m) for m in range(len(nodes)))
        upper = 0.0 if hi == -math.inf else math.exp(hi) * primitive(hi)
        weights.append(float(upper - primitive(0.0)))
    return weights


def deis_coefficients(alpha: Sequence[float], sigma: Sequence[float], i: int, order: int) -> StepCoefficients:
    """Order-``order`` DEIS update from schedule point ``i`` to ``i + 1``.

    ``x_next = a * x + sum_j b[j] * eps_{i-j}``, with ``eps_{i-j}`` the noise prediction of
    step ``i - j``; ``alpha``/``sigma`` are the VP (or flow) coefficients as Python floats.
    A repeated final sigma gives ``hi = 0``: every weight vanishes and the step is the identity;
    a step onto ``sigma = 0`` takes the limit ``rho_t -> 0``.
    """
    if not 1 <= order <= i + 1:
        raise ValueError(f"order must be in [1, {i + 1}] at step {i}, got {order}")
    rho = [sigma[i - j] / alpha[i - j] for j in range(order)]
    rho_t = sigma[i + 1] / alpha[i + 1]
    # u = log(rho / rho_s0), d(rho) = rho_s0 e^u du.
    nodes = [math.log(r / rho[0]) for r in rho]
    weights = exp_lagrange_integrals(nodes, math.log(rho_t / rho[0]) if rho_t > 0.0 else -math.inf)
    alpha_t = alpha[i + 1]
    return StepCoefficients(alpha_t / alpha[i], tuple(alpha_t * rho[0] * w for w in weights))


def noise_conversion(alpha: float, sigma: float, x0: tuple) -> tuple:
    """(p, q) of ``eps = p * x + q * out`` given the data prediction ``x0 = x0[0] * x + x0[1] * out``.

    ``eps = (x - alpha * x0) / sigma`` (the VP relation x = alpha x0 + sigma eps).
    """
    return (1.0 / sigma - alpha / sigma * x0[0], -alpha / sigma * x0[1])


def check_schedule(alpha: np.ndarray, sigma: np.ndarray) -> None:
    """DEIS divides by ``alpha`` and takes ``log(sigma / alpha)`` at every point it starts a step from."""
    alpha, sigma = np.asarray(alpha), np.asarray(sigma)
    if not (np.all(alpha > 0) and np.all(sigma[:-1] > 0) and sigma[-1] >= 0):
        raise ValueError("sigmas must give alpha_t > 0 everywhere and sigma_t > 0 before the last point for DEIS")
