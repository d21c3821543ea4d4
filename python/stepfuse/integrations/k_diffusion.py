"""Drop-in ``k_diffusion.sampling`` samplers whose every update is one fused solver step.

k-diffusion (Crowson) drives a denoiser ``D(x; sigma)`` that returns the data
prediction directly, on the variance-exploding sample ``x = x0 + sigma * eps``
(Karras et al., "Elucidating the Design Space of Diffusion-Based Generative
Models", 2022, eq. 1), and its ComfyUI / A1111 users call the samplers with
the same signatures as here. With ``eps_k = (u_k - D_k) / sigma_k`` the
probability-flow slope at a point ``u_k`` (Karras et al. 2022, Alg. 1 line 4),
every update those samplers make is a linear combination of the step's start
``x``, the model outputs ``D_k`` at the points ``u_k`` the step visits, the
points themselves, a few past ``D``, and fresh noise. So each is written once
here as coefficients computed on the host in float64 from ``sigmas`` (moved to
the host once per call) and executed as one :func:`stepfuse.ops.solver_step`
per update: no per-step host sync, no chains of tiny tensor ops.

Two program shapes cover all samplers:

* staged steps (Euler, Heun, DPM-2, the ancestral and 2S/SDE variants,
  DPM-Solver-fast/adaptive): stage ``k`` evaluates the model at ``u_k``
  (``u_0 = x``) and its program writes ``u_{k+1}`` (the last stage: the next
  sample); parts of later quantities that need ``x`` or earlier ``D_k`` are
  accumulated in history slots (:func:`_compile_stages`);
* multistep steps (DPM-Solver++(2M), 2M/3M SDE, LMS): the newest model-derived
  quantity is written into a ring slot and the update reads the older ones
  (:func:`_ring_program`).

Noise is drawn exactly where k-diffusion draws it (same callable, same
arguments, same order relative to model calls) and handed to the fused step.
Only draws whose every value would be multiplied by zero are skipped when no
``noise_sampler`` is given (``s_churn = 0`` for Euler/Heun/DPM-2, ``eta = 0``
for the ancestral and SDE samplers): the result is the same, only the global
generator is left where it was.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch

from .. import schedules
from ..ops import solver_step
from ..schedules import _check_choice, _check_float, _check_int
from ..solvers.euler import churn_gamma
from ..solvers.plan import SamplingPlan, as_plan, extrapolate_denoised
from ..solvers.program import MAX_SLOTS, OUTPUT, StepProgram

__all__ = [
    "BrownianTreeNoiseSampler",
    "append_zero",
    "default_noise_sampler",
    "get_ancestral_step",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_polyexponential",
    "get_sigmas_vp",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_adaptive",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
    "to_d",
]

SAMPLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: While set (by stepfuse.plans.distill_scales), runs with D-ODE scales ask it for each scale.
SCALE_FIT: contextvars.ContextVar = contextvars.ContextVar("stepfuse_scale_fit", default=None)
SOLVER_TYPES = ("midpoint", "heun")

Terms = dict  # {"x" | "out" | "noise" | slot: coefficient}, see stepfuse.solvers.program


# --------------------------------------------------------------------------------------
# noise schedules (host float64, returned like k-diffusion: default dtype, final zero)
# --------------------------------------------------------------------------------------


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a trailing 0: the final noise level of a sampling schedule."""
    return torch.cat([x, x.new_zeros([1])])


def _schedule_tensor(sigmas: np.ndarray, device) -> torch.Tensor:
    values = np.append(np.asarray(sigmas, dtype=np.float64), 0.0)
    return torch.as_tensor(values).to(device=device, dtype=torch.get_default_dtype())


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu") -> torch.Tensor:
    """Karras et al. 2022, eq. 5: ``n`` sigmas from ``sigma_max`` to ``sigma_min``, then 0."""
    n = _check_int("n", n, minimum=1)
    return _schedule_tensor(schedules.karras_sigmas(n, sigma_min, sigma_max, rho), device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu") -> torch.Tensor:
    """``n`` sigmas uniform in ``log sigma`` from ``sigma_max`` to ``sigma_min``, then 0."""
    n = _check_int("n", n, minimum=1)
    return _schedule_tensor(schedules.exponential_sigmas(n, sigma_min, sigma_max), device)


def get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0, device="cpu") -> torch.Tensor:
    """``log sigma`` running from ``log sigma_max`` to ``log sigma_min`` along ``ramp^rho``, ramp 1 -> 0.

    ``rho = 1`` is the exponential schedule; ``rho > 1`` spends more steps at low noise.
    """
    n = _check_int("n", n, minimum=1)
    lo = _check_float("sigma_min", sigma_min, gt=0.0)
    hi = _check_float("sigma_max", sigma_max, gt=0.0)
    rho = _check_float("rho", rho, gt=0.0)
    ramp = np.linspace(1.0, 0.0, n) ** rho
    return _schedule_tensor(np.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)), device)


def get_sigmas_vp(n, beta_d=19.9, beta_min=0.1, eps_s=1e-3, device="cpu") -> torch.Tensor:
    """Continuous VP-SDE noise levels (Song et al. 2021; Karras et al. 2022, Table 1).

    ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)`` at ``n`` times from 1 down to
    ``eps_s``; ``expm1`` keeps the low-noise end accurate.
    """
    n = _check_int("n", n, minimum=1)
    beta_d = _check_float("beta_d", beta_d, ge=0.0)
    beta_min = _check_float("beta_min", beta_min, ge=0.0)
    if beta_d + beta_min <= 0.0:
        raise ValueError("`beta_d` and `beta_min` must not both be 0 (every sigma would be 0)")
    eps_s = _check_float("eps_s", eps_s, gt=0.0, le=1.0)
    t = np.linspace(1.0, eps_s, n)
    return _schedule_tensor(np.sqrt(np.expm1(beta_d * t**2 / 2.0 + beta_min * t)), device)


