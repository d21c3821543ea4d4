"""EDM preconditioning and the EDM Euler step (Karras et al. 2022).

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models"
(2022), Table 1: the denoiser is ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F``
with ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)`` and
``|c_out| = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``, so the data prediction
is affine in the sample and the raw network output, as every stepfuse plan needs.
"""

from __future__ import annotations

import math

from .euler import euler_terms
from .program import OUTPUT, StepProgram

EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


def edm_preconditioning(prediction_type: str, sigma: float, sigma_data: float) -> tuple:
    """``(c_skip, c_out)`` of Karras et al. 2022, Table 1, in float64.

    diffusers' EDM schedulers flip the sign of ``c_out`` for ``v_prediction`` (the network
    output is then ``-F``).
    """
    if prediction_type not in EDM_PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {list(EDM_PREDICTION_TYPES)}, got {prediction_type!r}")
    norm = sigma * sigma + sigma_data * sigma_data
    c_out = sigma * sigma_data / math.sqrt(norm)
    return sigma_data * sigma_data / norm, (c_out if prediction_type == "epsilon" else -c_out)


def edm_euler_program(sigma: float, sigma_to: float, conversion, gamma: float = 0.0, s_noise: float = 1.0) -> tuple:
    """One (optionally churned) Euler step and the ``(p, q, noise)`` of its data prediction.

    ``conversion(sigma_hat)`` gives ``(p, q)`` with ``D = p x_hat + q out``; the churn raises
    the sample to ``sigma_hat = (1 + gamma) sigma`` with noise of std
    ``S_noise sqrt(sigma_hat^2 - sigma^2)`` (Karras et al. 2022, Alg. 2 lines 5-6) and the
    denoiser is evaluated at ``sigma_hat`` (line 7).
    """
    sigma_hat = sigma * (gamma + 1.0)
    noise_in = s_noise * sigma * math.sqrt(gamma * (gamma + 2.0))  # sqrt(sigma_hat^2 - sigma^2)
    p, q = conversion(sigma_hat)
    program = StepProgram.build(0, [(OUTPUT, euler_terms(p, q, sigma_hat, sigma_to, noise_in=noise_in))])
    return program, (p, q, p * noise_in)
