"""SA-Solver plans: the stochastic Adams predictor and corrector.

Xue et al., "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models"
(NeurIPS 2023, arXiv:2309.05019), in the variant diffusers' ``SASolverScheduler`` implements.  The
sampler integrates the variance-controlled diffusion SDE whose stochasticity ``tau(t)`` is
a free function of time (``tau = 0`` is the probability-flow ODE, ``tau = 1`` the reverse
SDE).  With ``lambda = log(alpha / sigma)``, ``h = lambda_t - lambda_s`` and ``P`` the
Lagrange polynomial through the stored predictions at their ``lambda``, one step from
``s`` to ``t`` is

* data prediction:  x_t = e^{-tau^2 h} (sigma_t/sigma_s) x_s
                          + (1 + tau^2) alpha_t int_{-h}^0 e^{(1 + tau^2) u} P(lambda_t + u) du
                          + sigma_t sqrt(1 - e^{-2 tau^2 h}) z,
* noise prediction: x_t = (alpha_t/alpha_s) x_s
                          - (1 + tau^2) sigma_t int_{-h}^0 e^{-u} P(lambda_t + u) du
                          + tau sigma_t sqrt(e^{2h} - 1) z.

The predictor (SA-Predictor, Adams-Bashforth) interpolates the predictions at ``s`` and
before; the corrector (SA-Corrector, Adams-Moulton) redoes the previous step with the
prediction at ``t`` added and the *same* noise ``z``.  Integrals are taken in the scaled
variable ``u = -h r``, where the interpolation nodes are O(1) apart, so the weights are
well conditioned in float64 (diffusers expands the polynomial in absolute ``lambda``).

One sampler step corrects the incoming sample and predicts the next: both are linear in
the sample, the model output, the stored predictions, the last corrected sample and the
last noise draw, so the step is one :class:`StepProgram`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .program import OUTPUT, StepProgram

ALGORITHM_TYPES = ("data_prediction", "noise_prediction")
#: diffusers' SA-Solver integrates polynomials of degree <= 3.
MAX_ORDER = 4


def default_tau(t) -> float:
    """The authors' default: the SDE (tau = 1) for 200 <= t <= 800, the ODE at both ends."""
    return 1 if t >= 200 and t <= 800 else 0


def exp_moments(a: float, max_power: int) -> list:
    """``J_m(a) = int_0^1 e^{-a r} r^m dr`` for ``m = 0 .. max_power``, accurate for any real ``a``."""
    if abs(a) < 1.0:
        # Taylor series of e^{-a r}: J_m = sum_k (-a)^k / (k! (m + k + 1)); 30 terms pass float64 for |a| < 1.
        terms = [(-a) ** k / math.factorial(k) for k in range(30)]
        return [math.fsum(c / (m + k + 1) for k, c in enumerate(terms)) for m in range(max_power + 1)]
    # Integration by parts, J_m = (m J_{m-1} - e^{-a}) / a: it amplifies errors by m/|a| <= MAX_ORDER.
    moments = [-math.expm1(-a) / a]
    e = math.exp(-a)
    for m in range(1, max_power + 1):
        moments.append((m * moments[-1] - e) / a)
    return moments


@dataclass(frozen=True)
class AdamsUpdate:
    """``x_t = a * x_s + sum_k b[k] * M_{nodes[k]} + c * z``."""

    a: float
    b: tuple
    c: float


def adams_update(
    alpha: Sequence[float], sigma: Sequence[float], lam: Sequence[float], t: int, s: int, nodes: Sequence[int],
    tau: float, predict_x0: bool,
) -> AdamsUpdate:
    """Weights of the SA step from schedule point ``s`` to ``t`` interpolating the predictions at ``nodes``.

    ``nodes`` lists schedule indices newest first: ``s, s-1, ...`` for the predictor,
    ``t, s, s-1, ...`` for the corrector.
    """
    h = lam[t] - lam[s]
    if h == 0.0:
        # A zero-length step (the repeated last sigma of re-spaced and flow schedules) is the identity.
        return AdamsUpdate(1.0, (0.0,) * len(nodes), 0.0)
    tau2 = float(tau) ** 2
    if predict_x0:
        a = math.exp(-tau2 * h) * sigma[t] / sigma[s]
        scale, rate = (1.0 + tau2) * alpha[t], 1.0 + tau2
        c = sigma[t] * math.sqrt(-math.expm1(-2.0 * tau2 * h))
    else:
        a = alpha[t] / alpha[s]
        scale, rate = -(1.0 + tau2) * sigma[t], -1.0
        c = float(tau) * sigma[t] * math.sqrt(math.expm1(2.0 * h))
    # Nodes in r = (lambda_t - lambda) / h; int_{-h}^0 e^{rate u} f du = h int_0^1 e^{-rate h r} f dr.
    r = [(lam[t] - lam[j]) / h for j in nodes]
    moments = exp_moments(rate * h, len(nodes) - 1)
    b = []
    for k, rk in enumerate(r):
        others = r[:k] + r[k + 1:]
        basis = np.atleast_1d(np.poly(others)) / np.prod([rk - rj for rj in others])  # highest power first
        b.append(scale * h * math.fsum(coef * moments[p] for p, coef in zip(range(len(r) - 1, -1, -1), basis)))
    if predict_x0 and len(nodes) == 2:
        # The authors' code (and diffusers) shift h^2 (1/2 - phi_2(-rate h)) / (lambda_n0 - lambda_n1)
        # of weight from the older node to the newer at order 2: an O(h^3) change for few-step runs.
        j0, j1 = exp_moments(rate * h, 1)
        delta = scale * h * h * (0.5 - j0 + j1) / (lam[nodes[0]] - lam[nodes[1]])
        b = [b[0] + delta, b[1] - delta]
    return AdamsUpdate(float(a), tuple(float(v) for v in b), float(c))