# --------------------------------------------------------------------------------------
# k-diffusion helpers with the same names
# --------------------------------------------------------------------------------------


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow slope ``dx/dsigma = (x - D) / sigma`` (Karras et al. 2022, Alg. 1 line 4)."""
    if isinstance(sigma, torch.Tensor):
        sigma = sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from, sigma_to, eta=1.0) -> tuple:
    """``(sigma_down, sigma_up)`` of an ancestral step from ``sigma_from`` to ``sigma_to`` (host floats).

    The step goes deterministically down to ``sigma_down`` and adds fresh noise of std
    ``sigma_up`` so that ``sigma_down^2 + sigma_up^2 = sigma_to^2``. ``eta = 1`` is DDPM's
    ancestral variance (Ho et al. 2020, ``sigma_up^2 = sigma_to^2 (sigma_from^2 - sigma_to^2) /
    sigma_from^2``), ``eta = 0`` the deterministic step; ``sigma_up`` is capped at ``sigma_to``.
    Tensor arguments are read with ``float()``.
    """
    sigma_from, sigma_to, eta = float(sigma_from), float(sigma_to), float(eta)
    if not eta:
        return sigma_to, 0.0
    if not sigma_from > 0.0:
        raise ValueError(f"sigma_from must be positive for an ancestral step, got {sigma_from}")
    q = sigma_to / sigma_from
    sigma_up = min(sigma_to, eta * sigma_to * math.sqrt(max(1.0 - q * q, 0.0)))
    if sigma_up == sigma_to:
        return 0.0, sigma_up
    # sigma_down^2 = sigma_to^2 (1 - eta^2 + eta^2 q^2): no cancellation for eta <= 1.
    return sigma_to * math.sqrt(max((1.0 - eta * eta) + (eta * q) ** 2, 0.0)), sigma_up


def default_noise_sampler(x: torch.Tensor) -> Callable:
    """Independent standard normal noise shaped like ``x`` for every ``(sigma, sigma_next)``."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def _as_host_float(value):
    """A tensor scalar as a Python float (one transfer); anything else as given, for the checks."""
    return float(value.detach().double().cpu()) if isinstance(value, torch.Tensor) else value


class BrownianTreeNoiseSampler:
    """Noise from one Brownian motion path ``W(sigma)``: ``(W(sigma_next) - W(sigma)) / sqrt(|dsigma|)``.

    Increments over adjacent intervals are independent and the path is fixed by ``seed``,
    so the noise is consistent when the schedule is refined (what the SDE samplers need to
    converge as steps are added). Built on ``torchsde.BrownianTree`` over
    ``[transform(sigma_min), transform(sigma_max)]``; ``seed`` may be a list with one seed per
    batch item, and ``None`` draws one from the global generator as k-diffusion does, so the
    same ``torch.manual_seed`` gives the same noise in both.
    """

    def __init__(self, x: torch.Tensor, sigma_min, sigma_max, seed=None, transform=lambda s: s):
        try:
            import torchsde
        except ImportError as exc:  # optional: only the SDE samplers' default noise needs it
            raise ImportError("BrownianTreeNoiseSampler needs torchsde (pip install torchsde); "
                              "or pass noise_sampler= to the sampler") from exc
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        self.transform = transform
        t0 = float(_as_host_float(transform(torch.as_tensor(sigma_min))))
        t1 = float(_as_host_float(transform(torch.as_tensor(sigma_max))))
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise ValueError(f"sigma_min and sigma_max must map to distinct finite times, got {t0} and {t1}")
        self._sign = 1.0 if t0 < t1 else -1.0
        if seed is None:
            seed = torch.randint(0, 2**63 - 1, []).item()
        self._batched = isinstance(seed, Sequence)
        seeds = list(seed) if self._batched else [seed]
        if self._batched and len(seeds) != x.shape[0]:
            raise ValueError(f"seed must have one entry per batch item ({x.shape[0]}), got {len(seeds)}")
        w0 = torch.zeros_like(x[0] if self._batched else x)
        lo, hi = min(t0, t1), max(t0, t1)
        self._trees = [torchsde.BrownianTree(lo, w0, hi, entropy=s) for s in seeds]

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0 = float(_as_host_float(self.transform(torch.as_tensor(sigma))))
        t1 = float(_as_host_float(self.transform(torch.as_tensor(sigma_next))))
        sign = self._sign * (1.0 if t0 < t1 else -1.0)
        lo, hi = min(t0, t1), max(t0, t1)
        w = torch.stack([tree(lo, hi) for tree in self._trees])
        w = w if self._batched else w[0]
        # A zero-length interval (a repeated sigma) has no increment; its noise weight is 0 anyway.
        return w * (sign / math.sqrt(hi - lo)) if hi > lo else w


# --------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------


def _check_bound(name: str, value) -> float:
    """A real threshold that may be infinite (``s_tmin`` / ``s_tmax``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    if math.isnan(value):
        raise ValueError(f"`{name}` must not be NaN")
    return float(value)


def _check_sample(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SAMPLE_DTYPES:
        raise TypeError(f"x must have dtype float32, float16 or bfloat16 (the fused step's working dtypes), "
                        f"got {x.dtype}")
    if x.ndim < 1:
        raise ValueError("x must have a leading batch dimension, got a 0-d tensor")


def _check_callable(name: str, value, optional: bool = True) -> None:
    if (value is not None or not optional) and not callable(value):
        raise TypeError(f"{name} must be callable{' or None' if optional else ''}, got {type(value).__name__}")


def _host_sigmas(sigmas, order: Optional[str] = None) -> list:
    """``sigmas`` as float64 host values: the one device-to-host transfer of a sampler call.

    Every entry but the last must be positive (the samplers divide by it); ``order`` is
    ``"nonincreasing"`` (ancestral noise needs ``sigma_next <= sigma``) or ``"decreasing"``
    (multistep ratios of log-sigma steps need nonzero steps).
    """
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if not sigmas.dtype.is_floating_point:
        raise TypeError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")
    if sigmas.numel() == 0:
        raise ValueError("sigmas must have at least one entry")
    values = sigmas.detach().to(device="cpu", dtype=torch.float64).tolist()
    if not all(math.isfinite(s) for s in values):
        raise ValueError("sigmas must be finite")
    if any(s <= 0.0 for s in values[:-1]) or values[-1] < 0.0:
        raise ValueError(f"sigmas must be positive (the last may be 0), got {values}")
    if order is not None:
        steps = [b - a for a, b in zip(values, values[1:])]
        if any(d >= 0.0 for d in steps) if order == "decreasing" else any(d > 0.0 for d in steps):
            kind = "strictly decreasing" if order == "decreasing" else "non-increasing"
            raise ValueError(f"sigmas must be {kind} for this sampler, got {values}")
    return values


# --------------------------------------------------------------------------------------
# programs
# --------------------------------------------------------------------------------------


def _eps(coeff: float, sigma: float) -> Terms:
    """``coeff * eps`` with ``eps = (u - D) / sigma`` in a stage's sample ``u`` and model output ``D``."""
    return {"x": coeff / sigma, "out": -coeff / sigma}


