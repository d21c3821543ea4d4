"""Drop-in ``EulerDiscreteScheduler``, ``EulerAncestralDiscreteScheduler`` and ``HeunDiscreteScheduler``.

diffusers' class names, config keys and results; each step is one fused op whose
coefficients (:mod:`stepfuse.solvers.euler`) are computed in float64 on the host.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_heun_discrete import HeunDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

from .. import schedules
from ..solvers.euler import (
    PREDICTION_TYPES,
    churn_gamma,
    data_prediction,
    euler_ancestral_plan,
    euler_plan,
    euler_program,
    heun_plan,
)
from .diffusers_base import FusedSchedulerMixin, check_choice
from .karras import KarrasScheduleMixin

_COMPATIBLES = [e.name for e in KarrasDiffusionSchedulers]


def _check_sigma_flags(config) -> None:
    flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if config.get(k)]
    if len(flags) > 1:
        raise ValueError(
            f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be True, got {flags}"
        )


def _descending_train_timesteps(num_train_timesteps: int) -> np.ndarray:
    return np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].copy()


class EulerDiscreteScheduler(KarrasScheduleMixin, FusedSchedulerMixin):
    """Euler's method on the VE probability-flow ODE, with optional churn (Karras et al. 2022, Alg. 2).

    Same constructor and config keys as ``diffusers.EulerDiscreteScheduler``; ``step`` takes the
    same ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` and ``generator``.
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
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: Optional[bool] = False,
        use_exponential_sigmas: Optional[bool] = False,
        use_beta_sigmas: Optional[bool] = False,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES + ("original_sample",))
        check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
        check_choice("timestep_type", timestep_type, ("discrete", "continuous"))
        check_choice("final_sigmas_type", final_sigmas_type, schedules.FINAL_SIGMAS_TYPES)
        _check_sigma_flags(self.config)
        self._init_karras_schedule()
        if self._continuous_timesteps:
            self.timesteps = self._noise_conditioning(self.sigmas[:-1])
        else:
            self.timesteps = torch.from_numpy(_descending_train_timesteps(num_train_timesteps)).float()
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self._reset_run()

    @property
    def _continuous_timesteps(self) -> bool:
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @staticmethod
    def _noise_conditioning(sigmas: torch.Tensor) -> torch.Tensor:
        # EDM's c_noise = log(sigma) / 4 (Karras et al. 2022, Table 1), in float32 like diffusers: its
        # log can differ by an ulp from the float64 one that stepfuse.schedules rounds (exact timestep match).
        return 0.25 * torch.log(sigmas)

    @property
    def _prediction_type(self) -> str:
        return "sample" if self.config.prediction_type == "original_sample" else self.config.prediction_type

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        timesteps: Optional[list] = None,
        sigmas: Optional[list] = None,
    ) -> None:
        """Timesteps and sigmas as diffusers computes them (the plan follows at the first step)."""
        self._set_karras_schedule(
            "EulerDiscreteScheduler", num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        if self._continuous_timesteps:
            self.timesteps = self._noise_conditioning(self.sigmas[:-1]).to(device)
            self._reset_run()

    def _reset_run(self) -> None:
        super()._reset_run()
        self._churn_programs: dict = {}

    def _build_plan(self, start_index: int) -> list:
        return euler_plan(self._prediction_type, self._sigmas64, len(self.timesteps), start_index)

    def _step_program(self, i: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> tuple:
        """Step ``i``'s program for these churn arguments, its data prediction ``(p, q, noise)``, churned or not."""
        program = self._program_at(i)
        sigma = float(self._sigmas64[i])
        gamma = churn_gamma(s_churn, len(self._sigmas64) - 1, s_tmin <= sigma <= s_tmax)
        if gamma == 0.0:
            return program, (*data_prediction(self._prediction_type, sigma), 0.0), False
        key = (i, gamma, s_noise)
        churned = self._churn_programs.get(key)
        if churned is None:
            sigma_to = float(self._sigmas64[i + 1])
            churned = self._churn_programs[key] = euler_program(self._prediction_type, sigma, sigma_to, gamma, s_noise)
        return churned[0], churned[1], True

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One Euler step (churned when ``s_churn > 0``): a single fused kernel."""
        self._check_step_call(timestep)
        i = self._begin_step(model_output, timestep, sample)
        dtype = model_output.dtype
        model_output, sample = self._unify_dtypes(model_output, sample)
        program, (p, q, noise_coeff), churned = self._step_program(i, s_churn, s_tmin, s_tmax, s_noise)
        noise = self._step_noise(program, sample, generator, drawn_by_diffusers=churned)
        offset = self._philox_offset
        prev_sample = self._run(program, model_output, sample, noise)
        pred = lambda: self._pred_original(sample, model_output, p, q, noise_coeff, noise, offset)  # noqa: E731
        return self._finish(prev_sample, pred, EulerDiscreteSchedulerOutput, return_dict, dtype)


class EulerAncestralDiscreteScheduler(KarrasScheduleMixin, FusedSchedulerMixin):
    """Ancestral Euler sampling: Euler to ``sigma_down``, then fresh noise of std ``sigma_up``.

    Same constructor and config keys as ``diffusers.EulerAncestralDiscreteScheduler``; noise is
    drawn from ``generator`` like diffusers (or in the kernel when ``philox_seed`` is set).
    ``prediction_type="sample"``, which diffusers rejects at ``step``, is supported.
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
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self._init_karras_schedule()
        self.timesteps = torch.from_numpy(_descending_train_timesteps(num_train_timesteps))
        self._reset_run()

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Timesteps and sigmas as diffusers computes them (the plan follows at the first step)."""
        self._set_karras_schedule("EulerAncestralDiscreteScheduler", num_inference_steps, device)

    def _conversion(self, i: int) -> tuple:
        return data_prediction(self.config.prediction_type, float(self._sigmas64[i]))

    def _build_plan(self, start_index: int) -> list:
        return euler_ancestral_plan(self._sigmas64, len(self.timesteps), start_index, self._conversion)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """One ancestral step: a single fused kernel."""
        self._check_step_call(timestep)
        i = self._begin_step(model_output, timestep, sample)
        dtype = model_output.dtype
        model_output, sample = self._unify_dtypes(model_output, sample)
        program = self._program_at(i)
        noise = self._step_noise(program, sample, generator, drawn_by_diffusers=True)
        prev_sample = self._run(program, model_output, sample, noise)
        p, q = self._conversion(i)
        pred = lambda: self._data_prediction(sample, model_output, p, q)  # noqa: E731
        return self._finish(prev_sample, pred, EulerAncestralDiscreteSchedulerOutput, return_dict, dtype)


class HeunDiscreteScheduler(KarrasScheduleMixin, FusedSchedulerMixin):
    """Heun's second-order method (Karras et al. 2022, Alg. 1), two model evaluations per step.

    Same constructor and config keys as ``diffusers.HeunDiscreteScheduler`` and the same
    interleaved ``timesteps``: even steps of a run are Euler predictors, odd ones correctors.
    """

    _compatibles = _COMPATIBLES
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_sigma_flags(self.config)
        self._init_karras_schedule(beta_schedules=schedules.BETA_SCHEDULES)
        # diffusers' __init__ ends with set_timesteps(num_train_timesteps). With steps_offset > 0 its
        # timesteps pass T - 1, which stepfuse.schedules rejects: that one is built without the offset.
        self.register_to_config(steps_offset=0)
        self.set_timesteps(num_train_timesteps)
        self.register_to_config(steps_offset=steps_offset)
        self.use_karras_sigmas = use_karras_sigmas

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        num_train_timesteps: Optional[int] = None,
        timesteps: Optional[list] = None,
    ) -> None:
        """Interleaved timesteps and sigmas as diffusers computes them (the plan follows at the first step)."""
        if num_train_timesteps is not None and num_train_timesteps != self.config.num_train_timesteps:
            raise ValueError(
                f"num_train_timesteps must be None or config.num_train_timesteps={self.config.num_train_timesteps}, "
                f"got {num_train_timesteps}"
            )
        self._set_karras_schedule("HeunDiscreteScheduler", num_inference_steps, device, timesteps=timesteps)
        self.num_inference_steps = (len(self.timesteps) + 1) // 2  # steps, not model evaluations

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a predictor (first) stage."""
        return self._step_index is None or (self._step_index - self._run_start) % 2 == 0

    def _conversion(self, i: int) -> tuple:
        # Both stages read the model output at sigmas[i] (sigma_hat, resp. sigma_next in diffusers).
        return data_prediction(self.config.prediction_type, float(self._sigmas64[i]))

    def _build_plan(self, start_index: int) -> list:
        # With clip_sample the kernel receives the clipped data prediction as "model output".
        conversion = (lambda i: (0.0, 1.0)) if self.config.clip_sample else self._conversion
        return heun_plan(self._sigmas64, len(self.timesteps), start_index, conversion)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator: Optional[torch.Generator] = None):
        """One Heun stage: a single fused kernel (two with ``clip_sample``).

        ``generator`` is accepted for loops that pass it to every scheduler; Heun draws no noise.
        """
        i = self._begin_step(model_output, timestep, sample)
        model_output, sample = self._unify_dtypes(model_output, sample)
        program = self._program_at(i)
        p, q = self._conversion(i)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            x0 = self._data_prediction(sample, model_output, p, q).clamp_(-limit, limit)
            prev_sample = self._run(program, x0, sample)
            pred = lambda: x0  # noqa: E731
        else:
            prev_sample = self._run(program, model_output, sample)
            pred = lambda: self._data_prediction(sample, model_output, p, q)  # noqa: E731
        return self._finish(prev_sample, pred, HeunDiscreteSchedulerOutput, return_dict, prev_sample.dtype)
