"""Drop-in ``TCDScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from diffusers.schedulers.scheduling_tcd import TCDSchedulerOutput

from ..solvers.discrete_vp import tcd_noised_prediction, tcd_program
from .diffusers_base import LazyStepTuple
from .lcm import LCMScheduler

#: diffusers' default ``eta`` (the paper's gamma) of ``step``.
DEFAULT_ETA = 0.3


class TCDScheduler(LCMScheduler):
    """Strategic stochastic sampling of Trajectory Consistency Distillation (Zheng et al. 2024, sec. 4.3).

    Same constructor and config keys as ``diffusers.TCDScheduler`` (which, like this class,
    reads neither ``clip_sample`` nor ``thresholding`` in ``step``).  ``set_timesteps`` computes
    the programs for the default ``eta``; another ``eta`` gets its float64 programs at its first step.
    """

    _compatibles: list = []
    order = 1

    # The constructor and config keys are LCMScheduler's, as in diffusers.

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        original_inference_steps: Optional[int] = None,
        timesteps: Optional[list] = None,
        strength: float = 1.0,
    ) -> None:
        """Timesteps as diffusers computes them (programs for ``eta = 0.3`` follow)."""
        self._set_consistency_schedule(num_inference_steps, device, original_inference_steps, timesteps, strength,
                                       dense_origin=True)

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """DDIM's ``std^2 / eta^2`` between two training timesteps (diffusers' helper)."""
        a_t, a_prev = self._alpha_prod(int(timestep)), self._alpha_prod(int(prev_timestep))
        return torch.tensor((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev), dtype=torch.float32)

    def _timestep_s(self, index: int, eta: float) -> int:
        # diffusers computes floor((1 - eta) * t_prev) in float32; the same rounding picks the same step.
        t_prev = self._timestep_after(index, 0)
        return int(np.floor(np.float32(1.0 - eta) * np.float32(t_prev)))

    def _tcd_at(self, index: int, eta: float) -> tuple:
        """Step ``index``'s program and the ``(p, q)`` of its ``pred_noised_sample`` for this ``eta``."""
        key = (index, eta)
        entry = self._programs.get(key)
        if entry is None:
            t = self._timestep_values[index]
            a_t, a_s = self._alpha_prod(t), self._alpha_prod(self._timestep_s(index, eta))
            a_prev = self._alpha_prod(self._timestep_after(index, 0))
            noisy = eta > 0 and index != self.num_inference_steps - 1
            prediction_type = self.config.prediction_type
            entry = tcd_program(a_t, a_prev, a_s, prediction_type, noisy), tcd_noised_prediction(a_t, a_s, prediction_type)
            self._programs[key] = entry
        return entry

    def _build_plan(self, start_index: int) -> list:
        plan: list = [None] * len(self._timestep_values)
        for i in range(start_index, len(plan)):
            plan[i] = self._tcd_at(i, DEFAULT_ETA)[0]
        return plan

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = DEFAULT_ETA,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One TCD step with stochasticity ``eta`` (gamma): a single fused kernel."""
        if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0 or math.isnan(eta):
            raise ValueError(f"eta must be a float in [0, 1] (gamma of TCD), got {eta!r}")
        index = self._begin_step(model_output, timestep, sample)
        self._program_at(index)  # range check; builds the default plan for this start
        program, (p, q) = self._tcd_at(index, float(eta))
        noise = self._noise_for(program, sample, generator)
        prev_sample = self._run(program, model_output, sample, noise)
        pred_noised = lambda: self._data_prediction(sample, model_output, p, q)  # noqa: E731
        self._step_index += 1
        if not return_dict:
            return LazyStepTuple(prev_sample, pred_noised)
        return TCDSchedulerOutput(prev_sample=prev_sample, pred_noised_sample=pred_noised())


