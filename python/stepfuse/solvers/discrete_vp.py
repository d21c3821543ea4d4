"""Step programs of the discrete-time VP samplers DDPM, LCM and TCD.

All three read the data prediction ``x0 = p x + q out`` (:func:`~stepfuse.solvers.ddim.vp_conversions`)
at training timestep ``t`` and combine it linearly with the sample and fresh noise, so each
step is one output row.  When the caller clips or thresholds ``x0`` (not linear), it passes
the clipped ``x0`` as the model output and the row reads it with ``(p, q) = (0, 1)``.
``a`` is ``alphas_cumprod`` throughout; every coefficient is float64 host math.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .ddim import vp_conversions
from .program import OUTPUT, StepProgram

#: DDPM noise scales (Ho et al. 2020, sec. 3.2; Nichol & Dhariwal 2021, eq. 15 for the learned ones).
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
#: diffusers clamps the posterior variance before taking its log.
MIN_POSTERIOR_VARIANCE = 1e-20


def _row(x0: tuple, x0_coeff: float, x_coeff: float = 0.0, noise: float = 0.0) -> StepProgram:
    """``x0_coeff * (p x + q out) + x_coeff * x + noise * z`` as a program."""
    p, q = x0
    terms = {"x": x0_coeff * p + x_coeff, "out": x0_coeff * q}
    if noise:
        terms["noise"] = noise
    return StepProgram.build(0, [(OUTPUT, terms)])


def ddpm_posterior(alpha_prod_t: float, alpha_prod_prev: float) -> tuple:
    """``(x0 coeff, x_t coeff, posterior variance, beta_t)`` of Ho et al. 2020, eqs. 6-7.

    ``beta_t = 1 - a_t / a_prev`` is the beta of the (possibly strided) step, as in
    diffusers' respaced DDPM; the variance is clamped at :data:`MIN_POSTERIOR_VARIANCE`.
    """
    beta_prod_t = 1.0 - alpha_prod_t
    current_alpha = alpha_prod_t / alpha_prod_prev
    beta_t = 1.0 - current_alpha
    x0_coeff = math.sqrt(alpha_prod_prev) * beta_t / beta_prod_t
    x_coeff = math.sqrt(current_alpha) * (1.0 - alpha_prod_prev) / beta_prod_t
    variance = max((1.0 - alpha_prod_prev) / beta_prod_t * beta_t, MIN_POSTERIOR_VARIANCE)
    return x0_coeff, x_coeff, variance, beta_t


def ddpm_noise_std(variance_type: str, variance: float, beta_t: float) -> float:
    """Std of the fixed-variance noise; 1 for the learned types, whose scale the model predicts."""
    if variance_type in ("fixed_small", "fixed_small_log"):
        return math.sqrt(variance)  # fixed_small_log: exp(log(var) / 2), the same number
    if variance_type == "fixed_large":
        return math.sqrt(beta_t)
    if variance_type in LEARNED_VARIANCE_TYPES:
        return 1.0
    if variance_type == "fixed_large_log":
        raise ValueError(
            "variance_type='fixed_large_log' cannot sample: diffusers takes the square root of log(beta_t) < 0 "
            "there (NaN); use variance_type='fixed_large'"
        )
    raise ValueError(f"variance_type must be one of {list(VARIANCE_TYPES)}, got {variance_type!r}")


def learned_range_log_std(variance: float, beta_t: float) -> tuple:
    """``(a, b)`` with ``log std = a * v + b`` for the model's ``v`` in [-1, 1] (Nichol & Dhariwal 2021, eq. 15).

    The log variance interpolates ``log(variance)`` (v = -1) and ``log(beta_t)`` (v = 1).
    """
    min_log, max_log = math.log(variance), math.log(beta_t)
    return 0.25 * (max_log - min_log), 0.25 * (max_log + min_log)


def ddpm_program(alpha_prod_t: float, alpha_prod_prev: float, t: int, prediction_type: str, variance_type: str,
                 clipped: bool) -> StepProgram:
    """The posterior mean of eq. 7 plus noise, drawn at every ``t > 0`` as diffusers does."""
    x0_coeff, x_coeff, variance, beta_t = ddpm_posterior(alpha_prod_t, alpha_prod_prev)
    std = ddpm_noise_std(variance_type, variance, beta_t) if t > 0 else 0.0
    x0 = (0.0, 1.0) if clipped else vp_conversions(prediction_type, alpha_prod_t)[0]
    return _row(x0, x0_coeff, x_coeff, std)


def consistency_scalings(timestep: int, timestep_scaling: float, sigma_data: float = 0.5) -> tuple:
    """``(c_skip, c_out)`` of the consistency-model boundary condition (Song et al. 2023, eq. 7; LCM, eq. 9)."""
    scaled = timestep * timestep_scaling
    denom = scaled * scaled + sigma_data * sigma_data
    return sigma_data * sigma_data / denom, scaled / math.sqrt(denom)


def lcm_program(alpha_prod_t: float, alpha_prod_prev: float, c_skip: float, c_out: float, prediction_type: str,
                clipped: bool, noisy: bool) -> StepProgram:
    """Denoise with ``c_skip x + c_out x0``, then re-noise to ``a_prev`` (Luo et al. 2023, Alg. 1)."""
    x0 = (0.0, 1.0) if clipped else vp_conversions(prediction_type, alpha_prod_t)[0]
    if not noisy:
        return _row(x0, c_out, c_skip)
    signal = math.sqrt(alpha_prod_prev)
    return _row(x0, signal * c_out, signal * c_skip, math.sqrt(1.0 - alpha_prod_prev))


def tcd_noised_prediction(alpha_prod_t: float, alpha_prod_s: float, prediction_type: str) -> tuple:
    """``(p, q)`` with ``x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps = p x + q out`` (a DDIM jump from ``t`` to ``s``)."""
    (p, q), (pe, qe) = vp_conversions(prediction_type, alpha_prod_t)
    signal_s, noise_s = math.sqrt(alpha_prod_s), math.sqrt(1.0 - alpha_prod_s)
    return signal_s * p + noise_s * pe, signal_s * q + noise_s * qe


def tcd_program(alpha_prod_t: float, alpha_prod_prev: float, alpha_prod_s: float, prediction_type: str,
                noisy: bool) -> StepProgram:
    """Trajectory Consistency Distillation's strategic stochastic step (Zheng et al. 2024, eq. 14).

    DDIM from ``t`` to ``s = floor((1 - gamma) t_prev)``, then forward noise from ``s`` to
    ``t_prev``: ``x_prev = sqrt(a_prev / a_s) x_s + sqrt(1 - a_prev / a_s) z``.
    """
    x_s = tcd_noised_prediction(alpha_prod_t, alpha_prod_s, prediction_type)
    if not noisy:
        return _row(x_s, 1.0)
    ratio = alpha_prod_prev / alpha_prod_s
    return _row(x_s, math.sqrt(ratio), noise=math.sqrt(max(1.0 - ratio, 0.0)))


def check_custom_timesteps(timesteps, num_train_timesteps: int) -> np.ndarray:
    """User ``timesteps`` as int64: non-empty, strictly descending, in ``[0, num_train_timesteps)``."""
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or len(ts) == 0 or not np.issubdtype(ts.dtype, np.integer):
        raise ValueError(f"timesteps must be a non-empty list of ints, got {timesteps!r}")
    if (np.diff(ts) >= 0).any():
        raise ValueError("timesteps must be in descending order")
    if ts[0] >= num_train_timesteps or ts[-1] < 0:
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}), got {ts[0]} .. {ts[-1]}")
    return ts.astype(np.int64)


def consistency_timesteps(num_train_timesteps: int, original_steps: int, num_inference_steps: Optional[int],
                          timesteps, strength: float, origin: Optional[np.ndarray] = None) -> tuple:
    """``(timesteps, num_inference_steps)`` of diffusers' LCM/TCD ``set_timesteps``, int64 descending.

    The distillation grid is ``k, 2k, ..., original_steps * strength * k`` minus one with
    ``k = T // original_steps`` (``origin`` replaces it); ``num_inference_steps`` points are
    taken from it at evenly spaced indices.  Custom ``timesteps`` are checked and cut to the
    last ``strength`` fraction.
    """
    T = num_train_timesteps
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError("pass exactly one of num_inference_steps and timesteps")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    if not isinstance(original_steps, (int, np.integer)) or not 1 <= original_steps <= T:
        raise ValueError(f"original_inference_steps must be an int in [1, {T}], got {original_steps!r}")
    if origin is None:
        origin = np.arange(1, int(original_steps * strength) + 1, dtype=np.int64) * (T // original_steps) - 1
    if timesteps is not None:
        ts = check_custom_timesteps(timesteps, T)
        n = len(ts)
        start = n - min(int(n * strength), n)
        return ts[start:].astype(np.int64), n
    if not isinstance(num_inference_steps, (int, np.integer)) or not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must be an int in [1, {T}], got {num_inference_steps!r}")
    if num_inference_steps > min(len(origin), original_steps):
        raise ValueError(
            f"num_inference_steps ({num_inference_steps}) must be at most the {len(origin)} distillation timesteps "
            f"and original_inference_steps; original_inference_steps x strength = {original_steps} x {strength}"
        )
    origin = origin[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[indices].astype(np.int64), int(num_inference_steps)
