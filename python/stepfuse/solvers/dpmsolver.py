"""DPM-Solver and DPM-Solver++ multistep plans (orders 1-3, ODE and SDE variants).

Lu et al., "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model
Sampling in Around 10 Steps" (2022) and "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models" (2022); the SDE variants follow
DPM-Solver++ section 5 / the diffusers ``sde-dpmsolver++`` update.  With
``lambda = log(alpha_t / sigma_t)`` and ``h = lambda_t - lambda_s0``:

* dpmsolver++ (data prediction D):   x_t = (sigma_t/sigma_s0) x - alpha_t (e^{-h} - 1) D0 + ...
* dpmsolver (noise prediction eps):  x_t = (alpha_t/alpha_s0) x - sigma_t (e^{h} - 1) eps0 + ...

Every coefficient depends on the schedule alone, so each step is a
:class:`StepProgram`: write the converted model output into ring slot
``i % order``, then combine the sample with the last ``order`` ring entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .program import OUTPUT, StepProgram

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class StepCoefficients:
    """x_next = a * x + sum_j b[j] * M_j + c * noise, with M_0 the newest ring entry."""

    a: float
    b: tuple
    c: float = 0.0


def multistep_coefficients(
    algorithm_type: str, solver_type: str, order: int, alpha: Sequence[float], sigma: Sequence[float],
    lam: Sequence[float], i: int,
) -> StepCoefficients:
    """Coefficients of the order-``order`` update from point ``i`` to ``i + 1`` of the schedule.

    ``alpha``/``sigma``/``lam`` are the VP (or flow) coefficients and half log-SNR of every
    schedule point as Python floats (float64); ``sigma = 0`` (the final point) has
    ``lambda = inf`` and is handled in the limit.
    """
    alpha_t, sigma_t = alpha[i + 1], sigma[i + 1]
    alpha_s0, sigma_s0 = alpha[i], sigma[i]
    h = lam[i + 1] - lam[i]
    if h == 0.0:
        # A zero-length step (a repeated final sigma) is the identity, diffusers' limit too.
        return StepCoefficients(1.0, (0.0,) * order, 0.0)
    data = algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
    em1 = math.expm1(-h) if data else math.expm1(h)  # e^{-h} - 1 or e^{h} - 1
    noise = 0.0
    if algorithm_type == "dpmsolver++":
        a, phi1 = sigma_t / sigma_s0, -alpha_t * em1
    elif algorithm_type == "dpmsolver":
        a, phi1 = alpha_t / alpha_s0, -sigma_t * em1
    elif algorithm_type == "sde-dpmsolver++":
        a, phi1 = sigma_t / sigma_s0 * math.exp(-h), -alpha_t * math.expm1(-2.0 * h)
        noise = sigma_t * math.sqrt(-math.expm1(-2.0 * h))
    else:  # sde-dpmsolver
        a, phi1 = alpha_t / alpha_s0, -2.0 * sigma_t * em1
        noise = sigma_t * math.sqrt(math.expm1(2.0 * h))
    if sigma_t == 0.0:
        # lambda_t = inf: the data-prediction update collapses to x_t = alpha_t * D0.
        a, phi1, noise = 0.0, alpha_t, 0.0
    if order == 1:
        return StepCoefficients(a, (phi1,), noise)

    r0 = (lam[i] - lam[i - 1]) / h
    if order == 2:
        # D1 = (M0 - M1) / r0; the weight of D1 depends on the variant.
        if solver_type == "midpoint":
            w1 = 0.5 * phi1
        elif algorithm_type == "dpmsolver++":
            w1 = alpha_t * (em1 / h + 1.0)
        elif algorithm_type == "dpmsolver":
            w1 = -sigma_t * (em1 / h - 1.0)
        elif algorithm_type == "sde-dpmsolver++":
            w1 = alpha_t * (-math.expm1(-2.0 * h) / (-2.0 * h) + 1.0)
        else:
            w1 = -2.0 * sigma_t * (em1 / h - 1.0)
        d1 = w1 / r0
        return StepCoefficients(a, (phi1 + d1, -d1), noise)

    r1 = (lam[i - 1] - lam[i - 2]) / h
    # D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1), D1_0 = (M0-M1)/r0, D1_1 = (M1-M2)/r1.
    if algorithm_type == "dpmsolver++":
        w1 = alpha_t * (em1 / h + 1.0)
        w2 = -alpha_t * ((em1 + h) / h**2 - 0.5)
    elif algorithm_type == "dpmsolver":
        w1 = -sigma_t * (em1 / h - 1.0)
        w2 = -sigma_t * ((em1 - h) / h**2 - 0.5)
    elif algorithm_type == "sde-dpmsolver++":
        e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        w1 = alpha_t * (e2 / (-2.0 * h) + 1.0)
        w2 = alpha_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    else:
        raise ValueError("sde-dpmsolver has no third-order update; use solver_order <= 2")
    k = r0 / (r0 + r1)
    # Expand D1 and D2 into the ring entries M0, M1, M2.
    d10 = (1.0 / r0, -1.0 / r0, 0.0)
    d11 = (0.0, 1.0 / r1, -1.0 / r1)
    b = []
    for j in range(3):
        diff = d10[j] - d11[j]
        b.append((phi1 if j == 0 else 0.0) + w1 * (d10[j] + k * diff) + w2 * diff / (r0 + r1))
    return StepCoefficients(a, tuple(b), noise)


def multistep_plan(
    *,
    alpha: np.ndarray,
    sigma: np.ndarray,
    algorithm_type: str,
    solver_type: str,
    solver_order: int,
    start_index: int,
    step_order: Callable[[int, int], int],
    conversion: Callable[[int], tuple],
) -> list:
    """Programs for every step index of a ``len(alpha) - 1``-step schedule.

    ``step_order(i, taken)`` gives the order used at step ``i`` after ``taken`` steps of
    this run; ``conversion(i)`` gives ``(p, q)`` with the solver's working quantity
    ``M_i = p * sample + q * model_output``.  Ring slot of step ``i`` is ``i % solver_order``.
    """
    num_steps = len(alpha) - 1
    slots = solver_order
    with np.errstate(divide="ignore"):
        lam = (np.log(alpha) - np.log(sigma)).tolist()
    alpha, sigma = np.asarray(alpha).tolist(), np.asarray(sigma).tolist()
    plan: list[Optional[StepProgram]] = [None] * num_steps
    for i in range(start_index, num_steps):
        order = step_order(i, i - start_index)
        coeffs = multistep_coefficients(algorithm_type, solver_type, order, alpha, sigma, lam, i)
        p, q = conversion(i)
        # The newest entry enters through its definition p*x + q*out rather than the stored,
        # rounded slot: the x coefficients then combine in float64 (a + b0*p), which removes
        # the cancellation of large terms at high noise levels.
        out_terms = {"x": coeffs.a + coeffs.b[0] * p, "out": coeffs.b[0] * q}
        for j, bj in enumerate(coeffs.b[1:], start=1):
            slot = (i - j) % slots
            out_terms[slot] = out_terms.get(slot, 0.0) + bj
        if coeffs.c:
            out_terms["noise"] = coeffs.c
        plan[i] = StepProgram.build(slots, [(i % slots, {"x": p, "out": q}), (OUTPUT, out_terms)])
    return plan
