"""Drop-in ``KDPM2DiscreteScheduler`` and ``KDPM2AncestralDiscreteScheduler``.

DPM-Solver-2 stages (:mod:`stepfuse.solvers.kdpm2`) on diffusers' interleaved schedule: step
``0`` evaluates the model at ``sigma_0``, then each interval takes a midpoint evaluation and
the next start point. The schedule arrays are diffusers' float32 ones (the log-midpoints
``sigmas_interpol`` also set the midpoint timesteps, which must match exactly); every plan
coefficient derived from them is float64, and each ``step`` is one fused op.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete import KDPM2AncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_k_dpm_2_discrete import KDPM2DiscreteSchedulerOutput

from .. import schedules
from ..solvers.euler import PREDICTION_TYPES, data_prediction
from ..solvers.kdpm2 import dpm2_plan
from .diffusers_base import FusedSchedulerMixin, check_choice
from .euler import _COMPATIBLES, _check_sigma_flags
from .karras import KarrasScheduleMixin
from .lms import set_train_timesteps


def _interleave(values: torch.Tensor) -> torch.Tensor:
    """``[v0, v1, v1, ..., vn, vn, vn]``: diffusers' layout of per-interval values over both stages."""
    return torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]])


def _log_midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sqrt(a b)`` evaluated as diffusers does (float32 log-lerp-exp), so that timesteps match bit for bit."""
    return a.log().lerp(b.log(), 0.5).exp()


def _midpoint_timesteps(sigmas: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timesteps of float32 ``sigmas``, piecewise linear in log sigma.

    :func:`stepfuse.schedules.sigma_to_t` in the precision diffusers' KDPM2 evaluates it for its
    midpoints: a float64 log rounded to float32, then float32 weights and sums.
    """
    log_sigma = sigmas.double().clamp_min(1e-10).log().float()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.shape[0] - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


class _KDPM2Base(KarrasScheduleMixin, FusedSchedulerMixin):
    """Schedule, input scaling and step shared by the two KDPM2 schedulers."""

    _compatibles = _COMPATIBLES
    order = 2
    _output_cls = KDPM2DiscreteSchedulerOutput
    _ancestral = False  # diffusers draws noise at every second stage of the ancestral variant
    #: The midpoints whose timesteps are interleaved with ``timesteps[1:]`` (one per interval but the last).
    _midpoint_steps = slice(1, -1)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        # diffusers rejects prediction_type="sample" at step(); stepfuse runs it (D = model output).
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_sigma_flags(self.config)
        self._init_karras_schedule()
        set_train_timesteps(self)

    def set_timesteps(self, num_inference_steps: int, device=None, num_train_timesteps: Optional[int] = None) -> None:
        """Interleaved timesteps and sigmas as diffusers computes them; the plan is built here."""
        if num_train_timesteps is not None and num_train_timesteps != self.config.num_train_timesteps:
            raise ValueError(
                f"num_train_timesteps must be None or config.num_train_timesteps={self.config.num_train_timesteps}, "
                f"got {num_train_timesteps}"
            )
        cfg = self.config
        n = schedules._check_int("num_inference_steps", num_inference_steps, minimum=1)
        _, train_sigmas, log_sigmas = schedules._vp_tables(cfg, "float32")
        timesteps = schedules._euler_family_timesteps(cfg, n, "float32")
        sigmas = schedules.interpolate_sigmas(timesteps, train_sigmas)
        kind = schedules._sigma_flag(cfg)
        if kind is not None:
            sigmas = schedules._apply_sigma_schedule(kind, sigmas, n)
            timesteps = schedules.sigma_to_t(sigmas, log_sigmas)
            if kind == "karras":
                timesteps = np.round(timesteps)
        else:
            timesteps = timesteps.astype(np.float32)  # diffusers keeps float32 timesteps unless a sigma flag is set
        self.log_sigmas = torch.from_numpy(log_sigmas).to(device)
        base = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        midpoints = self._set_stage_sigmas(base)
        timesteps = torch.from_numpy(timesteps)
        mid_timesteps = _midpoint_timesteps(midpoints[self._midpoint_steps], torch.from_numpy(log_sigmas))
        pairs = torch.stack([mid_timesteps.to(timesteps.dtype), timesteps[1:]], dim=-1)
        self.timesteps = torch.cat([timesteps[:1], pairs.flatten()]).to(device)
        self.num_inference_steps = n
        # Per step index: the sigma the model is evaluated at, for the first and the second stage.
        self._eval_sigmas64 = {
            first: [self._stage(i, first)[0 if first else 1] for i in range(len(self.timesteps))]
            for first in (True, False)
        }
        self._eval_scales = {
            first: ((torch.tensor(s, dtype=torch.float32) ** 2 + 1) ** 0.5).tolist()
            for first, s in self._eval_sigmas64.items()
        }
        self._derive_ve_state()
        self._reset_run()

    def _set_stage_sigmas(self, base: torch.Tensor) -> torch.Tensor:
        """Install the interleaved stage sigmas for ``base`` (n sigmas + 0); return the per-interval midpoints."""
        raise NotImplementedError

    def _stage(self, i: int, first: bool) -> tuple:
        """``(sigma, sigma_mid, sigma_to, sigma_up)`` of step ``i`` (diffusers' index conventions)."""
        raise NotImplementedError

    def _store_sigmas(self, **arrays: torch.Tensor) -> None:
        for name, values in arrays.items():
            setattr(self, name, _interleave(values))
        self._stage_sigmas64 = {name: getattr(self, name).double().numpy() for name in arrays}

    @property
    def state_in_first_order(self) -> bool:
        """True when the next ``step`` is a first (Euler-to-midpoint) stage."""
        return self._step_index is None or (self._step_index - self._run_start) % 2 == 0

    def _conversion(self, sigma: float) -> tuple:
        return data_prediction(self.config.prediction_type, sigma)

    def _build_plan(self, start_index: int) -> list:
        return dpm2_plan(len(self.timesteps), start_index, self._stage, self._conversion)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """``sample / sqrt(sigma^2 + 1)`` at the sigma this stage evaluates the model at."""
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample / self._eval_scales[self.state_in_first_order][self._step_index]

    def _stage_step(self, model_output, timestep, sample, generator, return_dict: bool):
        i = self._begin_step(model_output, timestep, sample)
        first = self.state_in_first_order
        model_output, sample = self._unify_dtypes(model_output, sample)
        program = self._program_at(i)
        noise = self._step_noise(program, sample, generator, drawn_by_diffusers=self._ancestral and not first)
        prev_sample = self._run(program, model_output, sample, noise)
        p, q = self._conversion(self._eval_sigmas64[first][i])
        pred = lambda: self._data_prediction(sample, model_output, p, q)  # noqa: E731
        return self._finish(prev_sample, pred, self._output_cls, return_dict, prev_sample.dtype)