def _x_plus_eps(coeff: float, sigma: float, noise: float = 0.0) -> Terms:
    """``x + coeff * eps + noise * z`` at stage 0; ``coeff = sigma_to - sigma`` is an Euler step."""
    return {"x": 1.0 + coeff / sigma, "out": -coeff / sigma, "noise": noise}


def _compile_stages(num_slots: int, outputs: Sequence[Sequence[Terms]],
                    kept: Sequence[Sequence[Terms]] = ()) -> list:
    """One :class:`StepProgram` per stage of a step that visits ``u_0 = x, u_1, ...``.

    ``outputs[k]`` is the quantity stage ``k`` produces (``u_{k+1}``; the last one is the next
    sample) as one term dict per stage ``0..k``: at stage ``j`` ``"x"`` is that stage's sample
    ``u_j``, ``"out"`` the model output there, ``"noise"`` that stage's noise. Quantities that
    span several stages, and the ``kept`` ones (left in slots for the caller, such as the
    embedded lower-order solution of an adaptive step), accumulate in a history slot each.
    """
    carried = list(outputs[1:]) + list(kept)
    slots = {id(q): s for s, q in enumerate(carried)}
    if len(carried) > num_slots:
        raise ValueError(f"step needs {len(carried)} history slots, the run has {num_slots}")
    programs = []
    for k, produced in enumerate(outputs):
        rows = []
        for q in carried:
            if q is produced or len(q) <= k or (k > 0 and not any(q[k].values())):
                continue
            rows.append((slots[id(q)], {**q[k], slots[id(q)]: 1.0} if k else q[k]))
        rows.append((OUTPUT, {**produced[k], slots[id(produced)]: 1.0} if k else produced[k]))
        programs.append(StepProgram.build(num_slots, rows))
    return programs


def _ring_program(num_slots: int, i: int, newest: Terms, update: Terms, past: Sequence[float],
                  store: bool) -> StepProgram:
    """Multistep update at step ``i`` with a ring of ``num_slots`` past quantities.

    ``newest`` (in ``x``/``out``) is this step's quantity, written to slot ``i % num_slots`` when
    ``store``; ``update`` holds the next sample's ``x``/``out``/``noise`` terms with the newest
    quantity already entered through its definition (so its ``x`` coefficient combines in
    float64), and ``past[j - 1]`` weighs the quantity of step ``i - j``.
    """
    terms = dict(update)
    for j, coeff in enumerate(past, start=1):
        if coeff:
            terms[(i - j) % num_slots] = coeff
    rows = [(i % num_slots, newest)] if store else []
    return StepProgram.build(num_slots, rows + [(OUTPUT, terms)])


