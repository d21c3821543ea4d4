"""DPM-Solver and DPM-Solver++ multistep and singlestep plans (orders 1-3, ODE and SDE variants).

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

Singlestep (DPM-Solver-2/3, DPM-Solver++(2S)) groups ``k`` consecutive steps: each step of a
group updates from the sample at the group's start ``g`` with the outputs of the group so far,
so the plan keeps ``x_g`` and the group's earlier outputs in history slots.
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


@dataclass(frozen=True)
class ExponentialWeights:
    """Weights of one exponential-integrator update from ``s`` to ``t`` (``h = lambda_t - lambda_s``).

    ``x_t = a x_s + phi1 D0 + w1 D1 + w2 D2 + noise z`` with ``D0`` the working quantity at ``s``
    and ``D1``/``D2`` its first and second finite differences in lambda: the Taylor-expanded
    exponential integrator of DPM-Solver (sec. 3), in data-prediction form for DPM-Solver++.
    ``w1``/``w2`` are ``None`` where the variant or the point (``sigma_t = 0``) has no such term.
    """

    a: float
    phi1: float
    w1: Optional[float]
    w2: Optional[float]
    noise: float = 0.0


def exponential_weights(
    algorithm_type: str, alpha_s: float, sigma_s: float, alpha_t: float, sigma_t: float, h: float
) -> ExponentialWeights:
    """The update weights of ``algorithm_type`` for a step of length ``h`` in lambda."""
    if h == 0.0:
        # A zero-length step (a repeated final sigma) is the identity, diffusers' limit too.
        return ExponentialWeights(1.0, 0.0, None, None, 0.0)
    if sigma_t == 0.0:
        # lambda_t = inf: the data-prediction update collapses to x_t = alpha_t * D0.
        return ExponentialWeights(0.0, alpha_t, None, None, 0.0)
    data = algorithm_type in ("dpmsolver++", "sde-dpmsolver++")
    em1 = math.expm1(-h) if data else math.expm1(h)  # e^{-h} - 1 or e^{h} - 1
    noise, w2 = 0.0, None
    if algorithm_type == "dpmsolver++":
        a, phi1 = sigma_t / sigma_s, -alpha_t * em1
        w1 = alpha_t * (em1 / h + 1.0)
        w2 = -alpha_t * ((em1 + h) / h**2 - 0.5)
    elif algorithm_type == "dpmsolver":
        a, phi1 = alpha_t / alpha_s, -sigma_t * em1
        w1 = -sigma_t * (em1 / h - 1.0)
        w2 = -sigma_t * ((em1 - h) / h**2 - 0.5)
    elif algorithm_type == "sde-dpmsolver++":
        e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        a, phi1 = sigma_t / sigma_s * math.exp(-h), alpha_t * e2
        noise = sigma_t * math.sqrt(e2)
        w1 = alpha_t * (e2 / (-2.0 * h) + 1.0)
        w2 = alpha_t * ((e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    else:  # sde-dpmsolver: no third-order update
        a, phi1 = alpha_t / alpha_s, -2.0 * sigma_t * em1
        noise = sigma_t * math.sqrt(math.expm1(2.0 * h))
        w1 = -2.0 * sigma_t * (em1 / h - 1.0)
    return ExponentialWeights(a, phi1, w1, w2, noise)


def _with_differences(w: ExponentialWeights, second: bool) -> ExponentialWeights:
    """``w``, checked to have the D1 (and with ``second`` the D2) weight a higher order needs."""
    if w.w1 is None or (second and w.w2 is None):
        raise ValueError("no higher-order update here (a step to sigma 0, or sde-dpmsolver at order 3)")
    return w


def multistep_coefficients(
    algorithm_type: str, solver_type: str, order: int, alpha: Sequence[float], sigma: Sequence[float],
    lam: Sequence[float], i: int,
) -> StepCoefficients:
    """Coefficients of the order-``order`` update from point ``i`` to ``i + 1`` of the schedule.

    ``alpha``/``sigma``/``lam`` are the VP (or flow) coefficients and half log-SNR of every
    schedule point as Python floats (float64); ``sigma = 0`` (the final point) has
    ``lambda = inf`` and is handled in the limit.
    """
    h = lam[i + 1] - lam[i]
    w = exponential_weights(algorithm_type, alpha[i], sigma[i], alpha[i + 1], sigma[i + 1], h)
    if order == 1 or h == 0.0:
        return StepCoefficients(w.a, (w.phi1,) + (0.0,) * (order - 1), w.noise)
    # The multistep third order always uses the full expansion, whatever the solver type.
    w = _with_differences(w, second=order == 3)

    r0 = (lam[i] - lam[i - 1]) / h
    if order == 2:
        # D1 = (M0 - M1) / r0; midpoint weighs it by phi1 / 2.
        d1 = (0.5 * w.phi1 if solver_type == "midpoint" else w.w1) / r0
        return StepCoefficients(w.a, (w.phi1 + d1, -d1), w.noise)

    r1 = (lam[i - 1] - lam[i - 2]) / h
    # D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1), D1_0 = (M0-M1)/r0, D1_1 = (M1-M2)/r1.
    k = r0 / (r0 + r1)
    # Expand D1 and D2 into the ring entries M0, M1, M2.
    d10 = (1.0 / r0, -1.0 / r0, 0.0)
    d11 = (0.0, 1.0 / r1, -1.0 / r1)
    b = []
    for j in range(3):
        diff = d10[j] - d11[j]
        b.append((w.phi1 if j == 0 else 0.0) + w.w1 * (d10[j] + k * diff) + w.w2 * diff / (r0 + r1))
    return StepCoefficients(w.a, tuple(b), w.noise)


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


def singlestep_orders(num_steps: int, solver_order: int, lower_order_final: bool, final_sigma_zero: bool) -> list:
    """diffusers' ``get_order_list``: the solver order of each step, in groups ``1, 2, .., k``.

    With ``lower_order_final`` the last group never has the full order (``k > 1``); a final
    sigma of zero always ends with a first-order step (the higher orders need lambda finite).
    Without ``lower_order_final`` only whole groups are listed.
    """
    group = list(range(1, solver_order + 1))
    full, rest = divmod(num_steps, solver_order)
    if not lower_order_final:
        orders = group * full
    elif rest == 0 and solver_order > 1:
        orders = group * (full - 1) + group[:-1] + [1]
    else:
        orders = group * full + group[:rest]
    if final_sigma_zero and orders:
        orders[-1] = 1
    return orders


def singlestep_coefficients(
    algorithm_type: str, solver_type: str, order: int, alpha: Sequence[float], sigma: Sequence[float],
    lam: Sequence[float], i: int,
) -> StepCoefficients:
    """Coefficients of the order-``order`` singlestep update ending at point ``i + 1``.

    It starts from the group's first point ``g = i - order + 1``: ``x_{i+1} = a x_g +
    sum_j b[j] M_{g+j}`` (+ ``c`` noise), ``M`` the working quantity at the group's points
    (DPM-Solver Algorithms 1-2 with ``r1``, ``r2`` the intermediate points' lambda offsets).
    """
    g = i - order + 1
    h = lam[i + 1] - lam[g]
    w = exponential_weights(algorithm_type, alpha[g], sigma[g], alpha[i + 1], sigma[i + 1], h)
    if order == 1 or h == 0.0:
        return StepCoefficients(w.a, (w.phi1,) + (0.0,) * (order - 1), w.noise)
    w = _with_differences(w, second=order == 3 and solver_type == "heun")
    # Relative lambda offsets of the group's later points from its start.
    r = [(lam[g + j] - lam[g]) / h for j in range(order)]
    if order == 2 or solver_type == "midpoint":
        # One forward difference D1 = (M_last - M_0) / r_last; midpoint order 2 weighs it by
        # phi1 / 2, every other case by w1 (DPM-Solver-3 drops D2 for its midpoint variant).
        d1 = (0.5 * w.phi1 if order == 2 and solver_type == "midpoint" else w.w1) / r[-1]
        return StepCoefficients(w.a, (w.phi1 - d1,) + (0.0,) * (order - 2) + (d1,), w.noise)
    # D1 = (r2 D1_1 - r1 D1_2) / (r2 - r1), D2 = 2 (D1_2 - D1_1) / (r2 - r1), D1_j = (M_j - M_0) / r_j:
    # exact first and second derivatives (times h, h^2) of a quadratic through the three points.
    r1, r2 = r[1], r[2]
    d1_1 = (-1.0 / r1, 1.0 / r1, 0.0)
    d1_2 = (-1.0 / r2, 0.0, 1.0 / r2)
    b = [
        (w.phi1 if j == 0 else 0.0)
        + w.w1 * (r2 * d1_1[j] - r1 * d1_2[j]) / (r2 - r1)
        + w.w2 * 2.0 * (d1_2[j] - d1_1[j]) / (r2 - r1)
        for j in range(3)
    ]
    return StepCoefficients(w.a, tuple(b), w.noise)


def singlestep_plan(
    *,
    alpha: np.ndarray,
    sigma: np.ndarray,
    algorithm_type: str,
    solver_type: str,
    solver_order: int,
    orders: Sequence[int],
    start_index: int,
    conversion: Callable[[int], tuple],
) -> list:
    """Programs for a singlestep run starting at ``start_index``; ``orders`` from :func:`singlestep_orders`.

    A step's order is ``orders[i]`` cut to the steps taken so far (diffusers' check for missing
    model outputs). History slots (``solver_order`` of them, none for order 1): slot 0 the
    group's start sample ``x_g``, slot 1 the raw model output there (its conversion
    ``M_g = p x_g + q out_g`` is folded into float64 coefficients), slot 2 the converted ``M``
    of the group's second point; each is written only when a later step of the group reads it.
    """
    num_steps = len(alpha) - 1
    if len(orders) < num_steps:
        raise ValueError(f"orders must give the order of each of the {num_steps} steps, got {len(orders)}")
    slots = solver_order if solver_order > 1 else 0
    with np.errstate(divide="ignore"):
        lam = (np.log(alpha) - np.log(sigma)).tolist()
    alpha, sigma = np.asarray(alpha).tolist(), np.asarray(sigma).tolist()
    step_orders = [min(orders[i], i - start_index + 1) for i in range(start_index, num_steps)]
    plan: list[Optional[StepProgram]] = [None] * start_index
    for i, order in enumerate(step_orders, start=start_index):
        continues = i + 1 < num_steps and step_orders[i + 1 - start_index] > 1
        if continues and step_orders[i + 1 - start_index] != order + 1:
            raise ValueError(f"orders must run in groups 1, 2, ..: step {i + 1} has order "
                             f"{step_orders[i + 1 - start_index]} after {order}")
        coeffs = singlestep_coefficients(algorithm_type, solver_type, order, alpha, sigma, lam, i)
        p, q = conversion(i)
        rows = []
        # The current step's M = p x + q out enters through its definition (float64 weights).
        out_terms = {"x": coeffs.b[-1] * p, "out": coeffs.b[-1] * q}
        if order == 1:
            out_terms["x"] += coeffs.a
            if continues:
                rows += [(0, {"x": 1.0}), (1, {"out": 1.0})]
        else:
            pg, qg = conversion(i - order + 1)
            out_terms[0] = coeffs.a + coeffs.b[0] * pg
            out_terms[1] = coeffs.b[0] * qg
            if order == 3:
                out_terms[2] = coeffs.b[1]
            elif continues:
                rows.append((2, {"x": p, "out": q}))
        if coeffs.c:
            out_terms["noise"] = coeffs.c
        plan.append(StepProgram.build(slots, rows + [(OUTPUT, out_terms)]))
    return plan
