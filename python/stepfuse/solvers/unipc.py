"""UniPC multistep plans: the UniP predictor and UniC corrector, B(h) form, any order.

Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models" (2023), Sec. 3, in the variant diffusers' ``UniPCMultistepScheduler``
implements.  With ``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s0``,
``hh = -h`` (data prediction, ``predict_x0``) or ``h`` (noise prediction) and M the
working quantity (x0 or eps prediction), one update from ``s0`` to ``t`` is

    x_t = A x_s0 - C (e^hh - 1) M_s0 - C B(h) sum_k rho_k (M_sk - M_s0) / r_k,
    A = sigma_t/sigma_s0, C = alpha_t  (data)   or   A = alpha_t/alpha_s0, C = sigma_t  (noise),

with ``r_k = (lambda_sk - lambda_s0) / h`` and ``B(h) = hh`` ("bh1") or ``e^hh - 1`` ("bh2").
The weights ``rho`` solve ``R rho = g``, ``R[j, k] = r_k^j`` and ``g_j`` the scaled
phi-functions ``j! hh phi_{j+1}(hh) / B(h)``.  The predictor UniP-p uses the p - 1 past
points; the corrector UniC-p adds the model output at ``t`` itself as the point ``r = 1``.

A step of the sampler corrects the incoming sample with the new model output and then
predicts the next one from the corrected sample.  Both are linear in the sample, the
stored corrected sample and the stored predictions, so the whole step is one
:class:`StepProgram`: UniC into the "last sample" slot, M_i into its ring slot, UniP as
the output row.  The small linear systems are solved here, in float64, once per plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Collection, Optional

import numpy as np

from .program import OUTPUT, StepProgram

SOLVER_TYPES = ("bh1", "bh2")


@dataclass(frozen=True)
class BhUpdate:
    """``x_t = a * x_s0 + sum_k m[k] * M_sk + new * M_t``; ``m[0]`` weighs ``M_s0``, ``m[k]`` the k-th older point."""

    a: float
    m: tuple
    new: float = 0.0


def bh_update(
    alpha: np.ndarray,
    sigma: np.ndarray,
    t: int,
    s0: int,
    order: int,
    *,
    predict_x0: bool,
    solver_type: str,
    corrector: bool,
) -> BhUpdate:
    """Weights of the order-``order`` UniP (``corrector=False``) or UniC update from point ``s0`` to ``t``.

    Past points are ``s0 - 1, s0 - 2, ...``; ``alpha``/``sigma`` are the float64 VP (or
    flow) coefficients of every schedule point.
    """
    alpha_t, sigma_t, alpha_s0, sigma_s0 = alpha[t], sigma[t], alpha[s0], sigma[s0]
    if sigma_t == 0.0:
        # lambda_t = inf. Only the first-order update has a limit: x_t = alpha_t * x0_s0 (the
        # D-terms grow like 1/r_k with r_k -> 0). diffusers evaluates 0 * inf here (NaN for
        # bh1 and for noise prediction); this is the value those expressions tend to.
        if corrector or order != 1:
            raise ValueError(
                f"a UniPC update of order {order} cannot land on sigma = 0; use lower_order_final=True "
                "or final_sigmas_type='sigma_min'"
            )
        if predict_x0:
            return BhUpdate(0.0, (float(alpha_t),))
        return BhUpdate(float(alpha_t / alpha_s0), (float(-alpha_t * sigma_s0 / alpha_s0),))

    def lam(i: int) -> float:
        return math.log(alpha[i]) - math.log(sigma[i])

    h = lam(t) - lam(s0)
    if h == 0.0:
        # A zero-length step (final_sigmas_type="sigma_min" repeats the last sigma for flow and
        # karras/exponential/beta schedules) is the identity; diffusers gets there through 0 * finite
        # terms at order <= 2 and NaN from a singular system at order >= 3.
        return BhUpdate(1.0, (0.0,) * order)
    r = np.array([(lam(s0 - k) - lam(s0)) / h for k in range(1, order)] + [1.0])
    hh = -h if predict_x0 else h
    h_phi_1 = math.expm1(hh)
    b_h = hh if solver_type == "bh1" else h_phi_1
    # g_j = j! hh phi_{j+1}(hh) / B(h) through phi_{k+1}(h) = (phi_k(h) - 1/k!) / h, phi_1(h) = (e^h - 1) / h.
    g, h_phi_k, factorial = [], h_phi_1 / hh - 1.0, 1.0
    for j in range(1, order + 1):
        g.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    vandermonde = np.vander(r, order, increasing=True).T  # R[j, k] = r_k^j
    g = np.array(g)
    # UniC-1 and UniP-2 take rho = 1/2 instead of solving their 1x1 systems, as the authors'
    # code and diffusers do.
    if corrector:
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(vandermonde, g)
    elif order == 1:
        rho = np.zeros(0)
    elif order == 2:
        rho = np.array([0.5])
    else:
        rho = np.linalg.solve(vandermonde[:-1, :-1], g[:-1])

    a, c = (sigma_t / sigma_s0, alpha_t) if predict_x0 else (alpha_t / alpha_s0, sigma_t)
    # Expand the divided differences D_k = (M_sk - M_s0) / r_k into the stored points.
    past = [-c * b_h * rho[k - 1] / r[k - 1] for k in range(1, order)]
    new = -c * b_h * rho[-1] if corrector else 0.0
    m0 = -c * h_phi_1 - sum(past) - new
    return BhUpdate(float(a), tuple(float(v) for v in [m0, *past]), float(new))


def unipc_plan(
    *,
    alpha: np.ndarray,
    sigma: np.ndarray,
    solver_order: int,
    solver_type: str,
    predict_x0: bool,
    start_index: int,
    step_order: Callable[[int, int], int],
    conversion: Callable[[int], tuple],
    disable_corrector: Collection[int] = (),
    predictor: bool = True,
) -> list:
    """Programs for every step index of a ``len(alpha) - 1``-step schedule.

    ``step_order(i, taken)`` is the predictor order at step ``i`` after ``taken`` steps of
    this run (the corrector at step ``i`` reuses the order of step ``i - 1``);
    ``conversion(i)`` gives ``(p, q)`` with ``M_i = p * sample + q * model_output``.
    Slots: ``0 .. solver_order - 1`` the ring of M (step ``i`` in ``i % solver_order``),
    ``solver_order`` the last corrected sample.  ``predictor=False`` outputs the corrected
    sample instead (another solver then predicts from it).
    """
    num_steps = len(alpha) - 1
    ring, last = solver_order, solver_order
    slots = solver_order + 1
    kw = dict(predict_x0=predict_x0, solver_type=solver_type)

    def corrects(i: int) -> bool:
        return start_index < i < num_steps and (i - 1) not in disable_corrector

    plan: list[Optional[StepProgram]] = [None] * num_steps
    for i in range(start_index, num_steps):
        p, q = conversion(i)
        rows = []
        if corrects(i):
            # UniC with the order of the previous predictor; reads M_{i-solver_order}'s slot
            # before the next row reuses it for M_i.
            cu = bh_update(alpha, sigma, i, i - 1, step_order(i - 1, i - 1 - start_index), corrector=True, **kw)
            terms = {last: cu.a, "x": cu.new * p, "out": cu.new * q}
            for k, w in enumerate(cu.m):
                terms[(i - 1 - k) % ring] = terms.get((i - 1 - k) % ring, 0.0) + w
            rows.append((last, terms))
            base = {last: 1.0}
        else:
            if corrects(i + 1):
                rows.append((last, {"x": 1.0}))
            base = {"x": 1.0}
        if i + 1 < num_steps:
            rows.append((i % ring, {"x": p, "out": q}))
        if not predictor:
            rows.append((OUTPUT, base))
            plan[i] = StepProgram.build(slots, rows)
            continue
        pu = bh_update(alpha, sigma, i + 1, i, step_order(i, i - start_index), corrector=False, **kw)
        # M_i enters through its definition p*x + q*out: with an uncorrected base the x
        # coefficients then combine in float64 (the first step from sigma_max is ill-conditioned).
        out = {key: pu.a * v for key, v in base.items()}
        out["x"] = out.get("x", 0.0) + pu.m[0] * p
        out["out"] = pu.m[0] * q
        for k, w in enumerate(pu.m[1:], start=1):
            out[(i - k) % ring] = w
        rows.append((OUTPUT, out))
        plan[i] = StepProgram.build(slots, rows)
    return plan