class _Step(NamedTuple):
    """One sampler step: model evaluations at ``sigmas``, one program (and noise draw) per stage."""

    sigmas: Sequence[float]
    programs: Sequence[StepProgram]
    draws: Sequence[Optional[Callable[[], torch.Tensor]]]
    gamma: float = 0.0  # churn of the step (reported as sigma_hat = sigma * (1 + gamma))


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress(total: Optional[int], disable):
    """A tqdm bar when tqdm is installed (k-diffusion's progress display), else nothing."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency: no bar
        yield None
        return
    with tqdm(total=total, disable=disable) as bar:
        yield bar


class _Run:
    """One sampler call: the model and its extra args, the history ring, the hooks.

    ``sigmas`` (when the sampler takes a grid) is checked and moved to the host here, the
    one transfer of the call; ``noise_sampler`` is checked here and drawn from by the steps.
    """

    def __init__(self, model, x, extra_args, callback, num_slots: int, noise_sampler=None, sigmas=None,
                 order: Optional[str] = None, plan=None, shifts: bool = False):
        _check_callable("model", model, optional=False)
        _check_sample(x)
        if extra_args is not None and not isinstance(extra_args, Mapping):
            raise TypeError(f"extra_args must be a mapping or None, got {type(extra_args).__name__}")
        _check_callable("callback", callback)
        _check_callable("noise_sampler", noise_sampler)
        self.plan = plan = None if plan is None else as_plan(plan)
        if plan is not None:
            sigmas = _plan_sigmas(plan, sigmas, x.device)
            if plan.shifted_sigmas is not None and not shifts:
                raise ValueError("plan has shifted_sigmas, which only sample_euler, sample_heun, sample_dpm_2, "
                                 "sample_lms and the DPM++ multistep samplers apply")
        self.model, self.x, self.callback, self.sigmas = model, x, callback, sigmas
        self.extra_args = {} if extra_args is None else extra_args
        self.host = _host_sigmas(sigmas, order) if sigmas is not None else None
        # D-ODE scales (stepfuse.solvers.plan): two more slots hold the running mean of D.
        self.solver_slots = num_slots
        self.extrapolates = plan is not None and plan.scales is not None
        self.scale_fit: Optional[Callable] = SCALE_FIT.get() if self.extrapolates else None
        self.num_evaluations = 0
        if self.extrapolates:
            num_slots += 2
        # float32 ring whatever the sample dtype: stored predictions keep fp32 accuracy.
        self.history = x.new_empty((num_slots, *x.shape), dtype=torch.float32)
        self.s_in = x.new_ones([x.shape[0]])
        self.evaluations = None  # a progress bar counting model evaluations (DPM-Solver-fast/adaptive)

    def start_sigmas(self) -> list:
        """Where each grid step starts: the plan's shifted sigmas, else the grid's own."""
        shifted = self.plan.shifted_sigmas if self.plan is not None else None
        return list(shifted) if shifted is not None else self.host[:-1]

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        # sigma * ones in x's dtype: the values k-diffusion's `sigmas[i] * s_in` gives the model.
        denoised = self.model(x, self.s_in * sigma, **self.extra_args)
        if self.evaluations is not None:
            self.evaluations.update()
        return self._like_x("model output", denoised)

    def _like_x(self, name: str, t) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != self.x.shape:
            raise ValueError(f"{name} must have the shape of x {tuple(self.x.shape)}, got {tuple(t.shape)}")
        return t if t.dtype == self.x.dtype else t.to(self.x.dtype)

    def step(self, program: StepProgram, x: torch.Tensor, denoised: torch.Tensor, draw=None,
             evaluated: bool = True) -> torch.Tensor:
        """Run ``program`` on ``x`` and the model output ``denoised``.

        ``evaluated=False`` marks a program that follows no model call (``denoised`` is a
        placeholder); it must be built for the whole ring (:attr:`num_slots`).
        """
        noise = self._like_x("noise", draw()) if draw is not None else None
        noise = noise if program.uses_noise else None
        if self.extrapolates and evaluated:
            k = self.num_evaluations
            self.num_evaluations += 1
            if self.scale_fit is not None and k:
                def trial(scale: float) -> torch.Tensor:
                    trial_program = extrapolate_denoised(program, scale, k, self.solver_slots)
                    return solver_step(x, denoised, self.history.clone(), trial_program, noise)
                scale = self.scale_fit(k, trial)
            else:
                scale = self.plan.scales[k]
            program = extrapolate_denoised(program, scale, k, self.solver_slots)
        return solver_step(x, denoised, self.history, program, noise)

    @property
    def num_slots(self) -> int:
        """History slots of the run: the solver's, plus the D-ODE mean slots of a plan with scales."""
        return self.history.shape[0]

    def advance(self, step: _Step, x: torch.Tensor, report: Optional[Callable] = None) -> tuple:
        """Run one step from ``x``: returns the next sample and the first model output ``D_0``.

        ``report(D_0)`` builds the callback's dict right after the first model evaluation,
        where k-diffusion calls it.
        """
        denoised = first = self.denoise(x, step.sigmas[0])
        if report is not None and self.callback is not None:
            self.callback(report(first))
        for k, program in enumerate(step.programs):
            x_next = self.step(program, x, denoised, step.draws[k])
            if k + 1 < len(step.programs):
                denoised = self.denoise(x_next, step.sigmas[k + 1])
            x = x_next
        return x, first

    def run_grid(self, steps: Sequence[_Step], disable, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The k-diffusion loop over the sigma grid, from ``x`` (default: the initial sample)."""
        if self.plan is not None:
            self.plan.check_scales(sum(len(step.programs) for step in steps), "this sampler")
        x = self.x if x is None else x
        sigmas = self.sigmas
        with _progress(len(steps), disable) as bar:
            for i, step in enumerate(steps):
                hat = (lambda: sigmas[i] * (step.gamma + 1.0)) if step.gamma else (lambda: sigmas[i])
                x, _ = self.advance(step, x, lambda d: {"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": hat(),
                                                        "denoised": d})
                if bar is not None:
                    bar.update()
        return x


def _plan_sigmas(plan: SamplingPlan, sigmas, device) -> torch.Tensor:
    """The grid of a run with ``plan``: the plan's sigmas; ``sigmas``, when given, must be the same."""
    planned = torch.tensor(plan.sigmas, dtype=torch.float64)
    if sigmas is None:
        return planned.to(device=device, dtype=torch.float32)
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor or None, got {type(sigmas).__name__}")
    given = sigmas.detach().to("cpu", torch.float64)
    if given.shape != planned.shape or not torch.allclose(given, planned, rtol=1e-6, atol=0.0):
        raise ValueError(f"sigmas do not fit the plan's {plan.num_steps} steps; pass sigmas=None to use the plan's")
    return sigmas


def _noise_draws(noise_sampler, x: torch.Tensor, stochastic: bool) -> Optional[Callable]:
    """``draws(a, b)``: the zero-argument noise callable of a stage, or None when no draws are due.

    A caller's ``noise_sampler`` is always called as k-diffusion calls it; the default one only
    when its noise is used (``stochastic``).
    """
    if noise_sampler is None:
        if not stochastic:
            return None
        noise_sampler = default_noise_sampler(x)
    return lambda a, b: (lambda: noise_sampler(a, b))


def _takes_floats(noise_sampler) -> bool:
    """Our Brownian sampler takes host floats (no sync per call); others get k-diffusion's tensors."""
    return isinstance(noise_sampler, BrownianTreeNoiseSampler)


def _grid_noise_args(noise_sampler, run: "_Run", i: int) -> tuple:
    if _takes_floats(noise_sampler):
        return run.host[i], run.host[i + 1]
    return run.sigmas[i], run.sigmas[i + 1]


def _brownian_default(noise_sampler, run: _Run, stochastic: bool):
    """k-diffusion's default for the SDE samplers: a Brownian tree over the schedule's range."""
    if noise_sampler is not None or not stochastic or len(run.host) < 2:
        return noise_sampler
    return BrownianTreeNoiseSampler(run.x, min(s for s in run.host if s > 0.0), max(run.host))


# --------------------------------------------------------------------------------------
# Karras et al. 2022 samplers with churn: Euler, Heun, DPM-Solver-2
# --------------------------------------------------------------------------------------


def _karras_sampler(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                    second_stage, plan=None) -> torch.Tensor:
    """Shared loop of sample_euler/heun/dpm_2 (Karras et al. 2022, Alg. 2).

    ``second_stage(sigma_hat, sigma_next)`` gives ``(sigma_1, a, keep, b)`` for a second model
    evaluation at ``u_1 = x + a eps_0`` (noise level ``sigma_1``) and the update
    ``x + keep eps_0 + b eps_1``, or None for an Euler step. Churn (lines 4-6): gamma and
    ``sigma_hat = (1 + gamma) sigma`` per step; k-diffusion draws step ``i + 1``'s churn noise
    before that step's model call, and drawing it at the end of step ``i`` keeps that order
    and lets the step's last program add it. A plan's ``shifted_sigmas`` are a noise-free
    ``sigma_hat`` (the sample is taken to be at that level, Li et al. 2024).
    """
    s_churn = _check_float("s_churn", s_churn, ge=0.0)
    s_tmin, s_tmax = _check_bound("s_tmin", s_tmin), _check_bound("s_tmax", s_tmax)
    s_noise = _check_float("s_noise", s_noise)
    run = _Run(model, x, extra_args, callback, 1, sigmas=sigmas, plan=plan, shifts=True)
    host, n = run.host, len(run.host) - 1
    starts = run.start_sigmas()
    if s_churn > 0.0 and starts != host[:-1]:
        raise ValueError("s_churn must be 0 with a plan that has shifted_sigmas")
    gammas = [churn_gamma(s_churn, n, s_tmin <= host[i] <= s_tmax) for i in range(n)]
    # sqrt(sigma_hat^2 - sigma^2) = sigma sqrt(gamma (gamma + 2)), free of cancellation.
    stds = [s_noise * host[i] * math.sqrt(g * (g + 2.0)) for i, g in enumerate(gammas)] + [0.0]
    draw = (lambda: torch.randn_like(x)) if s_churn > 0.0 else None
    steps = []
    for i, gamma in enumerate(gammas):
        sigma_hat, sigma_next = starts[i] * (1.0 + gamma), host[i + 1]
        next_draw = draw if i + 1 < n else None
        stage = second_stage(sigma_hat, sigma_next) if sigma_next > 0.0 else None
        if stage is None:
            outputs = [[_x_plus_eps(sigma_next - sigma_hat, sigma_hat, stds[i + 1])]]
            steps.append(_Step([sigma_hat], _compile_stages(1, outputs), [next_draw], gamma))
            continue
        sigma_1, a, keep, b = stage
        outputs = [[_x_plus_eps(a, sigma_hat)], [_x_plus_eps(keep, sigma_hat), {**_eps(b, sigma_1),
                                                                                 "noise": stds[i + 1]}]]
        steps.append(_Step([sigma_hat, sigma_1], _compile_stages(1, outputs), [None, next_draw], gamma))
    x_start = x
    if draw is not None and n:  # step 0's churn noise, drawn before its model call
        if stds[0]:
            churn = StepProgram.build(run.num_slots, [(OUTPUT, {"x": 1.0, "noise": stds[0]})])
            x_start = run.step(churn, x, x, draw, evaluated=False)
        else:
            draw()  # gamma_0 = 0 (sigma_0 outside [s_tmin, s_tmax]): unused, but k-diffusion draws it
    return run.run_grid(steps, disable, x_start)


def _heun_stage(sigma_hat: float, sigma_next: float) -> tuple:
    # Karras et al. 2022, Alg. 1 lines 5-8: x + dt/2 (d_0 + d_1), the Euler point u_1 = x + dt d_0.
    dt = sigma_next - sigma_hat
    return sigma_next, dt, 0.5 * dt, 0.5 * dt


def _dpm_2_stage(sigma_hat: float, sigma_next: float) -> tuple:
    # DPM-Solver-2 (Lu et al. 2022a, Alg. 1 with r = 1/2) in VE form: the slope at the
    # log-midpoint sigma_mid = sqrt(sigma_hat sigma_next) carries x over the whole step.
    sigma_mid = math.sqrt(sigma_hat * sigma_next)
    return sigma_mid, sigma_mid - sigma_hat, 0.0, sigma_next - sigma_hat


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, *, plan=None):
    """Euler steps with optional churn (Karras et al. 2022, Alg. 2 with Euler steps)."""
    return _karras_sampler(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                           lambda sigma_hat, sigma_next: None, plan)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, *, plan=None):
    """Heun's method with optional churn (Karras et al. 2022, Alg. 2); an Euler step into sigma = 0."""
    return _karras_sampler(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                           _heun_stage, plan)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, *, plan=None):
    """DPM-Solver-2 steps in Karras et al.'s Alg. 2 loop (optional churn); an Euler step into sigma = 0."""
    return _karras_sampler(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise,
                           _dpm_2_stage, plan)


