"""Drop-in ``FlowMatchHeunDiscreteScheduler``: diffusers' class name, config and results, one fused op per step.

Heun's method (Karras et al. 2022, Alg. 1/2) on the rectified-flow ODE ``dx/dsigma = v``. With
``x = (1 - sigma) x0 + sigma z`` and velocity ``v = z - x0`` the data prediction is
``D = x - sigma * v``, so Karras' slope ``(x - D) / sigma`` is ``v`` and the VE Heun plan of
:mod:`stepfuse.solvers.euler` runs unchanged with ``(p, q) = (1, -sigma)``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_heun_discrete import FlowMatchHeunDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import schedules
from ..solvers.euler import churn_gamma, euler_terms, heun_plan
from ..solvers.program import OUTPUT, StepProgram
from .diffusers_base import FusedSchedulerMixin
from .euler import HeunDiscreteScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler
from .vp import VPScheduleMixin


class FlowMatchHeunDiscreteScheduler(VPScheduleMixin, FusedSchedulerMixin):
    """Heun sampler for rectified-flow models, two model evaluations per step, optional churn.

    Same constructor and config keys as ``diffusers.FlowMatchHeunDiscreteScheduler`` and the same
    interleaved ``timesteps``: even steps of a run are Euler predictors, odd ones correctors.
    """

    _compatibles: list = []
    order = 2
    # diffusers keeps the predictor's state in float32 between the two stages.
    history_dtype = torch.float32
    state_in_first_order = HeunDiscreteScheduler.state_in_first_order
    _alpha_sigma64 = FlowMatchEulerDiscreteScheduler._alpha_sigma64
    _sigma_to_t = FlowMatchEulerDiscreteScheduler._sigma_to_t

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, (int, np.integer)) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an int >= 1, got {num_train_timesteps!r}")
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        # Training sigmas t/T for t = T..1, shifted in float32 as diffusers' __init__ does.
        T = num_train_timesteps
        sigmas = schedules.shift_sigmas(np.arange(T, 0, -1).astype(np.float32) / np.float32(T), shift)
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32))
        self.timesteps = self.sigmas * T
        self._sigmas64 = sigmas.astype(np.float64)
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._reset_run()

    def _reset_run(self) -> None:
        super()._reset_run()
        self._churn_programs: dict = {}
        self._corrector: Optional[StepProgram] = None  # second stage after a churned first stage

    def _init_step_index(self, timestep) -> None:
        # scale_noise may start the run before step() does.
        super()._init_step_index(timestep)
        self._run_start = self._step_index

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """Interleaved timesteps and sigmas as diffusers computes them; the plan is built here."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        # The flow-match Euler grid (linspace of the training sigmas' ends, shifted), then each
        # interior sigma twice: one interval per predictor/corrector pair.
        self._set_schedule("FlowMatchEulerDiscreteScheduler", num_inference_steps, None)
        timesteps, sigmas = schedules.heun_interleave(self.timesteps.numpy(), self._sigmas64)
        self._sigmas64 = sigmas
        self.sigmas = torch.from_numpy(sigmas.astype(np.float32)).to(device)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.num_inference_steps = int(num_inference_steps)
        self._reset_run()

    def _build_plan(self, start_index: int) -> list:
        return heun_plan(self._sigmas64, len(self.timesteps), start_index, self._conversion)

    def _conversion(self, i: int) -> tuple:
        return 1.0, -float(self._sigmas64[i])  # D = x - sigma * v

    _denoised_conversion = _conversion

    def _churned_programs(self, i: int, gamma: float, s_noise: float) -> tuple:
        """Predictor and corrector for a first stage churned to ``sigma_hat = (1 + gamma) sigma`` (Alg. 2).

        As in diffusers, the velocity is read at ``sigma`` and the slope ``v sigma / sigma_hat`` is
        integrated from ``sigma_hat``; the corrector then spans ``dt = sigma_next - sigma_hat``.
        """
        key = (i, gamma, s_noise)
        if key not in self._churn_programs:
            sigma, sigma_to = float(self._sigmas64[i]), float(self._sigmas64[i + 1])
            sigma_hat = sigma * (1.0 + gamma)
            noise_in = s_noise * sigma * math.sqrt(gamma * (gamma + 2.0))  # sqrt(sigma_hat^2 - sigma^2)
            p, q = self._conversion(i)
            rows = [(OUTPUT, euler_terms(p, q, sigma_hat, sigma_to, noise_in=noise_in))]
            if i + 1 < len(self.timesteps):
                rows.insert(0, (0, euler_terms(p, q, sigma_hat, 0.5 * (sigma_hat + sigma_to), noise_in=noise_in)))
            corrector = StepProgram.build(1, [(OUTPUT, {0: 1.0, "out": 0.5 * (sigma_to - sigma_hat)})])
            self._churn_programs[key] = (StepProgram.build(1, rows), corrector)
        return self._churn_programs[key]

    def _churn_noise(self, model_output: torch.Tensor, generator) -> Optional[torch.Tensor]:
        if self.philox_seed is not None:
            return None
        # diffusers draws in the model output's dtype whenever gamma > 0, in both stages: the
        # corrector's draw cancels out of its slope but keeps a shared generator in step.
        return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                            dtype=model_output.dtype)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Forward process ``(1 - s) sample + s noise`` at the current step's sigma (diffusers' semantics)."""
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
        if not isinstance(noise, torch.Tensor) or noise.shape != sample.shape:
            raise ValueError(f"noise must be a tensor of shape {tuple(sample.shape)}, got {noise!r:.80}")
        if self._step_index is None:
            self._init_step_index(timestep)
        alpha, sigma = self._alpha_sigma64(self._sigmas64[self._step_index])
        return float(sigma) * noise + float(alpha) * sample

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
        """One Heun stage (predictor or corrector), churned when ``s_churn > 0``: a single fused kernel."""
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                f"timestep must be one of {type(self).__name__}.timesteps (a float), got the integer "
                f"{timestep!r} (an index from enumerate(timesteps)?)"
            )
        if not s_churn >= 0:
            raise ValueError(f"s_churn must be >= 0, got {s_churn!r}")
        if not math.isfinite(s_noise):
            raise ValueError(f"s_noise must be finite, got {s_noise!r}")
        i = self._begin_step(model_output, timestep, sample)
        program = self._program_at(i)
        out_dtype = model_output.dtype
        if sample.dtype != out_dtype:
            # diffusers computes in float32 and returns the model output's dtype.
            work = torch.promote_types(torch.promote_types(sample.dtype, out_dtype), torch.float32)
            sample, model_output = sample.to(work), model_output.to(work)
        first = self.state_in_first_order
        # Both stages test the predictor's sigma against [s_tmin, s_tmax], compared in float32 as diffusers does.
        sigma = float(self._sigmas64[i if first else i - 1])
        in_range = float(np.float32(s_tmin)) <= sigma <= float(np.float32(s_tmax))
        gamma = churn_gamma(s_churn, len(self._sigmas64) - 1, in_range)
        noise = self._churn_noise(model_output, generator) if gamma > 0 else None
        if first:
            self._corrector = None
            if gamma > 0:
                program, self._corrector = self._churned_programs(i, gamma, s_noise)
        elif self._corrector is not None:
            program = self._corrector
        if noise is not None:
            noise = noise.to(sample.dtype) if program.uses_noise else None
        prev_sample = self._run(program, model_output, sample, noise).to(out_dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchHeunDiscreteSchedulerOutput(prev_sample=prev_sample)
