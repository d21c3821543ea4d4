"""Drop-in ``DDIMScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from .. import schedules
from ..solvers.ddim import PREDICTION_TYPES, ddim_program, ddim_variance, vp_conversions
from ..solvers.program import StepProgram
from ..solvers.thresholding import dynamic_threshold
from .diffusers_base import FusedSchedulerMixin, LazyStepTuple, check_choice


class DDIMScheduler(FusedSchedulerMixin):
    """DDIM (Song et al. 2021, eq. 12) with diffusers' options: eta, clipping, thresholding, v-prediction.

    Same constructor and config keys as ``diffusers.DDIMScheduler``.  A step's coefficients
    depend only on its timestep (``t`` and ``t - T // n``), ``eta`` and the clipping mode; they
    are computed once in float64 from the float32 ``alphas_cumprod`` diffusers stores and reused.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, schedules.TIMESTEP_SPACINGS)
        if clip_sample and not thresholding and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}")
        # diffusers' float32 tables, bit for bit; every coefficient is float64 math on them.
        betas = schedules.betas_for_schedule(
            beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas, precision="float32"
        )
        if rescale_betas_zero_snr:
            # Lin et al. 2023, Alg. 1; DDIM keeps alphas_cumprod[-1] = 0 (x0 is then only defined for v/sample).
            betas = schedules.rescale_zero_terminal_snr(betas, precision="float32")
        alphas_cumprod = schedules.alphas_cumprod_from_betas(betas, precision="float32")
        self._alphas_cumprod64 = alphas_cumprod
        # Value of alphas_cumprod "before" the first training step, used by the final step.
        self._final_alpha_cumprod64 = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod).float()
        self.final_alpha_cumprod = torch.tensor(self._final_alpha_cumprod64, dtype=torch.float32)
        # sqrt(a), sqrt(1 - a) per training step for add_noise / get_velocity, indexed on the device.
        self._vp_scales64 = torch.from_numpy(np.stack([np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)]))
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.int64))
        self._reset_run()

    def _reset_run(self) -> None:
        super()._reset_run()
        self._programs: dict[tuple, StepProgram] = {}
        self._timestep_values = self._timesteps_host.tolist()  # plain ints: step() reads no tensor

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Timesteps for ``timestep_spacing`` exactly as diffusers computes them."""
        arrays = schedules.diffusers_set_timesteps("DDIMScheduler", num_inference_steps, self.config)
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = torch.from_numpy(np.asarray(arrays.timesteps, dtype=np.int64)).to(device)
        self._reset_run()

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """DDIM's model input needs no scaling."""
        return sample

    # -- coefficients ------------------------------------------------------------------------
    def _alpha_prod_prev(self, t: int) -> float:
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        return float(self._alphas_cumprod64[prev]) if prev >= 0 else self._final_alpha_cumprod64

    def _program_for(self, t: int, eta: float, x0_source: str) -> StepProgram:
        key = (t, eta, x0_source)
        program = self._programs.get(key)
        if program is None:
            a_t = float(self._alphas_cumprod64[t])
            program = ddim_program(a_t, self._alpha_prod_prev(t), eta, self.config.prediction_type, x0_source)
            self._programs[key] = program
        return program

    def _timestep_value(self, timestep, index: int) -> int:
        """The training timestep of this step, found without reading a tensor (no sync on any device).

        A tensor is one of ``self.timesteps``: the step index says which.  A Python or NumPy
        integer is used as given, so loops that step at arbitrary timesteps still match diffusers.
        """
        if isinstance(timestep, torch.Tensor):
            if index >= len(self._timestep_values):
                raise ValueError(
                    f"step index {index} is past the schedule of {len(self._timestep_values)} steps; "
                    "call set_timesteps for a new run, or pass the timestep as a Python int"
                )
            return self._timestep_values[index]
        t = int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep must be in [0, {self.config.num_train_timesteps}), got {t}")
        return t

    def _get_variance(self, timestep, prev_timestep):
        """``std^2 / eta^2`` of DDIM eq. 16 between two training timesteps (diffusers' helper)."""
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return ddim_variance(alpha_prod_t, alpha_prod_prev)

    # -- step --------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """One DDIM step: a single fused kernel, plus the x0 prediction and its clamp when clipping."""
        index = self._begin_step(model_output, timestep, sample)
        cfg = self.config
        t = self._timestep_value(timestep, index)
        eta = float(eta)
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise, not both")
        clip = cfg.thresholding or cfg.clip_sample
        x0_source = "model" if not clip else "clipped_eps" if use_clipped_model_output else "clipped"
        program = self._program_for(t, eta, x0_source)
        noise = self._noise_for(program, sample, generator, variance_noise)
        (p, q), _ = vp_conversions(cfg.prediction_type, float(self._alphas_cumprod64[t]))
        if clip:
            # Clipping is not linear: predict x0 (one fused pass), clip it, then take the linear step.
            x0 = self._data_prediction(sample, model_output, p, q)
            if cfg.thresholding:
                x0 = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            else:
                x0.clamp_(-cfg.clip_sample_range, cfg.clip_sample_range)
            if x0_source == "clipped_eps":
                prev_sample = self._run(program, x0, sample, noise)
            else:
                prev_sample = self._run(program, model_output, sample, noise, history=x0.view(1, *x0.shape))
            pred_original = lambda: x0  # noqa: E731
        else:
            prev_sample = self._run(program, model_output, sample, noise)
            pred_original = lambda: self._data_prediction(sample, model_output, p, q)  # noqa: E731
        self._step_index += 1
        if not return_dict:
            return LazyStepTuple(prev_sample, pred_original)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original())

    # -- forward process ---------------------------------------------------------------------
    def _scales_at(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple:
        """``sqrt(a_t)`` and ``sqrt(1 - a_t)`` at training ``timesteps``, shaped to broadcast over ``like``."""
        timesteps = torch.as_tensor(timesteps, device=like.device)
        scales = self._vp_scales64.to(device=like.device, dtype=like.dtype)[:, timesteps.reshape(-1)]
        view = (2, -1) + (1,) * (like.dim() - 1)
        alpha, sigma = scales.reshape(view)
        return alpha, sigma

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (Ho et al. 2020, eq. 4)."""
        if original_samples.shape != noise.shape:
            raise ValueError(f"noise must have shape {tuple(original_samples.shape)}, got {tuple(noise.shape)}")
        alpha, sigma = self._scales_at(timesteps, original_samples)
        return alpha * original_samples + sigma * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target ``sqrt(a_t) noise - sqrt(1 - a_t) x0`` (Salimans & Ho 2022)."""
        alpha, sigma = self._scales_at(timesteps, sample)
        return alpha * noise - sigma * sample
