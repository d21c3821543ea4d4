"""Schedule state shared by the "Karras-style" drop-ins (Euler, Euler-ancestral, Heun).

These diffusers schedulers integrate in VE units: the sample is ``x = x0 + sigma * eps``
(the VP sample divided by ``alpha_t``), the model sees ``x / sqrt(sigma^2 + 1)`` and
sampling starts from noise of std ``init_noise_sigma``. Training schedule attributes are
diffusers' float32 tensors, bit for bit; every per-step scalar (input scale, plan
coefficient) is computed on the host when timesteps are set.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from .. import schedules
from ..solvers.euler import data_prediction
from ..solvers.program import StepProgram
from .diffusers_base import LazyStepTuple, check_choice
from .vp import VPScheduleMixin

logger = logging.get_logger(__name__)


class KarrasScheduleMixin(VPScheduleMixin):
    """Needs ``self.config`` with diffusers' beta keys and ``timestep_spacing``; pair with FusedSchedulerMixin."""

    def _init_karras_schedule(self, beta_schedules=schedules.BETA_SCHEDULES[:3]) -> None:
        """betas / alphas / alphas_cumprod as diffusers' __init__ stores them, sigmas = training sigmas + 0."""
        cfg = self.config
        check_choice("timestep_spacing", cfg.timestep_spacing, schedules.TIMESTEP_SPACINGS)
        if cfg.trained_betas is None:
            check_choice("beta_schedule", cfg.beta_schedule, beta_schedules)
        num_train = None if cfg.trained_betas is not None else cfg.num_train_timesteps
        betas = schedules.betas_for_schedule(
            cfg.beta_schedule, num_train, cfg.beta_start, cfg.beta_end, cfg.trained_betas, precision="float32"
        )
        rescale = bool(getattr(cfg, "rescale_betas_zero_snr", False))
        if rescale:
            betas = schedules.rescale_zero_terminal_snr(betas, precision="float32")
        # Zero terminal SNR makes the last sigma infinite; diffusers uses fp16's smallest subnormal.
        final = schedules.ZERO_SNR_ALPHA_CUMPROD if rescale else None
        alphas_cumprod = schedules.alphas_cumprod_from_betas(betas, final_alpha_cumprod=final, precision="float32")
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod).float()
        self.num_inference_steps = None
        self.is_scale_input_called = False
        train_sigmas = schedules.vp_sigmas(alphas_cumprod, precision="float32")
        self._sigmas64 = np.append(train_sigmas[::-1], 0.0)
        self.sigmas = torch.from_numpy(self._sigmas64.astype(np.float32))
        self._derive_ve_state()

    def _set_karras_schedule(self, scheduler_name: str, num_inference_steps, device, **kwargs) -> None:
        self._set_schedule(scheduler_name, num_inference_steps, device, **kwargs)
        self._derive_ve_state()

    def _timesteps_for_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        # diffusers' Euler with custom sigmas: log-sigma interpolation on the float32 training sigmas.
        train = schedules.vp_sigmas(self.alphas_cumprod.double().numpy(), precision="float32")
        return schedules.sigma_to_t(sigmas, np.log(train.astype(np.float64)))

    def _install_plan_sigmas(self, sigmas: np.ndarray, device) -> None:
        super()._install_plan_sigmas(sigmas, device)
        if getattr(self, "_continuous_timesteps", False):
            self.timesteps = self._noise_conditioning(self.sigmas[:-1]).to(device)
        self._derive_ve_state()

    def _denoised_conversion(self, i: int) -> tuple:
        return data_prediction(self.config.prediction_type, float(self._sigmas64[i]))

    def _derive_ve_state(self) -> None:
        # diffusers evaluates both on its float32 CPU sigmas; doing the same here gives its exact values.
        self._input_scale = ((self.sigmas**2 + 1) ** 0.5).tolist()
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            self.init_noise_sigma = float(max_sigma)
        else:
            self.init_noise_sigma = float((max_sigma**2 + 1) ** 0.5)

    def _init_step_index(self, timestep) -> None:
        # scale_model_input may start the run before step() does.
        super()._init_step_index(timestep)
        self._run_start = self._step_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)``: the VP-scaled input the network was trained on."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample / self._input_scale[self._step_index]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x0 + sigma * noise`` at each sample's timestep (VE units, unscaled)."""
        if original_samples.shape != noise.shape:
            raise ValueError(f"noise must have shape {tuple(original_samples.shape)}, got {tuple(noise.shape)}")
        indices = self._step_indices(timesteps, original_samples.shape[0])
        view = (-1,) + (1,) * (original_samples.dim() - 1)
        sigma = self.sigmas[indices].to(device=original_samples.device, dtype=original_samples.dtype)
        return original_samples + noise * sigma.reshape(view)

    # -- step helpers ------------------------------------------------------------------------
    def _check_step_call(self, timestep) -> None:
        """diffusers' Euler schedulers reject step indices passed as timesteps and warn on unscaled input."""
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                f"timestep must be one of {type(self).__name__}.timesteps, got the integer {timestep!r} "
                "(an index from enumerate(timesteps)?)"
            )
        if not self.is_scale_input_called:
            logger.warning("call scale_model_input before step: the model input must be divided by sqrt(sigma^2 + 1)")

    @staticmethod
    def _unify_dtypes(model_output: torch.Tensor, sample: torch.Tensor) -> tuple:
        """Both in the wider dtype, where diffusers' arithmetic would promote them."""
        if model_output.dtype == sample.dtype:
            return model_output, sample
        dtype = torch.promote_types(model_output.dtype, sample.dtype)
        return model_output.to(dtype), sample.to(dtype)

    def _step_noise(self, program: StepProgram, sample: torch.Tensor, generator, drawn_by_diffusers: bool):
        noise = self._noise_for(program, sample, generator)
        if noise is None and drawn_by_diffusers and self.philox_seed is None:
            # diffusers draws here even where the noise is scaled by 0 (last ancestral step,
            # s_noise = 0): drawing too keeps a shared generator in step with diffusers.
            randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return noise

    def _pred_original(self, sample, model_output, p: float, q: float, noise_coeff: float = 0.0,
                       noise: Optional[torch.Tensor] = None, philox_offset: int = 0) -> torch.Tensor:
        """The data prediction, including the churn noise the step added to the sample."""
        return self._data_prediction(sample, model_output, p, q, noise_coeff, noise, philox_offset)

    def _finish(self, prev_sample: torch.Tensor, pred_original: Callable[[], torch.Tensor], output_cls,
                return_dict: bool, dtype: torch.dtype):
        """Advance the step index and return diffusers' ``(prev_sample, pred_original_sample)`` or dataclass."""
        self._step_index += 1
        prev_sample = prev_sample.to(dtype)
        if not return_dict:
            return LazyStepTuple(prev_sample, pred_original)
        return output_cls(prev_sample=prev_sample, pred_original_sample=pred_original())
