"""Runtime shared by stepfuse's drop-in diffusers schedulers.

A scheduler computes its schedule in float64 when timesteps are set and turns it
into one :class:`~stepfuse.solvers.program.StepProgram` per step (its *plan*).
``step()`` then only does host bookkeeping and calls the fused op once: no
coefficient math on tensors and no device-to-host synchronisation (the single
exception is diffusers' own timestep lookup on the very first step when no begin
index was set, which reads the timestep's value).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..ops import guided_step, solver_step
from ..ref.philox import philox_blocks
from ..solvers.plan import SamplingPlan, as_plan, extrapolate_denoised, max_slots
from ..solvers.program import OUTPUT, StepProgram


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def legacy_choice(scheduler, name: str, value, legacy: Sequence, replacement):
    """``value``, or ``replacement`` (also written to the config) where diffusers maps a legacy name."""
    if value in legacy:
        scheduler.register_to_config(**{name: replacement})
        return replacement
    return value


class LazyStepTuple(tuple):
    """``(prev_sample, pred_original_sample)`` whose second entry is computed only when read.

    Pipelines call ``step(..., return_dict=False)[0]``; computing the data prediction
    for them would be a wasted pass over the latent.
    """

    def __new__(cls, prev_sample: torch.Tensor, pred_original: Callable[[], torch.Tensor]):
        self = super().__new__(cls, (prev_sample, pred_original))
        self._cache = None
        return self

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        value = super().__getitem__(index)
        if callable(value):
            if self._cache is None:
                self._cache = value()
            return self._cache
        return value

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class FusedSchedulerMixin(SchedulerMixin, ConfigMixin):
    """Plan cache, history ring, step index and the fused ``step`` shared by all drop-ins.

    Subclasses set ``timesteps``, ``sigmas`` and ``num_inference_steps`` in
    ``set_timesteps``, call :meth:`_reset_run`, and implement :meth:`_build_plan`.
    """

    order = 1

    def __init_subclass__(cls, **kwargs):
        # Build the plan for a run from the first step as part of set_timesteps (DESIGN.md:
        # coefficients are computed when timesteps are set); other begin indices build
        # theirs at their first step.
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("set_timesteps")
        if method is None or getattr(method, "_builds_plan", False):
            return

        @functools.wraps(method)
        def set_timesteps(self, *args, plan=None, **kw):
            if plan is not None:
                self.set_plan(plan)
            if self.sampling_plan is not None:
                result = self._set_plan_timesteps(method, args, kw)
            else:
                result = method(self, *args, **kw)
            if type(self)._build_plan is not FusedSchedulerMixin._build_plan:
                self._plan(0)
            return result

        set_timesteps._builds_plan = True
        cls.set_timesteps = set_timesteps

    #: Set to True to reject non-finite model outputs (costs one host sync per step).
    check_finite: bool = False
    #: History ring dtype; ``None`` keeps the sample's dtype (as diffusers does).
    history_dtype: Optional[torch.dtype] = None
    #: When set, noise is drawn inside the kernel from Philox(seed, offset) instead of ``generator``.
    philox_seed: Optional[int] = None
    #: The StepProgram the last ``step()`` ran (for inspection and benchmarks).
    last_program: Optional[StepProgram] = None
    #: The :class:`~stepfuse.solvers.plan.SamplingPlan` ``set_timesteps`` installs (``set_plan``).
    sampling_plan: Optional[SamplingPlan] = None
    #: Whether ``set_timesteps`` can install a plan's ``sigmas`` (``_install_plan_sigmas``).
    _accepts_plan_sigmas: bool = False

    # -- sampling plans (stepfuse.plans) ----------------------------------------------------
    @classmethod
    def from_plan(cls, plan, config=None, **kwargs):
        """A scheduler (from ``config`` and ``kwargs``) whose runs follow ``plan``.

        ``plan`` is a :class:`~stepfuse.solvers.plan.SamplingPlan`, its dict or a saved JSON path;
        ``set_timesteps`` then installs the plan's sigmas (``num_inference_steps`` must be the
        plan's step count or None) and every step applies the plan's D-ODE scales.
        """
        scheduler = cls.from_config(config, **kwargs) if config is not None else cls(**kwargs)
        scheduler.set_plan(plan)
        return scheduler

    def set_plan(self, plan) -> None:
        """Install ``plan`` for the following ``set_timesteps`` calls (``None`` removes it)."""
        if plan is not None:
            plan = as_plan(plan)
            name = type(self).__name__
            if not self._accepts_plan_sigmas:
                raise ValueError(f"{name} cannot install a plan's sigmas; use a sigma-based scheduler "
                                 "(DPM-Solver, UniPC, DEIS, Euler, LMS, flow-match Euler) or stepfuse.k_diffusion")
            if plan.shifted_sigmas is not None:
                raise ValueError(f"plan has shifted_sigmas, which {name} cannot apply (its steps start where the "
                                 "previous one ended); run it with a stepfuse.k_diffusion sampler")
        self.sampling_plan = plan

    def _set_plan_timesteps(self, method, args, kw):
        plan = self.sampling_plan
        params = ["num_inference_steps", "device"]
        given = dict(zip(params, args))
        if len(args) > len(params):
            raise ValueError(f"set_timesteps with a plan takes num_inference_steps and device, got {len(args)} values")
        given.update(kw)
        extra = sorted(k for k, v in given.items() if k not in params and v is not None)
        if extra:
            raise ValueError(f"set_timesteps with a plan installed cannot take {extra}; call set_plan(None) first")
        steps = given.get("num_inference_steps")
        if steps is not None and steps != plan.num_steps:
            raise ValueError(f"num_inference_steps must be None or the plan's {plan.num_steps} steps, got {steps}")
        device = given.get("device")
        result = method(self, plan.num_steps, device=device)
        self._install_plan_sigmas(np.asarray(plan.sigmas, dtype=np.float64), device)
        self._reset_run()
        return result

    def _install_plan_sigmas(self, sigmas: np.ndarray, device) -> None:
        raise ValueError(f"{type(self).__name__} cannot install a plan's sigmas")

    def _denoised_conversion(self, i: int) -> tuple:
        """``(p, q)`` with the data prediction ``p * sample + q * kernel model output`` at step ``i``."""
        raise ValueError(f"{type(self).__name__} cannot apply a plan's D-ODE scales")

    def _apply_plan_scales(self, programs: list) -> list:
        """Fold the plan's D-ODE scales into the run's programs (``None`` entries stay)."""
        plan = self.sampling_plan
        if plan is None or plan.scales is None:
            return programs
        plan.check_scales(len(programs), type(self).__name__)
        width = max_slots(programs)
        start = next(i for i, p in enumerate(programs) if p is not None)
        return [None if p is None else
                extrapolate_denoised(p, plan.scales[i] if i > start else 0.0, i - start, width,
                                     self._denoised_conversion(i))
                for i, p in enumerate(programs)]

    def _reset_run(self) -> None:
        self._step_index = None
        self._begin_index = None
        self._plan_cache: dict[int, list] = {}
        self._history: Optional[torch.Tensor] = None
        self._philox_offset = 0
        self._timesteps_host = self.timesteps.detach().to("cpu") if self.timesteps is not None else None

    # -- diffusers' step-index protocol ----------------------------------------------------
    @property
    def step_index(self):
        """Index of the step the next ``step()`` call takes."""
        return self._step_index

    @property
    def begin_index(self):
        """First step index, set by pipelines through :meth:`set_begin_index` (img2img)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        if not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index must be a non-negative int, got {begin_index!r}")
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Index of ``timestep`` in the schedule; with duplicates the second one, as diffusers."""
        if schedule_timesteps is None:
            schedule_timesteps = self._timesteps_host
        schedule_timesteps = schedule_timesteps.detach().to("cpu")
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.detach().to("cpu")
        candidates = (schedule_timesteps == timestep).nonzero()
        if len(candidates) == 0:
            return len(schedule_timesteps) - 1
        return int(candidates[1 if len(candidates) > 1 else 0])

    def _init_step_index(self, timestep) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    # -- the plan ----------------------------------------------------------------------------
    def _build_plan(self, start_index: int) -> list:
        """One StepProgram per step index (``None`` before ``start_index``); float64 host math."""
        raise NotImplementedError

    def _plan(self, start_index: int) -> list:
        plan = self._plan_cache.get(start_index)
        if plan is None:
            plan = self._plan_cache[start_index] = self._apply_plan_scales(self._build_plan(start_index))
        return plan

    def _history_for(self, sample: torch.Tensor, num_slots: int) -> torch.Tensor:
        dtype = self.history_dtype or sample.dtype
        shape = (num_slots, *sample.shape)
        h = self._history
        if h is None or h.shape != shape or h.dtype != dtype or h.device != sample.device:
            if h is not None and self._step_index is not None and self._step_index > self._run_start:
                raise ValueError(
                    f"sample changed shape/dtype/device mid-run (history {tuple(h.shape)} {h.dtype} {h.device}, "
                    f"sample {tuple(sample.shape)} {sample.dtype} {sample.device}); call set_timesteps first"
                )
            h = self._history = torch.zeros(shape, dtype=dtype, device=sample.device)
        return h

    # -- the fused step ----------------------------------------------------------------------
    def _begin_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> int:
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is None: call set_timesteps before step")
        if not isinstance(model_output, torch.Tensor):
            raise TypeError(f"model_output must be a torch.Tensor, got {type(model_output).__name__}")
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")
        if self._step_index is None:
            self._init_step_index(timestep)
            self._run_start = self._step_index
        if self.check_finite and not bool(torch.isfinite(model_output).all()):
            raise ValueError(f"model_output has non-finite values at step {self._step_index}")
        return self._step_index

    def _program_at(self, index: int) -> StepProgram:
        plan = self._plan(self._run_start)
        if index >= len(plan):
            raise ValueError(
                f"step index {index} is past the schedule of {len(plan)} steps; call set_timesteps for a new run"
            )
        return plan[index]

    def _noise_for(self, program: StepProgram, sample: torch.Tensor, generator, variance_noise=None):
        """Noise tensor for a stochastic program, drawn like diffusers (``randn_tensor`` on ``generator``)."""
        if not program.uses_noise:
            return None
        if variance_noise is not None:  # the caller's noise wins over any generator
            if variance_noise.shape != sample.shape:
                raise ValueError(f"variance_noise must have shape {tuple(sample.shape)}, got {tuple(variance_noise.shape)}")
            return variance_noise.to(device=sample.device, dtype=sample.dtype)
        if self.philox_seed is not None:
            return None
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=self._noise_dtype(sample))
        return noise.to(sample.dtype)

    def _noise_dtype(self, sample: torch.Tensor) -> torch.dtype:
        return sample.dtype

    def _run(self, program: StepProgram, model_output, sample, noise=None, history=None) -> torch.Tensor:
        """Run ``program``; ``history`` replaces the scheduler's ring (an operand computed this step)."""
        if history is None:
            history = self._history_for(sample, program.num_slots)
        self.last_program = program
        seed = offset = 0
        if program.uses_noise and noise is None:
            if self.philox_seed is None:
                raise ValueError("a stochastic step needs noise: pass generator/variance_noise or set philox_seed")
            seed, offset = int(self.philox_seed), self._philox_offset
            self._philox_offset += philox_blocks(sample.numel())
        guided = self._pending_guidance
        if guided is not None:
            self._pending_guidance = None
            if model_output is not guided.branches[0]:
                raise RuntimeError(f"{type(self).__name__}.step transformed its model output; guidance cannot be "
                                   "fused into it (fuses_guidance() should be False)")
            return guided_step(sample, guided.branches, guided.stats, guided.momentum, guided.rule, history, program,
                               noise, seed, offset)
        return solver_step(sample, model_output, history, program, noise, seed, offset)

    # -- fused guidance (stepfuse.guidance) ----------------------------------------------------
    #: Guided inputs the next ``_run`` folds into its step (set by :meth:`guided_step`).
    _pending_guidance = None

    def fuses_guidance(self) -> bool:
        """Whether ``step`` hands its model output to the fused kernel untouched, so guidance can be
        folded into the step; thresholding, clipping and learned variances transform it first."""
        cfg = self.config
        return not (cfg.get("thresholding", False) or cfg.get("clip_sample", False)
                    or cfg.get("variance_type") in ("learned", "learned_range"))

    def has_data_conversion(self) -> bool:
        """Whether the scheduler knows its data prediction ``p * sample + q * output`` per step
        (needed by ``target="denoised"`` guidance and D-ODE plan scales)."""
        return type(self)._denoised_conversion is not FusedSchedulerMixin._denoised_conversion

    def guidance_conversion(self, timestep) -> tuple:
        """``(p, q)`` of the data prediction ``p * sample + q * output`` at the step ``timestep`` starts."""
        if self._step_index is None:
            self._init_step_index(timestep)
            self._run_start = self._step_index
        return self._denoised_conversion(self._step_index)

    def guided_step(self, guided, timestep, sample: torch.Tensor, **step_kwargs):
        """``step`` with the guided combination of ``guided.branches`` as its model output, in the
        same single kernel (``guided``: a :class:`stepfuse.guidance.GuidedInputs`)."""
        fuses = self.__dict__.get("_fuses_guidance")
        if fuses is None or fuses[0] is not self.config:
            fuses = self._fuses_guidance = (self.config, self.fuses_guidance())
        if not fuses[1]:
            raise ValueError(f"{type(self).__name__} with this config transforms the model output before its "
                             "step (thresholding, clipping or learned variance): guide the output first")
        self._pending_guidance = guided
        try:
            return self.step(guided.branches[0], timestep, sample, **step_kwargs)
        finally:
            self._pending_guidance = None

    def _data_prediction(self, sample: torch.Tensor, model_output: torch.Tensor, p: float, q: float,
                         noise_coeff: float = 0.0, noise: Optional[torch.Tensor] = None,
                         philox_offset: int = 0) -> torch.Tensor:
        """``p * sample + q * model_output (+ noise_coeff * z)`` through the fused op.

        The ``pred_original_sample`` output; ``z`` is a step's own noise (``noise``, or its
        Philox draw, which the same seed and offset reproduce exactly).
        """
        terms = {"x": p, "out": q, "noise": noise_coeff} if noise_coeff else {"x": p, "out": q}
        program = StepProgram.build(0, [(OUTPUT, terms)])
        empty = sample.new_empty((0, *sample.shape))
        seed = int(self.philox_seed or 0)
        return solver_step(sample, model_output, empty, program, noise, seed, philox_offset)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
