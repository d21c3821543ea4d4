"""Drop-in ``DPMSolverMultistepScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput

from .. import schedules
from ..solvers.dpmsolver import ALGORITHMS, SOLVER_TYPES, multistep_plan
from ..solvers.thresholding import dynamic_threshold
from .diffusers_base import FusedSchedulerMixin, check_choice, legacy_choice
from .vp import VPScheduleMixin

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
VARIANCE_TYPES = (None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


class DPMSolverMultistepScheduler(VPScheduleMixin, FusedSchedulerMixin):
    """DPM-Solver / DPM-Solver++ multistep (Lu et al. 2022), orders 1-3, ODE and SDE variants.

    Same constructor and config keys as ``diffusers.DPMSolverMultistepScheduler``; ``step``
    runs one fused kernel with coefficients computed in float64 by ``set_timesteps``.
    """

    _accepts_plan_sigmas = True
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
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        # diffusers maps these legacy names onto its own choices.
        algorithm_type = legacy_choice(self, "algorithm_type", algorithm_type, ("deis",), "dpmsolver++")
        solver_type = legacy_choice(self, "solver_type", solver_type, ("logrho", "bh1", "bh2"), "midpoint")
        check_choice("algorithm_type", algorithm_type, ALGORITHMS)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        # DDPM configs carry their own variance types; only the learned ones change the output.
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("time_shift_type", time_shift_type, ("exponential",))
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if solver_order == 3 and algorithm_type == "sde-dpmsolver":
            raise ValueError("solver_order 3 is not defined for algorithm_type 'sde-dpmsolver'")
        if algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
            raise ValueError(
                f"final_sigmas_type 'zero' is not supported for algorithm_type {algorithm_type!r}; use 'sigma_min'"
            )
        if algorithm_type in ("dpmsolver", "sde-dpmsolver") and prediction_type == "flow_prediction":
            raise ValueError(f"prediction_type 'flow_prediction' needs algorithm_type dpmsolver++ or sde-dpmsolver++")
        self._init_vp_schedule()
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].copy())
        self._reset_run()

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        mu: Optional[float] = None,
        timesteps: Optional[list] = None,
    ) -> None:
        """Compute timesteps and sigmas as diffusers does (the plan follows at the first step)."""
        if mu is not None:
            if not self.config.use_dynamic_shifting:
                raise ValueError("mu needs use_dynamic_shifting=True in the config")
            self.register_to_config(flow_shift=float(np.exp(mu)))
        self._set_schedule("DPMSolverMultistepScheduler", num_inference_steps, device, timesteps=timesteps)

    # -- plan --------------------------------------------------------------------------------
    def _conversion(self, i: int) -> tuple:
        """(p, q): the solver's working quantity = p * sample + q * model_output at step i."""
        cfg = self.config
        alpha, sigma = self._alpha64[i], self._sigma64[i]
        if cfg.thresholding:
            # The kernel receives the thresholded data prediction as "model output".
            x0 = (0.0, 1.0)
        elif cfg.prediction_type == "epsilon":
            x0 = (1.0 / alpha, -sigma / alpha)
        elif cfg.prediction_type == "sample":
            x0 = (0.0, 1.0)
        elif cfg.prediction_type == "v_prediction":
            x0 = (alpha, -sigma)
        else:  # flow_prediction: x0 = x - s * v
            x0 = (1.0, -self._sigmas64[i])
        if cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            return x0
        # Noise prediction eps = (x - alpha * x0) / sigma, written through the data prediction.
        if cfg.prediction_type == "epsilon" and not cfg.thresholding:
            return (0.0, 1.0)
        return (1.0 / sigma - alpha / sigma * x0[0], -alpha / sigma * x0[1])

    def _step_order(self, i: int, taken: int) -> int:
        cfg = self.config
        n = len(self.timesteps)
        short = cfg.lower_order_final and n < 15
        final = i == n - 1 and (cfg.euler_at_final or short or cfg.final_sigmas_type == "zero")
        second = i == n - 2 and short
        # diffusers' lower_order_nums: the orders used so far saturate at solver_order.
        warm = min(taken, cfg.solver_order)
        if cfg.solver_order == 1 or warm < 1 or final:
            return 1
        if cfg.solver_order == 2 or warm < 2 or second:
            return 2
        return 3

    def _build_plan(self, start_index: int) -> list:
        cfg = self.config
        return multistep_plan(
            alpha=self._alpha64,
            sigma=self._sigma64,
            algorithm_type=cfg.algorithm_type,
            solver_type=cfg.solver_type,
            solver_order=cfg.solver_order,
            start_index=start_index,
            step_order=self._step_order,
            conversion=self._conversion,
        )

    def _noise_dtype(self, sample: torch.Tensor) -> torch.dtype:
        return torch.float32  # diffusers draws SDE noise in fp32

    # -- step --------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """One multistep DPM-Solver step: a single fused kernel (two with thresholding)."""
        i = self._begin_step(model_output, timestep, sample)
        cfg = self.config
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            model_output = model_output[:, : sample.shape[1]]
        program = self._program_at(i)
        if cfg.thresholding:
            p, q = self._x0_conversion(i)
            x0 = self._data_prediction(sample, model_output, p, q)
            model_output = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        noise = self._noise_for(program, sample, generator, variance_noise)
        prev_sample = self._run(program, model_output, sample, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
