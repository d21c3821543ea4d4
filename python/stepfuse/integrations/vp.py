"""Schedule state shared by the VP-discrete drop-ins (DPM-Solver, UniPC, ...).

Training schedule (betas, alphas_cumprod) in float64 with float32 tensor copies
under diffusers' attribute names; inference schedule as float64 arrays from which
every plan is built.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import schedules


class VPScheduleMixin:
    """Needs ``self.config`` with diffusers' beta keys and ``use_flow_sigmas`` (optional)."""

    def _init_vp_schedule(self) -> None:
        cfg = self.config
        betas = schedules.betas_for_schedule(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.trained_betas
        )
        if getattr(cfg, "rescale_betas_zero_snr", False):
            betas = schedules.rescale_zero_terminal_snr(betas)
        alphas_cumprod = schedules.alphas_cumprod_from_betas(betas)
        if getattr(cfg, "rescale_betas_zero_snr", False):
            # Zero terminal SNR makes the last sigma infinite; diffusers uses fp16's smallest subnormal.
            alphas_cumprod[-1] = 2.0**-24
        self._alphas_cumprod64 = alphas_cumprod
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod).float()
        self._alpha_t64 = np.sqrt(alphas_cumprod)
        self._sigma_t64 = np.sqrt(1.0 - alphas_cumprod)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1.0 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        train_sigmas = schedules.vp_sigmas(alphas_cumprod)
        self.sigmas = torch.from_numpy(train_sigmas).float()
        # Until set_timesteps, add_noise works on the training schedule.
        self._sigmas64 = train_sigmas
        self.init_noise_sigma = 1.0

    @property
    def _train_sigmas64(self) -> np.ndarray:
        return schedules.vp_sigmas(self._alphas_cumprod64)

    def _alpha_sigma64(self, sigmas: np.ndarray) -> tuple:
        kind = "flow" if getattr(self.config, "use_flow_sigmas", False) else "vp"
        return schedules.sigma_to_alpha_sigma_t(sigmas, kind)

    def _set_schedule(self, scheduler_name: str, num_inference_steps, device, **kwargs) -> None:
        """Install the inference schedule diffusers' ``scheduler_name`` computes for this config.

        Sigma values are diffusers' float32 ones, so results match diffusers; every
        coefficient derived from them is float64.
        """
        arrays = schedules.diffusers_set_timesteps(
            scheduler_name, num_inference_steps, self.config, precision="float32", **kwargs
        )
        sigmas = np.asarray(arrays.sigmas, dtype=np.float64)
        self._sigmas64 = sigmas
        self._alpha64, self._sigma64 = self._alpha_sigma64(sigmas)
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        timesteps = np.asarray(arrays.timesteps)
        dtype = torch.int64 if np.issubdtype(timesteps.dtype, np.integer) else torch.float32
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=dtype)
        self.num_inference_steps = len(timesteps)
        self._reset_run()

    def _install_plan_sigmas(self, sigmas: np.ndarray, device) -> None:
        """A :class:`~stepfuse.solvers.plan.SamplingPlan`'s sigmas as the inference schedule.

        Timesteps follow from the sigmas as diffusers derives them for Karras / exponential
        spacings (log-sigma interpolation on the training schedule, or ``sigma * T`` for flow
        sigmas), rounded when the scheduler's own timesteps are integers.
        """
        self._sigmas64 = sigmas
        self._alpha64, self._sigma64 = self._alpha_sigma64(sigmas)
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        integer = not self.timesteps.dtype.is_floating_point
        t = self._timesteps_for_sigmas(sigmas[:-1])
        t = np.round(t).astype(np.int64) if integer else t.astype(np.float32)
        self.timesteps = torch.from_numpy(t).to(device)
        self.num_inference_steps = len(t)

    def _timesteps_for_sigmas(self, sigmas: np.ndarray) -> np.ndarray:
        if getattr(self.config, "use_flow_sigmas", False) or not hasattr(self, "_alphas_cumprod64"):
            return sigmas * self.config.num_train_timesteps  # flow-match time t = sigma * T
        return schedules.sigma_to_t(sigmas, np.log(self._train_sigmas64))

    def _denoised_conversion(self, i: int) -> tuple:
        # With thresholding the kernel already receives the (thresholded) data prediction.
        return (0.0, 1.0) if getattr(self.config, "thresholding", False) else self._x0_conversion(i)

    def _x0_conversion(self, i: int) -> tuple:
        """(p, q) with the data prediction x0 = p * sample + q * model_output at step i."""
        alpha, sigma = self._alpha64[i], self._sigma64[i]
        return {
            "epsilon": (1.0 / alpha, -sigma / alpha),
            "sample": (0.0, 1.0),
            "v_prediction": (alpha, -sigma),
            # diffusers uses the schedule's own sigma here, VP or flow.
            "flow_prediction": (1.0, -self._sigmas64[i]),
        }[self.config.prediction_type]

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The model input needs no scaling for VP/flow parameterised solvers."""
        return sample

    def _step_indices(self, timesteps: torch.Tensor, batch: int) -> list:
        if self.begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.reshape(-1)]
        index = self.step_index if self.step_index is not None else self.begin_index
        return [index] * batch

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t x0 + sigma_t noise`` at each sample's timestep (VP or flow, per the config)."""
        if original_samples.shape != noise.shape:
            raise ValueError(f"noise must have shape {tuple(original_samples.shape)}, got {tuple(noise.shape)}")
        indices = self._step_indices(timesteps, original_samples.shape[0])
        alpha, sigma = self._alpha_sigma64(self._sigmas64[indices])
        view = (-1,) + (1,) * (original_samples.dim() - 1)
        to = dict(device=original_samples.device, dtype=original_samples.dtype)
        alpha = torch.as_tensor(alpha, **to).reshape(view)
        sigma = torch.as_tensor(sigma, **to).reshape(view)
        return alpha * original_samples + sigma * noise