# --------------------------------------------------------------------------------------
# ancestral samplers
# --------------------------------------------------------------------------------------


def _ancestral_run(model, x, sigmas, extra_args, callback, eta, s_noise, noise_sampler,
                   brownian_default: bool = False, plan=None) -> tuple:
    """Checks shared by the ancestral samplers: ``(run, eta, s_noise, noise_sampler, draws)``."""
    eta = _check_float("eta", eta, ge=0.0)
    s_noise = _check_float("s_noise", s_noise)
    # Ancestral noise needs sigma_next <= sigma (sigma_up^2 >= 0).
    run = _Run(model, x, extra_args, callback, 1, noise_sampler, sigmas, "nonincreasing" if eta else None, plan)
    if brownian_default:
        noise_sampler = _brownian_default(noise_sampler, run, eta > 0.0)
    return run, eta, s_noise, noise_sampler, _noise_draws(noise_sampler, x, eta > 0.0)


def _ancestral_sampler(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                       stage, noise_after_euler: bool, plan=None) -> torch.Tensor:
    """Shared loop of the ancestral samplers: down to ``sigma_down``, then noise of std ``sigma_up``.

    ``stage(sigma, sigma_down)`` gives ``(sigma_1, u_1 terms, kept terms, update terms)`` of a
    two-evaluation step, or None for an Euler step to ``sigma_down``; k-diffusion takes the
    Euler step whenever ``sigma_down = 0``, and adds the noise after it in Euler-ancestral and
    DPM++(2S) (``noise_after_euler``) but not in DPM-2 ancestral.
    """
    run, eta, s_noise, noise_sampler, draws = _ancestral_run(model, x, sigmas, extra_args, callback, eta, s_noise,
                                                              noise_sampler, plan=plan)
    host, steps = run.host, []
    for i in range(len(host) - 1):
        sigma, sigma_next = host[i], host[i + 1]
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        second = stage(sigma, sigma_down) if sigma_down > 0.0 else None
        noisy = sigma_next > 0.0 and (second is not None or noise_after_euler)
        draw = draws(*_grid_noise_args(noise_sampler, run, i)) if noisy and draws is not None else None
        noise = s_noise * sigma_up if noisy else 0.0
        if second is None:
            outputs = [[_x_plus_eps(sigma_down - sigma, sigma, noise)]]
            steps.append(_Step([sigma], _compile_stages(1, outputs), [draw]))
            continue
        sigma_1, u_1, kept, update = second
        outputs = [[u_1], [kept, {**update, "noise": noise}]]
        steps.append(_Step([sigma, sigma_1], _compile_stages(1, outputs), [None, draw]))
    return run.run_grid(steps, disable)


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, *, plan=None):
    """Ancestral sampling with Euler steps (DDPM's ancestral noise, Ho et al. 2020, on VE sigmas)."""
    return _ancestral_sampler(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                              lambda sigma, sigma_down: None, noise_after_euler=True, plan=plan)


def _dpm_2_ancestral_stage(sigma: float, sigma_down: float) -> tuple:
    sigma_mid, a, keep, b = _dpm_2_stage(sigma, sigma_down)
    return sigma_mid, _x_plus_eps(a, sigma), _x_plus_eps(keep, sigma), _eps(b, sigma_mid)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None, *, plan=None):
    """Ancestral sampling with DPM-Solver-2 steps down to ``sigma_down``."""
    return _ancestral_sampler(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                              _dpm_2_ancestral_stage, noise_after_euler=False, plan=plan)


