"""Drop-in ``SASolverScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import schedules
from ..solvers.sasolver import ALGORITHM_TYPES, MAX_ORDER, default_tau, sasolver_plan
from ..solvers.thresholding import dynamic_threshold
from .ddim import DDIMScheduler
from .diffusers_base import FusedSchedulerMixin, check_choice
from .dpmsolver_multistep import PREDICTION_TYPES, VARIANCE_TYPES
from .vp import VPScheduleMixin


class SASolverScheduler(VPScheduleMixin, FusedSchedulerMixin):
    """SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector, orders 1-4.

    Same constructor and config keys as ``diffusers.SASolverScheduler``; ``set_timesteps``
    evaluates ``tau_func`` at every timestep and computes all predictor and corrector weights
    in float64, and ``step`` runs one fused kernel (corrector, then predictor).

    Noise is drawn like diffusers, one ``randn_tensor`` per step in the model output's dtype
    on ``generator``, so the same seed gives the same samples; a run whose ``tau`` is zero at
    every step draws nothing.  Where diffusers fails, this class does what the update means:
    ``thresholding`` with ``algorithm_type="noise_prediction"`` thresholds the data prediction
    of the current step, and learned-variance outputs keep the sample's channels.
    """

    _accepts_plan_sigmas = True
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _scales_at = DDIMScheduler._scales_at
    # diffusers' SA-Solver noises with DDPM's forward process at training timesteps.
    add_noise = DDIMScheduler.add_noise

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        predictor_order: int = 2,
        corrector_order: int = 2,
        prediction_type: str = "epsilon",
        tau_func: Optional[Callable] = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "data_prediction",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        for name, value in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if not 1 <= value <= MAX_ORDER:
                raise ValueError(f"{name} must be in [1, {MAX_ORDER}], got {value!r}")
        if tau_func is not None and not callable(tau_func):
            raise TypeError(f"tau_func must be a callable of the timestep or None, got {type(tau_func).__name__}")
        check_choice("algorithm_type", algorithm_type, ALGORITHM_TYPES)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        check_choice("timestep_spacing", timestep_spacing, schedules.TIMESTEP_SPACINGS)
        if trained_betas is None:
            check_choice("beta_schedule", beta_schedule, ("linear", "scaled_linear", "squaredcos_cap_v2"))
        if sum([use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas]) > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be True")
        if algorithm_type == "noise_prediction" and prediction_type == "flow_prediction":
            raise ValueError("prediction_type 'flow_prediction' needs algorithm_type 'data_prediction'")
        self._init_vp_schedule()
        # The public tables as diffusers' float32 ones, bit for bit; add_noise reads them like diffusers.
        betas = schedules.betas_for_schedule(
            beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas, precision="float32"
        )
        alphas_cumprod = schedules.alphas_cumprod_from_betas(betas, precision="float32")
        self.betas = torch.from_numpy(betas).float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod).float()
        self._vp_scales64 = torch.from_numpy(np.stack([np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)]))
        self.predict_x0 = algorithm_type == "data_prediction"
        self.num_inference_steps = None
        T = num_train_timesteps
        self.timesteps = torch.from_numpy(np.linspace(0, T - 1, T, dtype=np.float32)[::-1].copy())
        self._reset_run()
        self.tau_func = tau_func if tau_func is not None else default_tau

    @property
    def tau_func(self) -> Callable:
        """Stochasticity ``tau(t)`` of the timestep; setting it recomputes the plan's weights."""
        return self._tau_func

    @tau_func.setter
    def tau_func(self, tau_func: Callable) -> None:
        if not callable(tau_func):
            raise TypeError(f"tau_func must be a callable of the timestep, got {type(tau_func).__name__}")
        self._tau_func = tau_func
        if self.num_inference_steps is not None:
            self._evaluate_tau()

    def _evaluate_tau(self) -> None:
        """tau at every timestep, on the host, once per schedule (diffusers calls it at each step)."""
        taus = []
        for t in self._timesteps_host:
            tau = self._tau_func(t)
            try:  # Python and NumPy numbers, bools, one-element tensors; not strings
                value = math.nan if isinstance(tau, (str, bytes)) else float(tau)
            except (TypeError, ValueError, RuntimeError):
                value = math.nan
            if not math.isfinite(value):
                raise ValueError(f"tau_func must return a finite real number, got {tau!r} at timestep {int(t)}")
            taus.append(value)
        self._taus = taus
        self._plan_cache.clear()

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None) -> None:
        """Timesteps and sigmas as diffusers computes them, tau at each timestep, and the plan."""
        self._set_schedule("SASolverScheduler", num_inference_steps, device)
        self._evaluate_tau()

    # -- plan --------------------------------------------------------------------------------
    def _conversion(self, i: int) -> tuple:
        """(p, q): the solver's prediction (data or noise) = p * sample + q * model_output at step i."""
        cfg = self.config
        # With thresholding the kernel receives the thresholded data prediction as "model output".
        x0 = (0.0, 1.0) if cfg.thresholding else self._x0_conversion(i)
        if self.predict_x0:
            return x0
        alpha, sigma = self._alpha64[i], self._sigma64[i]
        if cfg.thresholding or cfg.prediction_type == "sample":
            return (1.0 / sigma - alpha / sigma * x0[0], -alpha / sigma * x0[1])  # eps = (x - alpha x0) / sigma
        if cfg.prediction_type == "v_prediction":
            return (sigma, alpha)  # eps = alpha v + sigma x
        return (0.0, 1.0)

    def _install_plan_sigmas(self, sigmas: np.ndarray, device) -> None:
        # The stochastic Adams coefficients integrate exp(-(1 + tau^2) lambda): lambda = inf at sigma = 0.
        if sigmas[-1] == 0.0:
            raise ValueError("SASolverScheduler needs a plan whose last sigma is positive (it ends at sigma_min)")
        super()._install_plan_sigmas(sigmas, device)

    def _build_plan(self, start_index: int) -> list:
        cfg = self.config
        return sasolver_plan(
            alpha=self._alpha64,
            sigma=self._sigma64,
            taus=self._taus,
            predictor_order=cfg.predictor_order,
            corrector_order=cfg.corrector_order,
            predict_x0=self.predict_x0,
            lower_order_final=cfg.lower_order_final,
            start_index=start_index,
            conversion=self._conversion,
        )

    def _draws_noise(self) -> bool:
        """Whether this run draws noise at every step, as diffusers does (not when tau is zero throughout)."""
        plan = self._plan(self._run_start)
        return self.philox_seed is None and any(p is not None and p.uses_noise for p in plan)

    # -- step --------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ):
        """SA-Corrector on ``sample`` with ``model_output``, then SA-Predictor: a single fused kernel
        (two with thresholding)."""
        i = self._begin_step(model_output, timestep, sample)
        cfg = self.config
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            model_output = model_output[:, : sample.shape[1]]
        program = self._program_at(i)
        noise = None
        if self._draws_noise():
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=model_output.dtype)
            noise = noise.to(sample.dtype) if program.uses_noise else None
        if cfg.thresholding:
            x0 = self._data_prediction(sample, model_output, *self._x0_conversion(i))
            model_output = dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        prev_sample = self._run(program, model_output, sample, noise)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)
