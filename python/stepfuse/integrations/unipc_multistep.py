"""Drop-in ``UniPCMultistepScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from .. import schedules
from ..solvers.program import MAX_SLOTS
from ..solvers.thresholding import dynamic_threshold
from ..solvers.unipc import SOLVER_TYPES, unipc_plan
from .diffusers_base import FusedSchedulerMixin, check_choice, legacy_choice
from .vp import VPScheduleMixin

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
# One ring slot per order plus the last corrected sample.
MAX_SOLVER_ORDER = MAX_SLOTS - 1


class UniPCMultistepScheduler(VPScheduleMixin, FusedSchedulerMixin):
    """UniPC (Zhao et al. 2023): UniC corrector + UniP predictor, B(h) variants bh1/bh2, any order.

    Same constructor and config keys as ``diffusers.UniPCMultistepScheduler``; ``step`` runs
    one fused kernel (corrector and predictor together) with coefficients computed in
    float64 by ``set_timesteps``.

    Deliberate differences, where diffusers returns NaN: a first-order last step onto
    sigma = 0 with ``solver_type="bh1"`` or ``predict_x0=False`` (diffusers evaluates
    ``0 * inf``) returns the limit ``alpha_t * x0``; a zero-length last step
    (``final_sigmas_type="sigma_min"`` with flow or karras/exponential/beta sigmas) of order
    >= 3 (a singular system in diffusers) is the identity. A step of order >= 2 onto
    sigma = 0 (``lower_order_final=False``) has no limit and raises ``ValueError``.
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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list = [],  # noqa: B006 - diffusers' default, never mutated
        solver_p: SchedulerMixin = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        shift_terminal: Optional[float] = None,
    ):
        # diffusers maps DPM-Solver's solver types onto bh2.
        solver_type = legacy_choice(self, "solver_type", solver_type, ("midpoint", "heun", "logrho"), "bh2")
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("final_sigmas_type", final_sigmas_type, schedules.FINAL_SIGMAS_TYPES)
        check_choice("timestep_spacing", timestep_spacing, schedules.TIMESTEP_SPACINGS)
        check_choice("time_shift_type", time_shift_type, schedules.TIME_SHIFT_TYPES)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        if not isinstance(solver_order, (int, np.integer)) or not 1 <= solver_order <= MAX_SOLVER_ORDER:
            raise ValueError(f"solver_order must be an int in [1, {MAX_SOLVER_ORDER}], got {solver_order!r}")
        if sum([use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas]) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be True")
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal needs use_flow_sigmas=True")
        if prediction_type == "flow_prediction" and not predict_x0:
            raise ValueError("prediction_type 'flow_prediction' needs predict_x0=True")
        if not all(isinstance(i, (int, np.integer)) for i in disable_corrector):
            raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}")
        if solver_p is not None and not (hasattr(solver_p, "step") and hasattr(solver_p, "set_timesteps")):
            raise ValueError(f"solver_p must be a scheduler or None, got {type(solver_p).__name__}")
        self.predict_x0 = predict_x0
        self.disable_corrector = disable_corrector
        self.solver_p = solver_p
        self._init_vp_schedule()
        self.num_inference_steps = None
        timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.timesteps = torch.from_numpy(timesteps)
        self._reset_run()

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        sigmas: Optional[list] = None,
        mu: Optional[float] = None,
    ) -> None:
        """Compute timesteps and sigmas as diffusers does (the plan follows at the first step).

        Custom ``sigmas`` need ``use_flow_sigmas=True``; ``mu`` is used with ``use_dynamic_shifting``.
        """
        self._set_schedule("UniPCMultistepScheduler", num_inference_steps, device, sigmas=sigmas, mu=mu)
        if self.solver_p is not None:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    # -- plan --------------------------------------------------------------------------------
    def _conversion(self, i: int) -> tuple:
        """(p, q): UniPC's working quantity (x0 or eps prediction) = p * sample + q * model_output."""
        cfg = self.config
        if cfg.predict_x0:
            # With thresholding the kernel receives the thresholded x0 as "model output".
            return (0.0, 1.0) if cfg.thresholding else self._x0_conversion(i)
        alpha, sigma = self._alpha64[i], self._sigma64[i]
        return {
            "epsilon": (0.0, 1.0),
            "sample": (1.0 / sigma, -alpha / sigma),  # eps = (x - alpha x0) / sigma
            "v_prediction": (sigma, alpha),  # eps = alpha v + sigma x
        }[cfg.prediction_type]

    def _step_order(self, i: int, taken: int) -> int:
        cfg = self.config
        # lower_order_final caps the order by the steps left (diffusers applies it at any
        # step count); the first steps of a run warm up from order 1.
        left = len(self.timesteps) - i if cfg.lower_order_final else cfg.solver_order
        return min(cfg.solver_order, left, taken + 1)

    def _build_plan(self, start_index: int) -> list:
        cfg = self.config
        return unipc_plan(
            alpha=self._alpha64,
            sigma=self._sigma64,
            solver_order=cfg.solver_order,
            solver_type=cfg.solver_type,
            predict_x0=cfg.predict_x0,
            start_index=start_index,
            step_order=self._step_order,
            conversion=self._conversion,
            disable_corrector=frozenset(int(i) for i in self.disable_corrector),
            predictor=self.solver_p is None,
        )

    # -- step --------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One UniPC step: UniC corrects ``sample`` with ``model_output``, UniP predicts the next
        sample; a single fused kernel (two with thresholding)."""
        i = self._begin_step(model_output, timestep, sample)
        cfg = self.config
        program = self._program_at(i)
        converted = model_output
        if cfg.thresholding and cfg.predict_x0:
            x0 = self._data_prediction(sample, model_output, *self._x0_conversion(i))
            converted = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        prev_sample = self._run(program, converted, sample)
        if self.solver_p is not None:
            # "solver_p + UniC": the other solver predicts from the corrected sample.
            prev_sample = self.solver_p.step(model_output, timestep, prev_sample).prev_sample
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
