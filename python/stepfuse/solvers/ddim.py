"""DDIM step programs (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021).

With ``a = alphas_cumprod``, a step from training timestep ``t`` to ``t_prev`` is eq. 12

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps + std z,

with the noise scale of eq. 16, ``std = eta * sqrt(variance)``,
``variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)``; ``eta = 0`` is DDIM, ``eta = 1``
the DDPM posterior.  For every prediction type the data prediction ``x0`` and the noise
prediction ``eps`` are linear in the sample and the model output, so the whole step is one
linear row.  Clipping or thresholding ``x0`` is not linear: the caller computes the clipped
``x0`` first and the program reads it as an operand (see :data:`X0_SOURCES`).
"""

from __future__ import annotations

import math

from .program import OUTPUT, StepProgram

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

#: Where the program takes ``x0`` and ``eps`` from.
#: ``"model"``: both from the sample and the raw model output (no clipping);
#: ``"clipped"``: the clipped ``x0`` from history slot 0, ``eps`` from the raw model output;
#: ``"clipped_eps"``: the clipped ``x0`` passed as the model output, ``eps`` re-derived from it
#: (diffusers' ``use_clipped_model_output``, as in GLIDE).
X0_SOURCES = ("model", "clipped", "clipped_eps")


def ddim_variance(alpha_prod_t, alpha_prod_prev):
    """``std^2 / eta^2`` of eq. 16; plain arithmetic, so floats and tensors both work."""
    return (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)


def vp_conversions(prediction_type: str, alpha_prod_t: float) -> tuple:
    """``((p, q), (pe, qe))`` with ``x0 = p x + q out`` and ``eps = pe x + qe out`` at ``a_t``.

    Follows from ``x = sqrt(a) x0 + sqrt(1 - a) eps`` and, for v-prediction (Salimans & Ho
    2022, sec. 4), ``v = sqrt(a) eps - sqrt(1 - a) x0``.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
    alpha, sigma = math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)
    try:
        if prediction_type == "epsilon":
            return (1.0 / alpha, -sigma / alpha), (0.0, 1.0)
        if prediction_type == "sample":
            return (0.0, 1.0), (1.0 / sigma, -alpha / sigma)
        return (alpha, -sigma), (sigma, alpha)
    except ZeroDivisionError:
        # alphas_cumprod = 0 is the last training step after zero-terminal-SNR rescaling.
        raise ValueError(
            f"prediction_type {prediction_type!r} cannot be converted at alphas_cumprod = {alpha_prod_t!r}; "
            "with rescale_betas_zero_snr=True use prediction_type='v_prediction'"
        ) from None


def ddim_program(
    alpha_prod_t: float, alpha_prod_prev: float, eta: float, prediction_type: str, x0_source: str = "model"
) -> StepProgram:
    """The eq. 12 step from ``a_t`` to ``a_prev`` as one output row (float64 coefficients)."""
    if x0_source not in X0_SOURCES:
        raise ValueError(f"x0_source must be one of {list(X0_SOURCES)}, got {x0_source!r}")
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0 (0: DDIM, 1: DDPM), got {eta!r}")
    std = eta * math.sqrt(ddim_variance(alpha_prod_t, alpha_prod_prev))
    direction2 = 1.0 - alpha_prod_prev - std * std
    if direction2 < 0.0:
        if direction2 < -1e-12:  # beyond rounding: sqrt of a negative number, NaN in diffusers
            raise ValueError(
                f"eta={eta} is too large for the step from alphas_cumprod {alpha_prod_t:.6g} to "
                f"{alpha_prod_prev:.6g}: 1 - a_prev - std^2 = {direction2:.3g} < 0; use eta <= 1"
            )
        direction2 = 0.0
    direction, signal = math.sqrt(direction2), math.sqrt(alpha_prod_prev)
    (p, q), (pe, qe) = vp_conversions(prediction_type, alpha_prod_t)
    if x0_source == "model":
        terms, slots = {"x": signal * p + direction * pe, "out": signal * q + direction * qe}, 0
    elif x0_source == "clipped":
        terms, slots = {0: signal, "x": direction * pe, "out": direction * qe}, 1
    else:
        # The clipped x0 is the "out" operand: eps follows from it as for sample prediction.
        _, (pe, qe) = vp_conversions("sample", alpha_prod_t)
        terms, slots = {"x": direction * pe, "out": signal + direction * qe}, 0
    if std:
        terms["noise"] = std
    return StepProgram.build(slots, [(OUTPUT, terms)])
