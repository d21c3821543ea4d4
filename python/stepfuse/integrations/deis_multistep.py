"""Drop-in ``DEISMultistepScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput

from ..solvers.deis import ALGORITHMS, SOLVER_TYPES, check_schedule, deis_coefficients, noise_conversion
from ..solvers.thresholding import dynamic_threshold
from .diffusers_base import FusedSchedulerMixin, check_choice, legacy_choice
from .euler import _check_sigma_flags
from .k_diffusion import _ring_program
from .vp import VPScheduleMixin

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
# Names diffusers accepts and rewrites to its only choices.
_LEGACY_ALGORITHMS = ("dpmsolver", "dpmsolver++")
_LEGACY_SOLVER_TYPES = ("midpoint", "heun", "bh1", "bh2")


class DEISMultistepScheduler(VPScheduleMixin, FusedSchedulerMixin):
    """DEIS (Zhang & Chen 2023), log-rho multistep on the noise prediction, orders 1-3.

    Same constructor and config keys as ``diffusers.DEISMultistepScheduler``; ``step`` runs
    one fused kernel (two with thresholding) with coefficients computed in float64 by
    ``set_timesteps``. Ring slot ``i % solver_order`` holds the noise prediction of step ``i``.
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
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        algorithm_type = legacy_choice(self, "algorithm_type", algorithm_type, _LEGACY_ALGORITHMS, ALGORITHMS[0])
        solver_type = legacy_choice(self, "solver_type", solver_type, _LEGACY_SOLVER_TYPES, SOLVER_TYPES[0])
        check_choice("algorithm_type", algorithm_type, ALGORITHMS)
        check_choice("solver_type", solver_type, SOLVER_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("time_shift_type", time_shift_type, ("exponential",))
        if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        _check_sigma_flags(self.config)
        self._init_vp_schedule()
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(
            np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        )
        self._reset_run()

    def set_timesteps(self, num_inference_steps: int, device=None, mu: Optional[float] = None) -> None:
        """Compute timesteps and sigmas as diffusers does, then the plan of a run from the first step."""
        if mu is not None:
            if not (self.config.use_dynamic_shifting and self.config.time_shift_type == "exponential"):
                raise ValueError("mu needs use_dynamic_shifting=True and time_shift_type='exponential' in the config")
            # diffusers keeps the shift in its config: later calls without mu reuse it.
            self.register_to_config(flow_shift=float(np.exp(mu)))
        self._set_schedule("DEISMultistepScheduler", num_inference_steps, device)

    # -- plan --------------------------------------------------------------------------------
    def _conversion(self, i: int) -> tuple:
        """(p, q): the noise prediction eps = p * sample + q * model_output at step i."""
        cfg = self.config
        if cfg.prediction_type == "epsilon" and not cfg.thresholding:
            return (0.0, 1.0)
        # With thresholding the kernel receives the thresholded data prediction as "model output".
        x0 = (0.0, 1.0) if cfg.thresholding else self._x0_conversion(i)
        return noise_conversion(self._alpha64[i], self._sigma64[i], x0)

    def _step_order(self, i: int, taken: int) -> int:
        cfg = self.config
        n = len(self.timesteps)
        # diffusers' lower_order_nums warm-up, then lower_order_final below 15 steps.
        order = min(cfg.solver_order, taken + 1)
        if cfg.lower_order_final and n < 15 and i >= n - 2:
            order = min(order, n - i)  # order 1 at the last step, at most 2 at the one before
        return order

    def _build_plan(self, start_index: int) -> list:
        check_schedule(self._alpha64, self._sigma64)
        alpha, sigma = self._alpha64.tolist(), self._sigma64.tolist()
        slots, n = self.config.solver_order, len(self.timesteps)
        plan: list = [None] * n
        for i in range(start_index, n):
            coeffs = deis_coefficients(alpha, sigma, i, self._step_order(i, i - start_index))
            p, q = self._conversion(i)
            # The newest noise prediction enters through its definition so the x terms combine in float64.
            update = {"x": coeffs.a + coeffs.b[0] * p, "out": coeffs.b[0] * q}
            plan[i] = _ring_program(slots, i, {"x": p, "out": q}, update, coeffs.b[1:], store=i + 1 < n)
        return plan

    # -- step --------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One multistep DEIS step: a single fused kernel (two with thresholding)."""
        i = self._begin_step(model_output, timestep, sample)
        cfg = self.config
        program = self._program_at(i)
        if cfg.thresholding:
            x0 = self._data_prediction(sample, model_output, *self._x0_conversion(i))
            model_output = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        prev_sample = self._run(program, model_output, sample)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
