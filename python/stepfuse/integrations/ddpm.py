"""Drop-in ``DDPMScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from .. import schedules
from ..solvers.discrete_vp import (
    LEARNED_VARIANCE_TYPES,
    VARIANCE_TYPES,
    check_custom_timesteps,
    ddpm_posterior,
    ddpm_program,
    learned_range_log_std,
)
from .diffusers_base import LazyStepTuple, check_choice
from .discrete_vp import DiscreteVPScheduler


def sigmoid_betas(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """GeoDiff's sigmoid schedule (Xu et al. 2022), in float32 like diffusers."""
    ramp = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps))
    return (ramp * (beta_end - beta_start) + beta_start).double().numpy()


class DDPMScheduler(DiscreteVPScheduler):
    """Ancestral sampling of Ho et al. 2020 (eq. 7 posterior), with diffusers' options.

    Same constructor and config keys as ``diffusers.DDPMScheduler``.  Each step's coefficients
    and noise scale depend only on the schedule; ``set_timesteps`` computes them in float64.
    ``variance_type="fixed_large_log"`` is rejected by ``set_timesteps``: diffusers takes the
    square root of a log variance there and samples NaN.
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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        betas = None
        if trained_betas is None and beta_schedule == "sigmoid":
            betas = sigmoid_betas(num_train_timesteps, beta_start, beta_end)
        self._init_tables(betas)
        self.variance_type = variance_type

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None,
                      timesteps: Optional[list] = None) -> None:
        """Spaced timesteps exactly as diffusers computes them, or custom descending ``timesteps``."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass only one of num_inference_steps and timesteps")
        if timesteps is not None:
            ts = check_custom_timesteps(timesteps, self.config.num_train_timesteps)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("pass one of num_inference_steps and timesteps")
            ts = schedules.diffusers_set_timesteps("DDIMScheduler", num_inference_steps, self.config).timesteps
            self.custom_timesteps = False
        self._install_timesteps(ts, len(ts), device)

    def previous_timestep(self, timestep) -> int:
        """The timestep after ``timestep`` in the schedule; -1 after the last one."""
        if self.num_inference_steps is None:
            return int(timestep) - 1
        return self._timestep_after(self._index_of(timestep), -1)

    def _index_of(self, timestep) -> int:
        t = int(timestep)
        try:
            return self._timestep_values.index(t)
        except ValueError:
            raise ValueError(f"timestep {t} is not one of scheduler.timesteps") from None

    def _build_plan(self, start_index: int) -> list:
        # Every step's program, whatever the start: an integer timestep may select any of them.
        cfg = self.config
        values = self._timestep_values
        plan = []
        for i, t in enumerate(values):
            a_t, a_prev = self._alpha_prod(t), self._alpha_prod(self._timestep_after(i, -1), final=1.0)
            plan.append(ddpm_program(a_t, a_prev, t, cfg.prediction_type, cfg.variance_type, self._clips))
        return plan

    def _learned_noise(self, noise: torch.Tensor, predicted_variance: torch.Tensor, index: int) -> torch.Tensor:
        """Noise scaled by the model's own std (Nichol & Dhariwal 2021, sec. 3.1); the program scales it by 1."""
        if self.variance_type == "learned":
            return predicted_variance.sqrt() * noise
        t = self._timestep_values[index]
        _, _, variance, beta_t = ddpm_posterior(self._alpha_prod(t), self._alpha_prod(self._timestep_after(index, -1), 1.0))
        a, b = learned_range_log_std(variance, beta_t)
        return torch.exp(a * predicted_variance + b) * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One ancestral step: a single fused kernel (plus the x0 pass when clipping)."""
        step_index = self._begin_step(model_output, timestep, sample)
        # A tensor timestep is the schedule's own (the step index says which); an integer is looked up.
        index = self._index_of(timestep) if isinstance(timestep, (int, np.integer)) else step_index
        predicted_variance = None
        if self.variance_type in LEARNED_VARIANCE_TYPES:
            if model_output.dim() < 2 or model_output.shape[1] != 2 * sample.shape[1]:
                raise ValueError(
                    f"variance_type={self.variance_type!r} needs model_output with 2 x {sample.shape[1]} channels "
                    f"(mean and variance), got shape {tuple(model_output.shape)}"
                )
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        program = self._program_at(index)
        noise = self._noise_for(program, sample, generator)
        if predicted_variance is not None and program.uses_noise:
            if noise is None:
                raise ValueError("learned variance types scale the noise per element: pass generator, not philox_seed")
            noise = self._learned_noise(noise, predicted_variance, index)
        t = self._timestep_values[index]
        if self._clips:
            x0 = self._clipped_x0(sample, model_output, t)
            prev_sample = self._run(program, x0, sample, noise)
            pred_original = lambda: x0  # noqa: E731
        else:
            prev_sample = self._run(program, model_output, sample, noise)
            p, q = self._x0_conversion(t)
            pred_original = lambda: self._data_prediction(sample, model_output, p, q)  # noqa: E731
        self._step_index += 1
        if not return_dict:
            return LazyStepTuple(prev_sample, pred_original)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original())