def step_orders(
    num_steps: int, start_index: int, predictor_order: int, corrector_order: int, lower_order_final: bool,
) -> tuple:
    """(predictor order per step, corrector order per step) of a run starting at ``start_index``.

    The first steps of a run warm up; ``lower_order_final`` caps the orders by the steps left.
    The corrector at step ``i`` uses the order set at step ``i - 1`` (0 where there is none).
    """
    warm = max(predictor_order, corrector_order - 1)
    pred, corr = [0] * num_steps, [0] * num_steps
    for i in range(start_index, num_steps):
        taken = min(i - start_index, warm)
        left = num_steps - i
        pred[i] = min(min(predictor_order, left) if lower_order_final else predictor_order, taken + 1)
        if i + 1 < num_steps:
            corr[i + 1] = min(min(corrector_order, left + 1) if lower_order_final else corrector_order, taken + 2)
    return pred, corr


def sasolver_plan(
    *,
    alpha: np.ndarray,
    sigma: np.ndarray,
    taus: Sequence[float],
    predictor_order: int,
    corrector_order: int,
    predict_x0: bool,
    lower_order_final: bool,
    start_index: int,
    conversion: Callable[[int], tuple],
) -> list:
    """Programs for every step index of a ``len(alpha) - 1``-step schedule.

    ``taus[i]`` is the stochasticity at timestep ``i`` (the predictor of step ``i`` and the
    corrector of step ``i + 1`` use it, with the same noise); ``conversion(i)`` gives
    ``(p, q)`` with the prediction ``M_i = p * sample + q * model_output``.  Slots:
    ``0 .. R-1`` the ring of M (step ``i`` in ``i % R``, ``R = max(orders)``), ``R`` the last
    corrected sample, ``R + 1`` the last noise draw.
    """
    num_steps = len(alpha) - 1
    ring = max(predictor_order, corrector_order)
    last, last_noise = ring, ring + 1
    lam = (np.log(alpha) - np.log(sigma)).tolist()
    alpha, sigma = np.asarray(alpha).tolist(), np.asarray(sigma).tolist()
    pred, corr = step_orders(num_steps, start_index, predictor_order, corrector_order, lower_order_final)
    plan: list[Optional[StepProgram]] = [None] * num_steps
    for i in range(start_index, num_steps):
        p, q = conversion(i)
        keep = i + 1 < num_steps  # the next step corrects from this one
        rows = []
        if corr[i]:
            cu = adams_update(alpha, sigma, lam, i, i - 1, range(i, i - corr[i], -1), taus[i - 1], predict_x0)
            # M_i enters through its definition p*x + q*out (unrounded); older ones from the ring.
            terms = {last: cu.a, "x": cu.b[0] * p, "out": cu.b[0] * q, last_noise: cu.c}
            for k, w in enumerate(cu.b[1:], start=1):
                terms[(i - k) % ring] = w
            rows.append((last, terms))
            base = last
        else:
            if keep:
                rows.append((last, {"x": 1.0}))
            base = "x"
        if keep:
            rows.append((i % ring, {"x": p, "out": q}))
        pu = adams_update(alpha, sigma, lam, i + 1, i, range(i, i - pred[i], -1), taus[i], predict_x0)
        if keep and pu.c:
            # The corrector of step i + 1 reuses this draw; written after this step's corrector read the old one.
            rows.append((last_noise, {"noise": 1.0}))
        out = {base: pu.a}
        out["x"] = out.get("x", 0.0) + pu.b[0] * p
        out["out"] = pu.b[0] * q
        for k, w in enumerate(pu.b[1:], start=1):
            out[(i - k) % ring] = w
        if pu.c:
            out["noise"] = pu.c
        rows.append((OUTPUT, out))
        plan[i] = StepProgram.build(ring + 2, rows)
    return plan