class KDPM2DiscreteScheduler(_KDPM2Base):
    """DPM-Solver-2 (Lu et al. 2022a) in Karras et al.'s VE form, as k-diffusion's ``sample_dpm_2``.

    Same constructor and config keys as ``diffusers.KDPM2DiscreteScheduler`` and the same
    interleaved ``timesteps``: even steps of a run go to the log-midpoint, odd ones finish the step.
    """

    def _set_stage_sigmas(self, base: torch.Tensor) -> torch.Tensor:
        midpoints = _log_midpoint(base, base.roll(1))  # entry k: between sigma_{k-1} and sigma_k
        self._store_sigmas(sigmas=base, sigmas_interpol=midpoints)
        return midpoints

    def _stage(self, i: int, first: bool) -> tuple:
        sigmas, mids = self._stage_sigmas64["sigmas"], self._stage_sigmas64["sigmas_interpol"]
        if first:
            return float(sigmas[i]), float(mids[i + 1]), float(sigmas[i + 1]), 0.0
        return float(sigmas[i - 1]), float(mids[i]), float(sigmas[i]), 0.0

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One DPM-Solver-2 stage: a single fused kernel."""
        return self._stage_step(model_output, timestep, sample, None, return_dict)


class KDPM2AncestralDiscreteScheduler(_KDPM2Base):
    """Ancestral DPM-Solver-2, as k-diffusion's ``sample_dpm_2_ancestral``: to ``sigma_down``, then noise.

    Same constructor and config keys as ``diffusers.KDPM2AncestralDiscreteScheduler``; the noise of
    each second stage is drawn from ``generator`` like diffusers (or in the kernel with ``philox_seed``).
    """

    _output_cls = KDPM2AncestralDiscreteSchedulerOutput
    _ancestral = True
    _midpoint_steps = slice(None, -2)

    def _set_stage_sigmas(self, base: torch.Tensor) -> torch.Tensor:
        following = base.roll(-1)
        following[-1] = 0.0
        # Ancestral step with eta = 1 (k-diffusion's get_ancestral_step), in diffusers' float32.
        sigmas_up = (following**2 * (base**2 - following**2) / base**2) ** 0.5
        sigmas_down = (following**2 - sigmas_up**2) ** 0.5
        sigmas_down[-1] = 0.0
        midpoints = _log_midpoint(base, sigmas_down)
        midpoints[-2:] = 0.0  # the last interval is one Euler step to 0
        self._store_sigmas(sigmas=base, sigmas_interpol=midpoints, sigmas_up=sigmas_up, sigmas_down=sigmas_down)
        return midpoints

    def _stage(self, i: int, first: bool) -> tuple:
        s = self._stage_sigmas64
        k = i if first else i - 1
        if first:
            return float(s["sigmas"][k]), float(s["sigmas_interpol"][k]), float(s["sigmas"][k + 1]), 0.0
        return (float(s["sigmas"][k]), float(s["sigmas_interpol"][k]), float(s["sigmas_down"][k]),
                float(s["sigmas_up"][k]))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """One ancestral DPM-Solver-2 stage: a single fused kernel."""
        return self._stage_step(model_output, timestep, sample, generator, return_dict)
