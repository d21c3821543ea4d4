"""Drop-in ``DPMSolverSinglestepScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from ..solvers.dpmsolver import SOLVER_TYPES, singlestep_orders, singlestep_plan
from .diffusers_base import FusedSchedulerMixin, check_choice, legacy_choice
from .dpmsolver_multistep import PREDICTION_TYPES, VARIANCE_TYPES, DPMSolverMultistepScheduler
from .euler import _check_sigma_flags
from .vp import VPScheduleMixin

logger = logging.getLogger(__name__)

ALGORITHMS = ("dpmsolver", "dpmsolver++", "sde-dpmsolver++")


class DPMSolverSinglestepScheduler(VPScheduleMixin, FusedSchedulerMixin):
    """Singlestep DPM-Solver / DPM-Solver++ (Lu et al. 2022): DPM-Solver-2/3 and DPM-Solver++(2S).

    Steps run in groups of orders ``1, 2, .., solver_order`` (``order_list``): every step of a
    group restarts from the sample at the group's start with the model outputs of the group
    so far. Same constructor and config keys as ``diffusers.DPMSolverSinglestepScheduler``;
    ``step`` runs one fused kernel with coefficients computed in float64 by ``set_timesteps``.

    Two deliberate differences: ``thresholding`` with ``algorithm_type="dpmsolver"`` thresholds
    the data prediction at the step's own sigma (diffusers fails there), and ``mu`` shifts the
    flow schedule of that ``set_timesteps`` call only, leaving the config's ``flow_shift`` as is.
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
        lower_order_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
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
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("time_shift_type", time_shift_type, ("exponential",))
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        _check_sigma_flags(self.config)
        if algorithm_type == "dpmsolver" and final_sigmas_type == "zero":
            raise ValueError("final_sigmas_type 'zero' needs algorithm_type dpmsolver++ or sde-dpmsolver++; "
                             "use 'sigma_min' with 'dpmsolver'")
        if algorithm_type == "dpmsolver" and prediction_type == "flow_prediction":
            raise ValueError("prediction_type 'flow_prediction' needs algorithm_type dpmsolver++ or sde-dpmsolver++")
        self._init_vp_schedule()
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(
            np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        )
        self.order_list = self.get_order_list(num_train_timesteps)
        self._reset_run()

    def get_order_list(self, num_inference_steps: int) -> list:
        """The solver order of every step: groups ``1, 2, .., solver_order`` (see ``lower_order_final``)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        cfg = self.config
        return singlestep_orders(
            int(num_inference_steps), cfg.solver_order, cfg.lower_order_final, cfg.final_sigmas_type == "zero"
        )

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        mu: Optional[float] = None,
        timesteps: Optional[list] = None,
    ) -> None:
        """Compute timesteps, sigmas and the order of every step as diffusers does."""
        if mu is not None and not self.config.use_dynamic_shifting:
            raise ValueError("mu needs use_dynamic_shifting=True in the config")
        self._set_schedule("DPMSolverSinglestepScheduler", num_inference_steps, device, mu=mu, timesteps=timesteps)
        cfg = self.config
        # diffusers switches lower_order_final on for good when whole groups cannot end the run.
        uneven = self.num_inference_steps % cfg.solver_order != 0
        if not cfg.lower_order_final and (uneven or cfg.final_sigmas_type == "zero"):
            reason = f"{self.num_inference_steps} steps" if uneven else "final_sigmas_type 'zero'"
            logger.warning("lower_order_final set to True: %s cannot end on a full order-%d group",
                           reason, cfg.solver_order)
            self.register_to_config(lower_order_final=True)
        self.order_list = self.get_order_list(self.num_inference_steps)

    # -- plan --------------------------------------------------------------------------------
    # The working quantity (data or noise prediction) is the multistep solver's.
    _conversion = DPMSolverMultistepScheduler._conversion

    def _build_plan(self, start_index: int) -> list:
        cfg = self.config
        return singlestep_plan(
            alpha=self._alpha64,
            sigma=self._sigma64,
            algorithm_type=cfg.algorithm_type,
            solver_type=cfg.solver_type,
            solver_order=cfg.solver_order,
            orders=self.order_list,
            start_index=start_index,
            conversion=self._conversion,
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
        """One singlestep DPM-Solver step: a single fused kernel (two with thresholding)."""
        # The multistep step runs whatever plan the scheduler built; diffusers' singlestep step
        # has no variance_noise argument.
        return DPMSolverMultistepScheduler.step(self, model_output, timestep, sample, generator, None, return_dict)
