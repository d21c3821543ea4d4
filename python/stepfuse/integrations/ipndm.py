"""Drop-in ``IPNDMScheduler``: improved pseudo numerical multistep, each step one fused op.

iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
the improved variant of Liu et al. 2022's PNDM) runs the DDIM transfer with an eps-like
quantity extrapolated by Adams-Bashforth, lower orders warming it up instead of PNDM's
Runge-Kutta start:

    e_i    = beta_i * x_i + alpha_i * out_i
    e'_i   = sum_j w^(k)_j * e_{i-j},           k = min(steps taken + 1, 4)
    x_{i+1} = alpha_{i+1} * (x_i - beta_i * e'_i) / max(alpha_i, 1e-8) + beta_{i+1} * e'_i

with diffusers' schedule ``beta = sin(pi t / 2)^2``, ``alpha = sqrt(1 - beta^2)`` on the
grid ``t = 1, 1 - 1/N, ..., 0`` (or the given ``trained_betas``). Everything but ``e``'s
past values is folded into one float64 row per step; the past ``e`` live in a 4-slot ring.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from .diffusers_base import FusedSchedulerMixin
from .k_diffusion import _ring_program
from .karras import KarrasScheduleMixin

#: Adams-Bashforth weights of orders 1-4 on equal steps, newest first.
AB_WEIGHTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)
PNDM_ORDER = len(AB_WEIGHTS)
# diffusers' guard against alpha = 0 at t = 1 (the pure-noise end of the grid).
MIN_ALPHA = 1e-8


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_trained_betas(trained_betas) -> None:
    if trained_betas is None:
        return
    try:
        betas = np.asarray(trained_betas, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trained_betas must be a 1-D sequence of floats, got {type(trained_betas).__name__}") from exc
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"trained_betas must be 1-D with at least 2 entries, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)) or np.any(betas < 0) or np.any(betas > 1):
        raise ValueError("trained_betas must be finite values in [0, 1] (alpha = sqrt(1 - beta^2))")


def ipndm_plan(betas, alphas, num_steps: int, start_index: int) -> list:
    """One ring program per step from float64 ``betas``/``alphas``; slot ``i % 4`` holds ``e_i``.

    The warm-up order counts the steps of this run, as diffusers' ``ets`` list starts empty.
    """
    plan: list = [None] * num_steps
    for i in range(start_index, num_steps):
        beta, alpha, next_beta, next_alpha = betas[i], alphas[i], betas[i + 1], alphas[i + 1]
        weights = AB_WEIGHTS[min(i - start_index, PNDM_ORDER - 1)]
        scale = next_alpha / max(alpha, MIN_ALPHA)
        # x_{i+1} = scale * x_i + (beta_{i+1} - scale * beta_i) * e'_i
        c = next_beta - scale * beta
        update = {"x": scale + c * weights[0] * beta, "out": c * weights[0] * alpha}
        past = [c * w for w in weights[1:]]
        plan[i] = _ring_program(PNDM_ORDER, i, {"x": beta, "out": alpha}, update, past,
                                store=i + 1 < num_steps)
    return plan


class IPNDMScheduler(FusedSchedulerMixin):
    """Fourth-order improved pseudo linear multistep; same API as ``diffusers.IPNDMScheduler``.

    As in diffusers, ``trained_betas`` replaces the whole grid, so it sets the number of steps
    (``len(trained_betas) - 1``) whatever ``num_inference_steps`` says.
    """

    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, trained_betas=None):
        _check_positive_int("num_train_timesteps", num_train_timesteps)
        _check_trained_betas(trained_betas)
        # diffusers' __init__ sets the training-length grid; its plan is built only if stepped.
        type(self).set_timesteps.__wrapped__(self, num_train_timesteps)
        self.init_noise_sigma = 1.0
        self.pndm_order = PNDM_ORDER

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """diffusers' grid in float32 (the attributes match bit for bit); the plan in float64."""
        self.num_inference_steps = _check_positive_int("num_inference_steps", num_inference_steps)
        if self.config.trained_betas is not None:
            self.betas = torch.tensor(self.config.trained_betas, dtype=torch.float32)
        else:
            steps = torch.cat([torch.linspace(1, 0, num_inference_steps + 1)[:-1], torch.zeros(1)])
            self.betas = torch.sin(steps * math.pi / 2) ** 2
        self.alphas = (1.0 - self.betas**2) ** 0.5
        self.timesteps = (torch.atan2(self.betas, self.alphas) / math.pi * 2)[:-1].to(device)
        self._betas64 = self.betas.double().tolist()
        self._alphas64 = self.alphas.double().tolist()
        self._reset_run()

    def _build_plan(self, start_index: int) -> list:
        return ipndm_plan(self._betas64, self._alphas64, len(self.timesteps), start_index)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """iPNDM's model takes the sample unscaled."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One iPNDM step: a single fused kernel writing ``e_i`` to the ring and ``x_{i+1}``."""
        i = self._begin_step(model_output, timestep, sample)
        model_output, sample = KarrasScheduleMixin._unify_dtypes(model_output, sample)
        prev_sample = self._run(self._program_at(i), model_output, sample)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