def _dpmpp_2s_stage(sigma: float, sigma_down: float) -> tuple:
    # DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2) in VE form, lambda = -log sigma:
    # u_1 = (s/sigma) x - expm1(-h/2) D_0 at s = sqrt(sigma sigma_down), an Euler step to s;
    # x_next = (sigma_down/sigma) x - expm1(-h) D_1.
    sigma_s = math.sqrt(sigma * sigma_down)
    ratio = sigma_down / sigma
    return sigma_s, _x_plus_eps(sigma_s - sigma, sigma), {"x": ratio}, {"out": 1.0 - ratio}


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                              s_noise=1.0, noise_sampler=None, *, plan=None):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps."""
    return _ancestral_sampler(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                              _dpmpp_2s_stage, noise_after_euler=True, plan=plan)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2, *, plan=None):
    """Stochastic DPM-Solver++ (k-diffusion's "DPM++ SDE"): two ancestral data-prediction stages.

    With ``lambda = -log sigma``: an ancestral first-order step from ``sigma`` towards
    ``s = sigma^(1-r) sigma_next^r`` (down to its ``sigma_down``, plus noise), then from
    ``sigma`` towards ``sigma_next`` with the data prediction ``(1 - 1/(2r)) D_0 + 1/(2r) D_1``
    (the DPM-Solver++ 2S combination, Lu et al. 2022b, Alg. 1), plus noise. The default noise
    is a Brownian tree over the schedule, as in k-diffusion.
    """
    r = _check_float("r", r, gt=0.0)
    run, eta, s_noise, noise_sampler, draws = _ancestral_run(model, x, sigmas, extra_args, callback, eta, s_noise,
                                                              noise_sampler, brownian_default=True, plan=plan)
    fac = 1.0 / (2.0 * r)
    host_args = _takes_floats(noise_sampler)
    if draws is not None:
        # k-diffusion's noise arguments exp(-lambda) at the grid and stage points, rounded as it
        # rounds them, computed once: on the device for a caller's sampler, on the host (from
        # the host copy) for our Brownian tree, which takes floats.
        lam = (torch.tensor(run.host, dtype=sigmas.dtype) if host_args else sigmas).log().neg()
        at_lam, at_s = lam.neg().exp(), (lam[:-1] + (lam[1:] - lam[:-1]) * r).neg().exp()
        if host_args:
            at_lam, at_s = at_lam.tolist(), at_s.tolist()
    host, steps = run.host, []
    for i in range(len(host) - 1):
        sigma, sigma_next = host[i], host[i + 1]
        if sigma_next == 0.0:
            steps.append(_Step([sigma], _compile_stages(1, [[{"out": 1.0}]]), [None]))  # Euler into 0: D_0
            continue
        sigma_s = sigma ** (1.0 - r) * sigma_next**r
        down_1, up_1 = get_ancestral_step(sigma, sigma_s, eta)
        down_2, up_2 = get_ancestral_step(sigma, sigma_next, eta)
        ratio_1, ratio_2 = down_1 / sigma, down_2 / sigma
        outputs = [[{"x": ratio_1, "out": 1.0 - ratio_1, "noise": s_noise * up_1}],
                   [{"x": ratio_2, "out": (1.0 - ratio_2) * (1.0 - fac)},
                    {"out": (1.0 - ratio_2) * fac, "noise": s_noise * up_2}]]
        stage_draws = [None, None]
        if draws is not None:
            stage_draws = [draws(at_lam[i], at_s[i]), draws(at_lam[i], at_lam[i + 1])]
        steps.append(_Step([sigma, sigma_s], _compile_stages(1, outputs), stage_draws))
    return run.run_grid(steps, disable)


# --------------------------------------------------------------------------------------
# multistep samplers: DPM-Solver++(2M), 2M SDE, 3M SDE, LMS
# --------------------------------------------------------------------------------------


def _dpmpp_multistep_coefficients(sigma: float, sigma_next: float, hs: Sequence[float], eta: float,
                                  solver_type: str) -> tuple:
    """``(a, b, noise_std)``: ``x_next = a x + sum_j b[j] D_{i-j} + noise_std z``.

    Data-prediction DPM-Solver++ (Lu et al. 2022b, eqs. 8-9 and Alg. 2) in VE form with
    ``lambda = -log sigma``; ``eta`` moves it towards the SDE form (DPM-Solver++ SDE, sec. 5 of
    the same paper, with ``h_eta = (1 + eta) h``). ``hs = (h, h_1, h_2)`` are this and the
    previous log-sigma steps; their count sets the order. Order 2 weights the divided
    difference by ``phi_1 / 2`` (midpoint) or ``phi_2`` (heun); order 3 adds the second
    divided difference with ``phi_3``.
    """
    if sigma_next == 0.0:
        return 0.0, (1.0,), 0.0  # lambda = inf: the update is the data prediction itself
    h = hs[0]
    h_eta = h * (1.0 + eta)
    a = (sigma_next / sigma) * math.exp(-eta * h)
    phi_1 = -math.expm1(-h_eta)
    phi_2 = 1.0 - phi_1 / h_eta
    noise = sigma_next * math.sqrt(-math.expm1(-2.0 * eta * h)) if eta else 0.0
    if len(hs) == 1:
        return a, (phi_1,), noise
    r0 = hs[1] / h
    first_diff = (1.0 / r0, -1.0 / r0, 0.0)  # (D_i - D_{i-1}) / r0
    if len(hs) == 2:
        w = 0.5 * phi_1 if solver_type == "midpoint" else phi_2
        return a, (phi_1 + w * first_diff[0], w * first_diff[1]), noise
    r1 = hs[2] / h
    phi_3 = phi_2 / h_eta - 0.5
    older_diff = (0.0, 1.0 / r1, -1.0 / r1)  # (D_{i-1} - D_{i-2}) / r1
    b = []
    for j in range(3):
        second = (first_diff[j] - older_diff[j]) / (r0 + r1)
        b.append((phi_1 if j == 0 else 0.0) + phi_2 * (first_diff[j] + r0 * second) - phi_3 * second)
    return a, tuple(b), noise


def _dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                     solver_type, max_order, first_order_last, plan=None) -> torch.Tensor:
    """Shared loop of the DPM-Solver++ multistep samplers; ring slot ``i % max_order`` holds ``D_i``.

    Step ``i`` runs from where its model call is made (the grid sigma, or a plan's shifted
    one) to the next grid sigma; the divided differences use the log-sigma distances between
    the points where the stored ``D`` were evaluated.
    """
    eta = _check_float("eta", eta, ge=0.0)
    s_noise = _check_float("s_noise", s_noise)
    _check_choice("solver_type", solver_type, SOLVER_TYPES)
    run = _Run(model, x, extra_args, callback, max_order, noise_sampler, sigmas, "decreasing", plan, shifts=True)
    noise_sampler = _brownian_default(noise_sampler, run, eta > 0.0)
    draws = _noise_draws(noise_sampler, x, eta > 0.0) if eta else None  # k-diffusion draws only if eta
    host, n = run.host, len(run.host) - 1
    starts = run.start_sigmas()
    steps = []
    for i in range(n):
        sigma, sigma_next = starts[i], host[i + 1]
        order = 1 if first_order_last and sigma_next == 0.0 else min(i + 1, max_order)
        h = math.log(sigma / sigma_next) if sigma_next > 0.0 else math.inf
        hs = [h] + [math.log(starts[i - j] / starts[i - j + 1]) for j in range(1, order)]
        a, b, std = _dpmpp_multistep_coefficients(sigma, sigma_next, hs, eta, solver_type)
        update = {"x": a, "out": b[0], "noise": s_noise * std}
        program = _ring_program(max_order, i, {"out": 1.0}, update, b[1:], store=i + 1 < n)
        draw = draws(*_grid_noise_args(noise_sampler, run, i)) if draws is not None and std else None
        steps.append(_Step([sigma], [program], [draw]))
    return run.run_grid(steps, disable)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *, plan=None):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2); first order on the first and last steps."""
    return _dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, 0.0, 1.0, None, "midpoint", 2,
                            first_order_last=True, plan=plan)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint", *, plan=None):
    """DPM-Solver++(2M) SDE; ``solver_type`` 'midpoint' or 'heun' weights the divided difference."""
    return _dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                            solver_type, 2, first_order_last=False, plan=plan)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, *, plan=None):
    """DPM-Solver++(3M) SDE: third-order multistep data prediction with ``eta``-scaled noise."""
    return _dpmpp_multistep(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler,
                            "heun", 3, first_order_last=False, plan=plan)


