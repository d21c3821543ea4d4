"""State shared by the drop-ins that step between integer training timesteps (DDPM, LCM, TCD).

Training tables are diffusers' float32 ones, bit for bit; the forward process
(``add_noise``, ``get_velocity``) is DDIM's; clipping / thresholding of the data
prediction is the one nonlinear pass before the fused step.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .. import schedules
from ..solvers.ddim import PREDICTION_TYPES, vp_conversions
from ..solvers.discrete_vp import consistency_timesteps
from ..solvers.thresholding import dynamic_threshold
from .ddim import DDIMScheduler
from .diffusers_base import FusedSchedulerMixin, check_choice


class DiscreteVPScheduler(FusedSchedulerMixin):
    """Base of DDPM / LCM / TCD; subclasses call :meth:`_init_tables` from ``__init__``."""

    order = 1
    # One forward process for every discrete VP scheduler.
    _scales_at = DDIMScheduler._scales_at
    add_noise = DDIMScheduler.add_noise
    get_velocity = DDIMScheduler.get_velocity

    def _init_tables(self, betas: Optional[np.ndarray] = None, set_alpha_to_one: Optional[bool] = None) -> None:
        """betas / alphas / alphas_cumprod as diffusers' ``__init__`` stores them (``betas`` overrides the schedule)."""
        cfg = self.config
        check_choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, schedules.TIMESTEP_SPACINGS)
        if cfg.clip_sample and not cfg.thresholding and not cfg.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {cfg.clip_sample_range!r}")
        if cfg.thresholding and not 0.0 < cfg.dynamic_thresholding_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {cfg.dynamic_thresholding_ratio!r}")
        if betas is None:
            if cfg.trained_betas is None:
                check_choice("beta_schedule", cfg.beta_schedule, schedules.BETA_SCHEDULES[:3])
            betas = schedules.betas_for_schedule(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start,
                                                 cfg.beta_end, cfg.trained_betas, precision="float32")
        if cfg.rescale_betas_zero_snr:
            # Lin et al. 2023, Alg. 1; alphas_cumprod[-1] stays 0 (x0 then exists only for v / sample).
            betas = schedules.rescale_zero_terminal_snr(betas, precision="float32")
        alphas_cumprod = schedules.alphas_cumprod_from_betas(betas, precision="float32")
        self._alphas_cumprod64 = alphas_cumprod
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod).float()
        if set_alpha_to_one is not None:
            # alphas_cumprod "before" the first training step, where the last step lands.
            self._final_alpha_cumprod64 = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
            self.final_alpha_cumprod = torch.tensor(self._final_alpha_cumprod64, dtype=torch.float32)
        self._vp_scales64 = torch.from_numpy(np.stack([np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)]))
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.from_numpy(np.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=np.int64))
        self._reset_run()

    def _install_timesteps(self, timesteps: np.ndarray, num_inference_steps: int, device) -> None:
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(np.asarray(timesteps, dtype=np.int64)).to(device)
        self._reset_run()

    def _set_consistency_schedule(self, num_inference_steps, device, original_inference_steps, timesteps,
                                  strength: float, dense_origin: bool = False) -> None:
        """LCM / TCD timesteps; ``dense_origin`` takes them from every training step (TCD with an explicit
        ``original_inference_steps``, as diffusers does)."""
        cfg = self.config
        original_steps = original_inference_steps if original_inference_steps is not None else cfg.original_inference_steps
        origin = None
        if dense_origin and original_inference_steps is not None:
            origin = np.arange(0, int(cfg.num_train_timesteps * strength), dtype=np.int64)
        ts, n = consistency_timesteps(cfg.num_train_timesteps, original_steps, num_inference_steps, timesteps,
                                      strength, origin)
        self.custom_timesteps = timesteps is not None
        self._install_timesteps(ts, n, device)

    def _reset_run(self) -> None:
        super()._reset_run()
        self._timestep_values = self._timesteps_host.tolist()  # plain ints: step() reads no tensor
        self._programs: dict = {}

    def _alpha_prod(self, t: int, final: Optional[float] = None) -> float:
        """``alphas_cumprod[t]`` in float64; ``final`` (default ``final_alpha_cumprod``) for ``t < 0``."""
        if t >= 0:
            return float(self._alphas_cumprod64[t])
        return self._final_alpha_cumprod64 if final is None else final

    def _timestep_after(self, index: int, default: int) -> int:
        return self._timestep_values[index + 1] if index + 1 < len(self._timestep_values) else default

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model input needs no scaling."""
        return sample

    @property
    def _clips(self) -> bool:
        return bool(self.config.thresholding or self.config.clip_sample)

    def _clipped_x0(self, sample: torch.Tensor, model_output: torch.Tensor, t: int) -> torch.Tensor:
        """The data prediction at training timestep ``t``, thresholded (Saharia et al. 2022) or clamped."""
        cfg = self.config
        p, q = self._x0_conversion(t)
        x0 = self._data_prediction(sample, model_output, p, q)
        if cfg.thresholding:
            return dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return x0.clamp_(-cfg.clip_sample_range, cfg.clip_sample_range)

    def _x0_conversion(self, t: int) -> tuple:
        return vp_conversions(self.config.prediction_type, self._alpha_prod(t))[0]
