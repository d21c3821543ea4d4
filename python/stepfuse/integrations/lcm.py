"""Drop-in ``LCMScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from ..solvers.discrete_vp import consistency_scalings, lcm_program
from .diffusers_base import LazyStepTuple
from .discrete_vp import DiscreteVPScheduler


class LCMScheduler(DiscreteVPScheduler):
    """Multistep consistency sampling of Latent Consistency Models (Luo et al. 2023, Alg. 1).

    Same constructor and config keys as ``diffusers.LCMScheduler``.  Each step denoises with
    the boundary-condition scalings ``c_skip x + c_out x0`` and re-noises to the next timestep
    (except at the last); the coefficients are computed in float64 by ``set_timesteps``.
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_tables(set_alpha_to_one=set_alpha_to_one)

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        original_inference_steps: Optional[int] = None,
        timesteps: Optional[list] = None,
        strength: float = 1.0,
    ) -> None:
        """Evenly spaced picks from the ``original_inference_steps`` distillation grid, as diffusers computes them."""
        self._set_consistency_schedule(num_inference_steps, device, original_inference_steps, timesteps, strength)

    def get_scalings_for_boundary_condition_discrete(self, timestep) -> tuple:
        """``(c_skip, c_out)`` at ``timestep`` (sigma_data = 0.5)."""
        return consistency_scalings(int(timestep), self.config.timestep_scaling)

    def _build_plan(self, start_index: int) -> list:
        cfg = self.config
        plan = [None] * len(self._timestep_values)
        for i in range(start_index, len(plan)):
            t = self._timestep_values[i]
            a_prev = self._alpha_prod(self._timestep_after(i, t))
            c_skip, c_out = consistency_scalings(t, cfg.timestep_scaling)
            noisy = i != self.num_inference_steps - 1
            plan[i] = lcm_program(self._alpha_prod(t), a_prev, c_skip, c_out, cfg.prediction_type, self._clips, noisy)
        return plan

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One consistency step: a single fused kernel (plus the x0 pass when clipping)."""
        index = self._begin_step(model_output, timestep, sample)
        program = self._program_at(index)
        noise = self._noise_for(program, sample, generator)
        t = self._timestep_values[index]
        c_skip, c_out = consistency_scalings(t, self.config.timestep_scaling)
        if self._clips:
            x0 = self._clipped_x0(sample, model_output, t)
            prev_sample = self._run(program, x0, sample, noise)
            denoised = lambda: self._data_prediction(sample, x0, c_skip, c_out)  # noqa: E731
        else:
            prev_sample = self._run(program, model_output, sample, noise)
            p, q = self._x0_conversion(t)
            denoised = lambda: self._data_prediction(sample, model_output, c_skip + c_out * p, c_out * q)  # noqa: E731
        self._step_index += 1
        if not return_dict:
            return LazyStepTuple(prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised())
