"""Drop-in ``EDMEulerScheduler``: diffusers' class name, config and results, one fused op per step.

The sample is EDM's ``x = x0 + sigma * eps``; the network sees ``c_in x`` and its output
becomes a data prediction through EDM's ``c_skip`` / ``c_out`` (Karras et al. 2022,
Table 1), all float64 host coefficients built when timesteps are set.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import schedules
from ..solvers.edm import EDM_PREDICTION_TYPES, edm_euler_program, edm_preconditioning
from ..solvers.euler import churn_gamma
from .diffusers_base import FusedSchedulerMixin, check_choice
from .karras import KarrasScheduleMixin, logger

SIGMA_SCHEDULES = ("karras", "exponential")


class EDMScheduleMixin:
    """EDM sigmas, ``c_noise`` timesteps and preconditioning; needs diffusers' EDM config keys."""

    def _check_edm_config(self) -> None:
        cfg = self.config
        check_choice("sigma_schedule", cfg.sigma_schedule, SIGMA_SCHEDULES)
        check_choice("prediction_type", cfg.prediction_type, EDM_PREDICTION_TYPES)
        check_choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
        if not cfg.sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {cfg.sigma_data!r}")
        if not 0 < cfg.sigma_min < cfg.sigma_max:
            raise ValueError(f"sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, "
                             f"got {cfg.sigma_min!r}, {cfg.sigma_max!r}")

    def _install_edm_sigmas(self, ramp: np.ndarray, device=None) -> None:
        """Sigmas of the configured schedule at ``ramp`` (diffusers' float32 values) and their timesteps."""
        cfg = self.config
        if cfg.sigma_schedule == "exponential":
            # diffusers spaces log sigma with a float32 linspace and exponentiates in float32;
            # repeating that host computation gives its exact sigmas (the float64 grid of
            # schedules.edm_sigmas differs from it by float32 ulps).
            log_lo, log_hi = math.log(cfg.sigma_min), math.log(cfg.sigma_max)
            sigmas = torch.linspace(log_lo, log_hi, len(ramp), dtype=torch.float32).exp().flip(0).double().numpy()
            last = sigmas[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
            self._sigmas64 = np.append(sigmas, last)
        else:
            arrays = schedules.diffusers_set_timesteps("EDMEulerScheduler", None, cfg, sigmas=ramp)
            self._sigmas64 = np.asarray(arrays.sigmas, dtype=np.float64)
        self.sigmas = torch.from_numpy(self._sigmas64.astype(np.float32))
        # c_noise = log(sigma) / 4 (Table 1) on the float32 sigmas, as diffusers evaluates it,
        # so timesteps compare equal to diffusers' (a float64 log can differ by an ulp).
        self.timesteps = self.precondition_noise(self.sigmas[:-1]).to(device)
        sd2 = self.config.sigma_data ** 2
        # c_in = 1 / sqrt(sigma^2 + sigma_data^2) on diffusers' float32 sigmas: bit-identical inputs.
        self._c_in = (1 / ((self.sigmas**2 + sd2) ** 0.5)).tolist()

    @property
    def init_noise_sigma(self) -> float:
        return (self.config.sigma_max**2 + 1) ** 0.5

    def _conversion(self, sigma: float) -> tuple:
        return edm_preconditioning(self.config.prediction_type, sigma, self.config.sigma_data)

    # -- EDM preconditioning (Karras et al. 2022, Table 1) for callers that apply it themselves --
    def precondition_inputs(self, sample: torch.Tensor, sigma) -> torch.Tensor:
        """``c_in(sigma) * sample``."""
        return sample * (1 / ((sigma**2 + self.config.sigma_data**2) ** 0.5))

    def precondition_noise(self, sigma) -> torch.Tensor:
        """``c_noise(sigma) = log(sigma) / 4``."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor([sigma])
        return 0.25 * torch.log(sigma)

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """The denoised sample ``c_skip(sigma) sample + c_out(sigma) model_output``."""
        sd = self.config.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        if self.config.prediction_type == "v_prediction":
            c_out = -c_out
        return c_skip * sample + c_out * model_output

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``c_in(sigma) * sample``, the network input of EDM's preconditioning."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample * self._c_in[self._step_index]

    def _check_step_call(self, timestep) -> None:
        if isinstance(timestep, (int, np.integer, torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                f"timestep must be one of {type(self).__name__}.timesteps, got the integer {timestep!r} "
                "(an index from enumerate(timesteps)?)"
            )
        if not self.is_scale_input_called:
            logger.warning("call scale_model_input before step: the model input must be multiplied by c_in(sigma)")


def _ramp(num_inference_steps, sigmas) -> np.ndarray:
    """diffusers' ``set_timesteps`` argument ``sigmas`` is a ramp in [0, 1], not sigma values."""
    if sigmas is None:
        if num_inference_steps is None:
            raise ValueError("pass num_inference_steps or sigmas to set_timesteps")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        return np.linspace(0, 1, int(num_inference_steps))
    if isinstance(sigmas, torch.Tensor):
        sigmas = sigmas.detach().cpu().double().numpy()
    return np.atleast_1d(np.asarray(sigmas, dtype=np.float64))


class EDMEulerScheduler(EDMScheduleMixin, KarrasScheduleMixin, FusedSchedulerMixin):
    """Euler's method on EDM's probability-flow ODE, optionally churned (Karras et al. 2022, Alg. 1-2).

    Same constructor, config keys and ``step`` arguments as ``diffusers.EDMEulerScheduler``.
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
        final_sigmas_type: str = "zero",
    ):
        self._check_edm_config()
        self.num_inference_steps = None
        self.is_scale_input_called = False
        self._install_edm_sigmas(np.arange(num_train_timesteps + 1) / num_train_timesteps)
        self._reset_run()

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, sigmas=None) -> None:
        """EDM sigmas at ``linspace(0, 1, n)`` (or the ramp ``sigmas``), as diffusers computes them."""
        ramp = _ramp(num_inference_steps, sigmas)
        self._install_edm_sigmas(ramp, device)
        # diffusers leaves None here for a custom ramp; its length is the step count.
        self.num_inference_steps = len(ramp) if num_inference_steps is None else num_inference_steps
        self._reset_run()

    def _reset_run(self) -> None:
        super()._reset_run()
        self._churn_programs: dict = {}

    def _build_plan(self, start_index: int) -> list:
        plan: list = [None] * len(self.timesteps)
        for i in range(start_index, len(plan)):
            plan[i] = edm_euler_program(float(self._sigmas64[i]), float(self._sigmas64[i + 1]), self._conversion)[0]
        return plan

    def _step_program(self, i: int, s_churn, s_tmin, s_tmax, s_noise, given_x0: bool) -> tuple:
        """Step ``i``'s program and ``(p, q, noise)``: cached plan, or one built for these churn arguments."""
        sigma = float(self._sigmas64[i])  # diffusers' float32 sigma, exactly
        gamma = churn_gamma(s_churn, len(self._sigmas64) - 1, s_tmin <= sigma <= s_tmax)
        if gamma == 0.0 and not given_x0:
            return self._program_at(i), (*self._conversion(sigma), 0.0)
        self._program_at(i)  # range check
        key = (i, gamma, s_noise, given_x0)
        program = self._churn_programs.get(key)
        if program is None:
            # A caller's pred_original_sample replaces the denoiser: D = out.
            conversion = (lambda s: (0.0, 1.0)) if given_x0 else self._conversion
            program = self._churn_programs[key] = edm_euler_program(
                sigma, float(self._sigmas64[i + 1]), conversion, gamma, s_noise)
        return program

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
        pred_original_sample: Optional[torch.Tensor] = None,
    ):
        """One (churned) Euler step: a single fused kernel."""
        self._check_step_call(timestep)
        i = self._begin_step(model_output, timestep, sample)
        out_dtype = model_output.dtype
        # diffusers works on the float32-upcast sample and returns the model output's dtype.
        work = sample.dtype
        if work != out_dtype or work not in (torch.float32, torch.float64):
            work = torch.promote_types(torch.promote_types(work, out_dtype), torch.float32)
        given = pred_original_sample is not None
        if given and not isinstance(pred_original_sample, torch.Tensor):
            raise TypeError(f"pred_original_sample must be a torch.Tensor, got {type(pred_original_sample).__name__}")
        operand = pred_original_sample if given else model_output
        if operand.shape != sample.shape:
            name = "pred_original_sample" if given else "model_output"
            raise ValueError(f"{name} must have shape {tuple(sample.shape)}, got {tuple(operand.shape)}")
        sample_w, operand = sample.to(work), operand.to(work)
        program, (p, q, noise_coeff) = self._step_program(i, s_churn, s_tmin, s_tmax, s_noise, given)
        noise = None
        if program.uses_noise and self.philox_seed is None:
            # diffusers draws the churn noise in the model output's dtype.
            noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                 dtype=out_dtype).to(work)
        offset = self._philox_offset
        prev_sample = self._run(program, operand, sample_w, noise)
        if given:
            pred = lambda: pred_original_sample  # noqa: E731
        else:
            pred = lambda: self._pred_original(sample_w, operand, p, q, noise_coeff, noise, offset)  # noqa: E731
        return self._finish(prev_sample, pred, EDMEulerSchedulerOutput, return_dict, out_dtype)
