"""Drop-in ``FlowMatchEulerDiscreteScheduler``: diffusers' class name, config and results, one fused op per step."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from .. import schedules
from ..solvers.flow import flow_euler_plan
from .diffusers_base import FusedSchedulerMixin, check_choice
from .vp import VPScheduleMixin


class FlowMatchEulerDiscreteScheduler(VPScheduleMixin, FusedSchedulerMixin):
    """Euler sampler for rectified-flow models (SD3, Flux, Wan, LTX, ...), deterministic or ping-pong.

    Same constructor and config keys as ``diffusers.FlowMatchEulerDiscreteScheduler``; ``step``
    runs one fused kernel with coefficients computed in float64 by ``set_timesteps``.
    """

    _accepts_plan_sigmas = True
    _compatibles: list = []
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: Optional[float] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
    ):
        flags = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if self.config[k]]
        if len(flags) > 1:
            raise ValueError(
                f"only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas may be True, got {flags}"
            )
        check_choice("time_shift_type", time_shift_type, schedules.TIME_SHIFT_TYPES)
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        if shift_terminal is not None and not 0 <= shift_terminal < 1:
            raise ValueError(f"shift_terminal must be None or in [0, 1), got {shift_terminal!r}")
        # Training sigmas t/T for t = T..1 in float32, statically shifted unless shifting is dynamic.
        sigmas = np.arange(num_train_timesteps, 0, -1).astype(np.float32) / np.float32(num_train_timesteps)
        if not use_dynamic_shifting:
            sigmas = schedules.shift_sigmas(sigmas, shift).astype(np.float32)
        self.timesteps = torch.from_numpy(sigmas * np.float32(num_train_timesteps))
        self.sigmas = torch.from_numpy(sigmas)
        self._sigmas64 = sigmas.astype(np.float64)
        self.sigma_min = float(sigmas[-1])
        self.sigma_max = float(sigmas[0])
        self._shift = shift
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._reset_run()

    @property
    def shift(self) -> float:
        """The static shift ``set_timesteps`` applies (``set_shift`` changes it)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        self._shift = shift

    def _denoised_conversion(self, i: int) -> tuple:
        return 1.0, -float(self._sigmas64[i])  # x0 = x - sigma * v on x = (1 - sigma) x0 + sigma eps

    def _alpha_sigma64(self, sigmas: np.ndarray) -> tuple:
        return schedules.sigma_to_alpha_sigma_t(sigmas, "flow")

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        sigmas: Optional[list] = None,
        mu: Optional[float] = None,
        timesteps: Optional[list] = None,
    ) -> None:
        """Compute timesteps and sigmas as diffusers does (the plan follows at the first step)."""
        cfg = self.config
        if self._shift != cfg.shift and not cfg.use_dynamic_shifting:
            sigmas = self._grid_for_set_shift(num_inference_steps, sigmas, timesteps)
        self._set_schedule(
            "FlowMatchEulerDiscreteScheduler", num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps
        )
        if cfg.invert_sigmas:
            # diffusers rounds 1 - sigma to float32 before scaling it to timesteps; this
            # float32 product reproduces that rounding (schedules.py rounds only once).
            self.timesteps = (self.sigmas[:-1] * cfg.num_train_timesteps).to(self.timesteps.device)
            self._timesteps_host = self.timesteps.cpu()
        if device is not None:
            self.sigmas = self.sigmas.to(device)  # diffusers keeps these beside the timesteps

    def _grid_for_set_shift(self, num_inference_steps, sigmas, timesteps) -> np.ndarray:
        """Custom sigmas that, shifted by the config's shift, give diffusers' grid shifted by ``self.shift``.

        diffusers spaces its default grid between the training sigmas of ``__init__`` and shifts it
        by the current shift; the schedule builder shifts by ``config.shift``.  Shifts compose,
        ``f_a(f_b(s)) = f_{ab}(s)``, so pre-shifting by ``shift / config.shift`` lands on diffusers' values.
        """
        T = self.config.num_train_timesteps
        if sigmas is not None:
            grid = np.asarray(sigmas, dtype=np.float64)
        elif timesteps is not None:
            grid = np.asarray(timesteps, dtype=np.float32) / np.float32(T)
        else:
            if num_inference_steps is None:
                raise ValueError("pass one of num_inference_steps, sigmas or timesteps")
            grid = np.linspace(self.sigma_max * T, self.sigma_min * T, num_inference_steps) / T
        return schedules.shift_sigmas(np.asarray(grid, dtype=np.float64), self._shift / self.config.shift)

    def _build_plan(self, start_index: int) -> list:
        return flow_euler_plan(self._sigmas64, start_index, stochastic=self.config.stochastic_sampling)

    def _noise_dtype(self, sample: torch.Tensor) -> torch.dtype:
        return torch.float32  # diffusers draws the ping-pong noise for the float32-upcast sample

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Forward process of flow matching, ``(1 - s) x0 + s noise`` at each sample's timestep."""
        if noise is None:
            raise ValueError("noise must be a tensor shaped like sample, got None")
        return self.add_noise(sample, noise, torch.as_tensor(timestep))

    def time_shift(self, mu: float, sigma: float, t):
        """Dynamic shift of flow times ``t`` of the configured ``time_shift_type`` (see schedules.time_shift)."""
        return _like(t, schedules.time_shift(mu, sigma, _host(t), self.config.time_shift_type))

    def stretch_shift_to_terminal(self, t):
        """Stretch ``1 - t`` so the last value lands on ``shift_terminal`` (LTX-Video)."""
        return _like(t, schedules.stretch_shift_to_terminal(_host(t), self.config.shift_terminal))

    def _sigma_to_t(self, sigma):
        return sigma * self.config.num_train_timesteps

    # -- step --------------------------------------------------------------------------------
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
        per_token_timesteps: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        """One Euler (or ping-pong) step: a single fused kernel.

        ``s_churn``, ``s_tmin``, ``s_tmax`` and ``s_noise`` are accepted and ignored, as in diffusers.
        """
        if isinstance(timestep, (int, np.integer)) or (
            isinstance(timestep, torch.Tensor) and not torch.is_floating_point(timestep)
        ):
            raise ValueError(
                "timestep must be one of scheduler.timesteps (a float), not an integer index such as "
                "one from enumerate(timesteps)"
            )
        if per_token_timesteps is not None:
            # Per-token sigmas make every coefficient a tensor: no fixed step program exists.
            raise ValueError(
                "per_token_timesteps is not supported by stepfuse's FlowMatchEulerDiscreteScheduler; "
                "use diffusers.FlowMatchEulerDiscreteScheduler for per-token timesteps"
            )
        index = self._begin_step(model_output, timestep, sample)
        out_dtype = model_output.dtype
        if sample.dtype != out_dtype:
            # diffusers computes in float32 and returns the model output's dtype.
            work = torch.promote_types(torch.promote_types(sample.dtype, out_dtype), torch.float32)
            sample, model_output = sample.to(work), model_output.to(work)
        program = self._program_at(index)
        noise = self._noise_for(program, sample, generator)
        prev_sample = self._run(program, model_output, sample, noise).to(out_dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)


def _host(t) -> np.ndarray:
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def _like(t, values: np.ndarray):
    if isinstance(t, torch.Tensor):
        return torch.as_tensor(values, device=t.device, dtype=t.dtype)
    return values
