"""Drop-in ``LMSDiscreteScheduler``: linear multistep in sigma, each step one fused op.

The probability-flow ODE ``dx/dsigma = (x - D) / sigma`` (Karras et al. 2022, eq. 3 with
sigma(t) = t) is integrated by a variable-step Adams-Bashforth method: the slope is
interpolated by the Lagrange polynomial through its values at the last ``order`` sigmas
and integrated over ``[sigma_i, sigma_{i+1}]``. diffusers integrates those basis
polynomials with ``scipy.integrate.quad`` at every step; here they are integrated exactly
in float64 once per run (:func:`~stepfuse.integrations.k_diffusion._lagrange_integrals`),
and the slopes live in a ring of ``order`` history slots.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteSchedulerOutput

from ..solvers.euler import PREDICTION_TYPES, data_prediction
from ..solvers.program import MAX_SLOTS
from .diffusers_base import FusedSchedulerMixin, check_choice
from .euler import _COMPATIBLES, _check_sigma_flags
from .k_diffusion import _lagrange_integrals, _ring_program
from .karras import KarrasScheduleMixin

DEFAULT_ORDER = 4


def set_train_timesteps(scheduler) -> None:
    """What diffusers' __init__ ends with: ``set_timesteps(num_train_timesteps)``, its plan built on demand.

    With ``steps_offset > 0`` diffusers' leading timesteps pass ``T - 1`` there (np.interp clamps
    them), which stepfuse.schedules rejects: that one schedule is built without the offset.
    """
    steps_offset = scheduler.config.steps_offset
    scheduler.register_to_config(steps_offset=0)
    type(scheduler).set_timesteps.__wrapped__(scheduler, scheduler.config.num_train_timesteps)
    scheduler.register_to_config(steps_offset=steps_offset)


def _check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"order must be an int, got {type(order).__name__}")
    if not 1 <= order <= MAX_SLOTS:
        raise ValueError(f"order must be in [1, {MAX_SLOTS}], got {order}")
    return order


def lms_plan(sigmas, num_steps: int, start_index: int, order: int, conversion) -> list:
    """One ring program per step; ring slot ``i % order`` holds the slope ``d_i = (x - D_i) / sigma_i``.

    As in diffusers, the coefficients of step ``i`` integrate the basis on the ``min(i + 1, order)``
    sigmas ending at ``sigma_i`` (global index), and only the first ``min(i - start + 1, order)`` of
    them weigh a slope: a run started mid-schedule has no older slopes.
    """
    plan: list = [None] * num_steps
    for i in range(start_index, num_steps):
        sigma = float(sigmas[i])
        nodes = [float(sigmas[i - k]) for k in range(min(i + 1, order))]
        coeffs = _lagrange_integrals(nodes, sigma, float(sigmas[i + 1]))[: min(i - start_index + 1, order)]
        p, q = conversion(i)
        slope = {"x": (1.0 - p) / sigma, "out": -q / sigma}
        update = {"x": 1.0 + coeffs[0] * slope["x"], "out": coeffs[0] * slope["out"]}
        plan[i] = _ring_program(order, i, slope, update, coeffs[1:], store=i + 1 < num_steps)
    return plan


class LMSDiscreteScheduler(KarrasScheduleMixin, FusedSchedulerMixin):
    """Linear multistep (Adams-Bashforth in sigma) on the VE probability-flow ODE.

    Same constructor, config keys and ``step(..., order=4)`` as ``diffusers.LMSDiscreteScheduler``.
    ``order`` must stay the same within a run (diffusers' slope list is trimmed to it).
    """

    _accepts_plan_sigmas = True
    _compatibles = _COMPATIBLES
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_sigma_flags(self.config)
        self._init_karras_schedule()
        self.use_karras_sigmas = use_karras_sigmas
        set_train_timesteps(self)

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Timesteps and sigmas as diffusers computes them; the order-4 plan is built here."""
        # LMS's schedule is Euler's for the keys LMS has (linear interpolation, final sigma 0).
        self._set_karras_schedule("EulerDiscreteScheduler", num_inference_steps, device)

    def _reset_run(self) -> None:
        super()._reset_run()
        self._order_plans: dict = {}
        self._run_order: Optional[int] = None

    def _conversion(self, i: int) -> tuple:
        return data_prediction(self.config.prediction_type, float(self._sigmas64[i]))

    def _build_plan(self, start_index: int) -> list:
        return lms_plan(self._sigmas64, len(self.timesteps), start_index, DEFAULT_ORDER, self._conversion)

    def _lms_program(self, i: int, order: int):
        if self._run_order is None or i == self._run_start:
            self._run_order = order
        elif order != self._run_order:
            raise ValueError(f"order must stay {self._run_order} within a run, got {order} at step {i}")
        if order == DEFAULT_ORDER:
            return self._program_at(i)
        key = (self._run_start, order)
        plan = self._order_plans.get(key)
        if plan is None:
            plan = self._order_plans[key] = lms_plan(
                self._sigmas64, len(self.timesteps), self._run_start, order, self._conversion
            )
        if i >= len(plan):
            self._program_at(i)  # raises the past-the-schedule error
        return plan[i]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = DEFAULT_ORDER,
             return_dict: bool = True):
        """One linear multistep step of the given ``order``: a single fused kernel."""
        order = _check_order(order)
        if not self.is_scale_input_called:
            warnings.warn("call scale_model_input before step: the model input must be divided by sqrt(sigma^2 + 1)")
        i = self._begin_step(model_output, timestep, sample)
        model_output, sample = self._unify_dtypes(model_output, sample)
        program = self._lms_program(i, order)
        prev_sample = self._run(program, model_output, sample)
        p, q = self._conversion(i)
        pred = lambda: self._data_prediction(sample, model_output, p, q)  # noqa: E731
        return self._finish(prev_sample, pred, LMSDiscreteSchedulerOutput, return_dict, prev_sample.dtype)
