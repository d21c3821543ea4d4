"""Euler, Euler-ancestral and Heun plans on VE sigmas (Karras et al. 2022).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models" (2022) write sampling as the probability-flow ODE of the VE form
``x = x0 + sigma * eps`` (a VP sample divided by ``alpha_t``):

    dx/dsigma = (x - D(x; sigma)) / sigma        (eqs. 1 and 3 with sigma(t) = t; Alg. 1 line 4)

with ``D`` the data prediction, an affine function ``D = p * x + q * out`` of the
sample and the raw model output (:func:`data_prediction`). One Euler step from
``sigma`` to ``sigma_to`` is then linear in ``x``, ``out`` and noise
(:func:`euler_terms`); the stochastic variants only add noise before (churn,
Alg. 2 lines 5-6) or after (ancestral sampling) it, and Heun's method (Alg. 1)
averages the slopes of two consecutive model evaluations. diffusers runs Heun
as two scheduler steps on an interleaved schedule, so each stage is one
:class:`StepProgram`; the first stage keeps ``x + dt/2 * d1`` in ring slot 0.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .program import OUTPUT, StepProgram

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SQRT2_MINUS_1 = math.sqrt(2.0) - 1.0


def data_prediction(prediction_type: str, sigma: float) -> tuple:
    """``(p, q)`` with ``D = p * x + q * out`` for a VE sample at noise level ``sigma``.

    epsilon: ``D = x - sigma * eps``. v-prediction (Salimans & Ho 2022, sec. 4, with the
    VP sample ``x / sqrt(sigma^2 + 1)`` and ``alpha_t = 1 / sqrt(sigma^2 + 1)``):
    ``D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v``. sample: ``D = out``.
    """
    if prediction_type == "epsilon":
        return 1.0, -sigma
    if prediction_type == "v_prediction":
        return 1.0 / (sigma * sigma + 1.0), -sigma / math.sqrt(sigma * sigma + 1.0)
    if prediction_type == "sample":
        return 0.0, 1.0
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def euler_terms(p: float, q: float, sigma: float, sigma_to: float, noise_in: float = 0.0,
                noise_out: float = 0.0) -> dict:
    """Row terms of ``x_hat + (sigma_to - sigma) / sigma * (x_hat - D) + noise_out * z``.

    ``x_hat = x + noise_in * z`` and ``D = p * x_hat + q * out``; the slope ``(x_hat - D) / sigma``
    is Karras et al. 2022, Alg. 1 line 4.
    """
    r = (sigma_to - sigma) / sigma
    a = 1.0 + r * (1.0 - p)
    terms = {"x": a, "out": -r * q}
    if noise_in or noise_out:
        terms["noise"] = a * noise_in + noise_out
    return terms


def churn_gamma(s_churn: float, num_steps: int, in_range: bool) -> float:
    """Karras et al. 2022 Alg. 2 line 4: ``min(S_churn / N, sqrt(2) - 1)`` inside ``[S_tmin, S_tmax]``."""
    if not in_range or s_churn <= 0.0:
        return 0.0
    return min(s_churn / num_steps, SQRT2_MINUS_1)


def euler_program(prediction_type: str, sigma: float, sigma_to: float, gamma: float = 0.0,
                  s_noise: float = 1.0) -> tuple:
    """One (optionally churned) Euler step and the ``(p, q, noise)`` of its data prediction.

    With ``gamma > 0`` the sample is first raised to ``sigma_hat = (1 + gamma) sigma`` by noise
    of std ``S_noise sqrt(sigma_hat^2 - sigma^2)`` (Alg. 2 lines 5-6). As in diffusers, an
    epsilon prediction is read at ``sigma_hat`` and a v-prediction at ``sigma``.
    """
    sigma_hat = sigma * (gamma + 1.0)
    noise_in = s_noise * sigma * math.sqrt(gamma * (gamma + 2.0))  # sqrt(sigma_hat^2 - sigma^2)
    p, q = data_prediction(prediction_type, sigma_hat if prediction_type == "epsilon" else sigma)
    program = StepProgram.build(0, [(OUTPUT, euler_terms(p, q, sigma_hat, sigma_to, noise_in=noise_in))])
    return program, (p, q, p * noise_in)


def euler_plan(prediction_type: str, sigmas: np.ndarray, num_steps: int, start_index: int) -> list:
    """Euler steps from ``sigmas[i]`` to ``sigmas[i + 1]`` (Karras et al. 2022, Alg. 2 with S_churn = 0)."""
    plan: list[Optional[StepProgram]] = [None] * num_steps
    for i in range(start_index, num_steps):
        plan[i] = euler_program(prediction_type, float(sigmas[i]), float(sigmas[i + 1]))[0]
    return plan


def ancestral_sigmas(sigma: float, sigma_to: float) -> tuple:
    """``(sigma_down, sigma_up)`` of an ancestral step (eta = 1, as in k-diffusion's get_ancestral_step).

    ``sigma_up^2 = sigma_to^2 (sigma^2 - sigma_to^2) / sigma^2`` and ``sigma_down^2 = sigma_to^2 - sigma_up^2``,
    written without the cancellation: ``sigma_down = sigma_to^2 / sigma``.
    """
    sigma_up = sigma_to * math.sqrt(max(sigma * sigma - sigma_to * sigma_to, 0.0)) / sigma
    return sigma_to * sigma_to / sigma, sigma_up


def euler_ancestral_plan(sigmas: np.ndarray, num_steps: int, start_index: int,
                         conversion: Callable[[int], tuple]) -> list:
    """Euler to ``sigma_down``, then noise of std ``sigma_up``: one program per step."""
    plan: list[Optional[StepProgram]] = [None] * num_steps
    for i in range(start_index, num_steps):
        sigma = float(sigmas[i])
        sigma_down, sigma_up = ancestral_sigmas(sigma, float(sigmas[i + 1]))
        p, q = conversion(i)
        plan[i] = StepProgram.build(0, [(OUTPUT, euler_terms(p, q, sigma, sigma_down, noise_out=sigma_up))])
    return plan


def heun_plan(sigmas: np.ndarray, num_steps: int, start_index: int, conversion: Callable[[int], tuple]) -> list:
    """Heun's method (Karras et al. 2022, Alg. 1) on diffusers' interleaved schedule.

    ``sigmas`` is the interleaved array (``[s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]``), step ``i``
    evaluates the model at ``sigmas[i]`` and ``conversion(i)`` gives its ``(p, q)``. Stages
    alternate from ``start_index`` on (diffusers keys them on its stored ``dt``, not on ``i``):

    * first stage (``sigma = sigmas[i]``, ``sigma_to = sigmas[i + 1]``, ``dt = sigma_to - sigma``):
      slot 0 <- ``x + dt/2 * d1``, output ``x + dt * d1`` (an Euler step);
    * second stage (``dt = sigmas[i] - sigmas[i - 1]``): output ``slot0 + dt/2 * d2`` with the slope
      ``d2 = (x - D) / sigmas[i]`` at the Euler point, i.e. ``x0 + dt (d1 + d2) / 2``.
    """
    plan: list[Optional[StepProgram]] = [None] * num_steps
    for i in range(start_index, num_steps):
        p, q = conversion(i)
        sigma = float(sigmas[i])
        if (i - start_index) % 2 == 0:
            sigma_to = float(sigmas[i + 1])
            rows = [(OUTPUT, euler_terms(p, q, sigma, sigma_to))]
            if i + 1 < num_steps:  # the last step has no second stage to feed
                rows.insert(0, (0, euler_terms(p, q, sigma, 0.5 * (sigma + sigma_to))))
        else:
            half_dt = 0.5 * (sigma - float(sigmas[i - 1]))
            rows = [(OUTPUT, {0: 1.0, "x": half_dt * (1.0 - p) / sigma, "out": -half_dt * q / sigma})]
        plan[i] = StepProgram.build(1, rows)
    return plan