def _lagrange_integrals(nodes: Sequence[float], lo: float, hi: float) -> list:
    """``int_lo^hi l_j(tau) dtau`` for the Lagrange basis ``l_j`` on ``nodes`` (exact, float64)."""
    weights = []
    for j, node in enumerate(nodes):
        # Coefficients of l_j (lowest power first), built in plain floats: a handful of nodes,
        # where NumPy's polynomial objects would cost more than the sampler step itself.
        basis = [1.0]
        for k, other in enumerate(nodes):
            if k != j:
                scale = 1.0 / (node - other)
                shifted = [0.0] + basis
                basis = [(shifted[p] - other * (basis[p] if p < len(basis) else 0.0)) * scale
                         for p in range(len(shifted))]
        weights.append(sum(c / (p + 1) * (hi ** (p + 1) - lo ** (p + 1)) for p, c in enumerate(basis)))
    return weights


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, *, plan=None):
    """Linear multistep in sigma: integrate the polynomial through the last ``order`` slopes.

    Variable-step Adams-Bashforth on ``dx/dsigma = (x - D) / sigma``: the slope is
    interpolated through its values at the last ``order`` sigmas and integrated exactly over
    ``[sigma_i, sigma_{i+1}]``. Ring slot ``i % order`` holds the slope ``d_i``.
    """
    order = _check_int("order", order, minimum=1, maximum=MAX_SLOTS)
    run = _Run(model, x, extra_args, callback, order, sigmas=sigmas, order="decreasing", plan=plan, shifts=True)
    host, n = run.host, len(run.host) - 1
    starts = run.start_sigmas()  # where each slope is evaluated (the grid, or a plan's shifted sigmas)
    steps = []
    for i in range(n):
        sigma, cur = starts[i], min(i + 1, order)
        coeffs = _lagrange_integrals([starts[i - j] for j in range(cur)], sigma, host[i + 1])
        program = _ring_program(order, i, _eps(1.0, sigma), _x_plus_eps(coeffs[0], sigma), coeffs[1:],
                                store=i + 1 < n)
        steps.append(_Step([sigma], [program], [None]))
    return run.run_grid(steps, disable)


# --------------------------------------------------------------------------------------
# DPM-Solver (noise prediction, Lu et al. 2022a): fast and adaptive step sizes
# --------------------------------------------------------------------------------------


def _dpm_solver_stages(order: int, t: float, t_next: float, r1: float, r2: float = 2.0 / 3.0) -> tuple:
    """Stage sigmas and quantities of DPM-Solver-``order`` from ``t`` to ``t_next`` (``t = -log sigma``).

    Lu et al. 2022a, eq. 3.7 (DPM-Solver-1), Alg. 1 (DPM-Solver-2) and Alg. 2 (DPM-Solver-3) with
    ``alpha = 1`` and ``lambda = t``; ``eps_k = (u_k - D_k) / sigma_k``. Returns
    ``(sigmas, outputs)`` for :func:`_compile_stages`.
    """
    h = t_next - t
    sigma, sigma_next, em = math.exp(-t), math.exp(-t_next), math.expm1(h)
    if order == 1:
        return [sigma], [[_x_plus_eps(-sigma_next * em, sigma)]]
    sigma_1 = math.exp(-(t + r1 * h))
    u_1 = [_x_plus_eps(-sigma_1 * math.expm1(r1 * h), sigma)]
    if order == 2:
        c = sigma_next / (2.0 * r1) * em
        return [sigma, sigma_1], [u_1, [_x_plus_eps(c - sigma_next * em, sigma), _eps(-c, sigma_1)]]
    sigma_2, em2 = math.exp(-(t + r2 * h)), math.expm1(r2 * h)
    c_2 = sigma_2 * (r2 / r1) * (em2 / (r2 * h) - 1.0)
    c_3 = sigma_next / r2 * (em / h - 1.0)
    u_2 = [_x_plus_eps(c_2 - sigma_2 * em2, sigma), _eps(-c_2, sigma_1)]
    x_3 = [_x_plus_eps(c_3 - sigma_next * em, sigma), {}, _eps(-c_3, sigma_2)]
    return [sigma, sigma_1, sigma_2], [u_1, u_2, x_3]


def _dpm_setup(model, x, sigma_min, sigma_max, extra_args, callback, eta, s_noise, noise_sampler,
               num_slots) -> tuple:
    """Checks shared by DPM-Solver-fast/adaptive: ``(run, t_start, t_end, eta, s_noise, draws)``."""
    run = _Run(model, x, extra_args, callback, num_slots, noise_sampler)
    # Positive bounds as in k-diffusion; equal ones would make a zero-length run (0/0 in the steps).
    lo = _check_float("sigma_min", _as_host_float(sigma_min), gt=0.0)
    hi = _check_float("sigma_max", _as_host_float(sigma_max), gt=0.0)
    if lo == hi:
        raise ValueError(f"sigma_min and sigma_max must differ, got {lo}")
    eta = _check_float("eta", eta, ge=0.0)
    s_noise = _check_float("s_noise", s_noise)
    if eta and lo > hi:
        raise ValueError("eta must be 0 when sampling up from sigma_max to a larger sigma_min (reverse sampling)")
    return run, -math.log(hi), -math.log(lo), eta, s_noise, _noise_draws(noise_sampler, x, eta > 0.0)


