"""Drop-in ``EDMDPMSolverMultistepScheduler``: diffusers' class name, config and results, one fused op per step.

DPM-Solver++ multistep (Lu et al. 2022) on EDM's noise levels (Karras et al. 2022): the
sample is ``x = x0 + sigma * eps``, i.e. ``alpha_t = 1`` and ``sigma_t = sigma``, so the
shared VP multistep plan applies with ``lambda = -log(sigma)``; the data prediction comes
from EDM's ``c_skip`` / ``c_out`` (Table 1). All coefficients are float64 host numbers
computed when timesteps are set.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from ..solvers.dpmsolver import SOLVER_TYPES, multistep_plan
from ..solvers.thresholding import dynamic_threshold
from .diffusers_base import FusedSchedulerMixin, check_choice, legacy_choice
from .dpmsolver_multistep import DPMSolverMultistepScheduler
from .edm_euler import EDMScheduleMixin, _ramp
from .karras import KarrasScheduleMixin

EDM_ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++")


class EDMDPMSolverMultistepScheduler(EDMScheduleMixin, KarrasScheduleMixin, FusedSchedulerMixin):
    """DPM-Solver++ 1/2/3M (ODE) and SDE-DPM-Solver++ 1/2M on EDM sigmas.

    Same constructor, config keys and ``step`` arguments as
    ``diffusers.EDMDPMSolverMultistepScheduler``; ``step`` runs one fused kernel (two with
    thresholding, whose quantile is a reduction).
    """

    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        rho: float = 7.0,
        solver_order: int = 2,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
    ):
        # diffusers maps these legacy names onto its own choices.
        legacy_choice(self, "algorithm_type", algorithm_type, ("deis",), "dpmsolver++")
        legacy_choice(self, "solver_type", solver_type, ("logrho", "bh1", "bh2"), "midpoint")
        check_choice("algorithm_type", self.config.algorithm_type, EDM_ALGORITHMS)
        check_choice("solver_type", self.config.solver_type, SOLVER_TYPES)
        # Only epsilon / v_prediction have an EDM c_out (diffusers fails on "sample" at the first step).
        self._check_edm_config()
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        self.num_inference_steps = None
        self.is_scale_input_called = False
        # The training grid: diffusers' float32 ramp of num_train_timesteps points, final sigma 0.
        self._install_sigmas(self._edm_sigmas(num_train_timesteps), 0.0)
        self._reset_run()

    def _edm_sigmas(self, num_points: int) -> torch.Tensor:
        """diffusers' float32 sigmas at ``linspace(0, 1, num_points)``, bit for bit.

        This scheduler evaluates the Karras schedule (Karras et al. 2022, eq. 5) in float32,
        unlike EDMEulerScheduler's float64 evaluation, so the host repeats that float32 math.
        """
        cfg = self.config
        ramp = torch.linspace(0, 1, num_points)
        if cfg.sigma_schedule == "karras":
            lo, hi = cfg.sigma_min ** (1 / cfg.rho), cfg.sigma_max ** (1 / cfg.rho)
            return (hi + ramp * (lo - hi)) ** cfg.rho
        return torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), num_points).exp().flip(0)

    def _install_sigmas(self, sigmas: torch.Tensor, final: float, device=None) -> None:
        self.sigmas = torch.cat([sigmas, torch.tensor([final], dtype=torch.float32)])
        self._sigmas64 = self.sigmas.double().numpy()
        # c_noise = log(sigma) / 4 on the float32 sigmas, as diffusers evaluates it.
        self.timesteps = self.precondition_noise(sigmas).to(device)
        # c_in on the same float32 sigmas: bit-identical network inputs.
        self._c_in = self.precondition_inputs(torch.ones_like(self.sigmas), self.sigmas).tolist()

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> None:
        """EDM sigmas at ``linspace(0, 1, num_inference_steps)`` as diffusers computes them."""
        num_points = len(_ramp(num_inference_steps, None))
        # diffusers' "sigma_min" final sigma is the configured sigma_min, not the last schedule point.
        final = self.config.sigma_min if self.config.final_sigmas_type == "sigma_min" else 0.0
        self._install_sigmas(self._edm_sigmas(num_points), final, device)
        self.num_inference_steps = num_inference_steps
        self._reset_run()

    # -- plan --------------------------------------------------------------------------------
    def _conversion_at(self, i: int) -> tuple:
        """(p, q) with the ring entry D_i = p * sample + q * model_output (EDM Table 1)."""
        if self.config.thresholding:
            return (0.0, 1.0)  # the kernel receives the thresholded data prediction
        return self._conversion(float(self._sigmas64[i]))

    # diffusers' order schedule (warm-up, lower_order_final, euler_at_final) is the same.
    _step_order = DPMSolverMultistepScheduler._step_order

    def _build_plan(self, start_index: int) -> list:
        cfg = self.config
        # The float32 schedule ends a few ulps *below* sigma_min, so a "sigma_min" final step
        # would raise the noise level by float32 rounding (the SDE noise std would be
        # imaginary). diffusers evaluates that h in float32 as 0: a zero-length step.
        sigma = self._sigmas64.copy()
        sigma[-1] = min(sigma[-1], sigma[-2])
        return multistep_plan(
            alpha=np.ones_like(sigma),  # VE form: alpha_t = 1, sigma_t = sigma
            sigma=sigma,
            algorithm_type=cfg.algorithm_type,
            solver_type=cfg.solver_type,
            solver_order=cfg.solver_order,
            start_index=start_index,
            step_order=self._step_order,
            conversion=self._conversion_at,
        )

    # -- step --------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One multistep DPM-Solver++ step: a single fused kernel (two with thresholding)."""
        i = self._begin_step(model_output, timestep, sample)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output must have shape {tuple(sample.shape)}, got {tuple(model_output.shape)}")
        cfg = self.config
        program = self._program_at(i)
        if cfg.thresholding:
            x0 = self._data_prediction(sample, model_output, *self._conversion(float(self._sigmas64[i])))
            model_output = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        # diffusers draws SDE noise every step, also where its coefficient is 0 (the last one).
        noise = self._step_noise(program, sample, generator, cfg.algorithm_type == "sde-dpmsolver++")
        prev_sample = self._run(program, model_output, sample, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