def _dpm_info(x, i, t: float, denoised) -> dict:
    # k-diffusion reports CPU tensors in its default dtype for these.
    t = torch.tensor(t)
    return {"x": x, "i": i, "t": t, "t_up": t, "denoised": denoised, "sigma": t.neg().exp(),
            "sigma_hat": t.neg().exp()}


def _ancestral_times(t: float, t_next: float, t_end: float, eta: float) -> tuple:
    """``(t_target, sigma_up)``: deterministic target time and noise std of an ancestral DPM step."""
    if not eta:
        return t_next, 0.0
    sigma_down, _ = get_ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_target = min(t_end, -math.log(sigma_down) if sigma_down > 0.0 else math.inf)
    return t_target, math.sqrt(max(math.exp(-2.0 * t_next) - math.exp(-2.0 * t_target), 0.0))


def _dpm_noise_draw(draws, noise_sampler, t: float, t_next: float):
    if draws is None:
        return None
    if _takes_floats(noise_sampler):
        return draws(math.exp(-t), math.exp(-t_next))
    return draws(torch.tensor(t).neg().exp(), torch.tensor(t_next).neg().exp())


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast (Lu et al. 2022a, sec. 3.4): ``n`` model evaluations, uniform in ``-log sigma``.

    ``floor(n / 3) + 1`` steps of DPM-Solver-3, ending with orders 2, 1 or with order ``n % 3``.
    """
    run, t_start, t_end, eta, s_noise, draws = _dpm_setup(model, x, sigma_min, sigma_max, extra_args, callback,
                                                          eta, s_noise, noise_sampler, 2)
    n = _check_int("n", n, minimum=1)
    m = n // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    with _progress(n, disable) as bar:
        run.evaluations = bar
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            t_target, sigma_up = _ancestral_times(t, t_next, t_end, eta)
            stage_sigmas, outputs = _dpm_solver_stages(order, t, t_target, r1=1.0 / 3.0 if order == 3 else 0.5)
            outputs[-1][-1] = {**outputs[-1][-1], "noise": s_noise * sigma_up}
            stage_draws = [None] * (order - 1) + [_dpm_noise_draw(draws, noise_sampler, t, t_next)]
            step = _Step(stage_sigmas, _compile_stages(2, outputs), stage_draws)
            x, _ = run.advance(step, x, lambda d: _dpm_info(x, i, t, d))
    return x


class _PIDStepSizeController:
    """PID step-size control on the inverse error (Söderlind 2003, "Digital filters in adaptive
    time-stepping"), with the smooth limiter ``1 + atan(f - 1)`` (Söderlind & Wang 2006)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float, eps: float = 1e-8):
        self.h = h
        self.exponents = ((pcoeff + icoeff + dcoeff) / order, -(pcoeff + 2.0 * dcoeff) / order, dcoeff / order)
        self.accept_safety, self.eps = accept_safety, eps
        self.inverse_errors: list = []  # this step's, then the last two accepted steps'

    def propose_step(self, error: float) -> bool:
        inverse = 1.0 / (error + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse] * 3
        self.inverse_errors[0] = inverse
        factor = math.prod(e**k for e, k in zip(self.inverse_errors, self.exponents))
        factor = 1.0 + math.atan(factor - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors[1:] = self.inverse_errors[:2]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, eta=0.0, s_noise=1.0, noise_sampler=None, return_info=False):
    """DPM-Solver-12 / -23 with adaptive step size (Lu et al. 2022a, sec. 4.1 and Alg. 4 there).

    Each step runs DPM-Solver-``order`` and the embedded lower-order solution on the same model
    evaluations (one fused program per stage; the lower-order result stays in history slot
    ``order - 1``), then accepts or rejects by the scaled error norm under PID control. That
    decision needs the error on the host: one sync per step, inherent to adaptive stepping.
    """
    run, t_start, t_end, eta, s_noise, draws = _dpm_setup(model, x, sigma_min, sigma_max, extra_args, callback,
                                                          eta, s_noise, noise_sampler, 3)
    order = _check_int("order", order, minimum=2, maximum=3)
    rtol = _check_float("rtol", rtol, ge=0.0)
    atol = _check_float("atol", atol, ge=0.0)
    if rtol == 0.0 and atol == 0.0:
        raise ValueError("rtol and atol must not both be 0")
    h_init = _check_float("h_init", h_init)
    if h_init == 0.0:
        raise ValueError("h_init must be nonzero")
    pid_coeffs = [_check_float(k, v) for k, v in (("pcoeff", pcoeff), ("icoeff", icoeff), ("dcoeff", dcoeff))]
    accept_safety = _check_float("accept_safety", accept_safety)
    forward = t_end > t_start
    pid = _PIDStepSizeController(abs(h_init) * (1.0 if forward else -1.0), *pid_coeffs, 1.5 if eta else order,
                                 accept_safety)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    s, x_prev = t_start, x
    with _progress(None, disable) as bar:
        run.evaluations = bar
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            t = min(t_end, s + pid.h) if forward else max(t_end, s + pid.h)
            t_target, sigma_up = _ancestral_times(s, t, t_end, eta)
            # DPM-Solver-2 (r1 = 1/2) over DPM-Solver-1, or DPM-Solver-3 over DPM-Solver-2 (r1 = 1/3).
            r1 = 0.5 if order == 2 else 1.0 / 3.0
            stage_sigmas, outputs = _dpm_solver_stages(order, s, t_target, r1)
            low = _dpm_solver_stages(order - 1, s, t_target, r1)[1][-1]
            step = _Step(stage_sigmas, _compile_stages(3, outputs, kept=[low]), [None] * order)
            x_high, denoised = run.advance(step, x)
            x_low = run.history[order - 1].to(x.dtype, copy=True)
            delta = torch.clamp_min(rtol * torch.maximum(x_low.abs(), x_prev.abs()), atol)
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(float(error)):
                x_prev = x_low
                draw = _dpm_noise_draw(draws, noise_sampler, s, t)
                if draw is not None and sigma_up:
                    program = StepProgram.build(3, [(OUTPUT, {"x": 1.0, "noise": s_noise * sigma_up})])
                    x_high = run.step(program, x_high, x_high, draw)
                elif draw is not None:
                    draw()  # k-diffusion calls its noise sampler on every accepted step
                x, s = x_high, t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if run.callback is not None:
                run.callback({**_dpm_info(x, info["steps"] - 1, s, denoised), "error": error, "h": pid.h, **info})
    return (x, info) if return_info else x
