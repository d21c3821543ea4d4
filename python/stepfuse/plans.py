"""Optimised sampling plans: schedules and solver coefficients fitted to a teacher trajectory.

Every stepfuse solver is a coefficient plan, so the plan itself can be optimised for a model
without touching the network:

* :func:`optimal_schedule`: choose ``K`` of a fine teacher run's ``N`` noise levels by dynamic
  programming (the DP runs in C++, :func:`stepfuse.solvers.optimal_schedule.optimal_step_indices`);
  "Optimal Stepsize for Diffusion Sampling" (Pei et al. 2025), Watson et al. 2021;
* :func:`distill_scales`: one D-ODE scale per model evaluation, each fitted in closed form by
  least squares so the student lands on the teacher's state ("Distilling ODE Solvers of
  Diffusion Models into Smaller Steps", Kim et al. 2024);
* :func:`time_shift`: shifted start levels that undo the exposure bias of a few-step sampler
  ("Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps",
  Li et al. 2024), calibrated once on a batch instead of measured every step;
* :func:`search_schedule`: the levels, and optionally the D-ODE scales and the levels each step
  evaluates the model at (LD3-style), searched jointly for the end point against a fine teacher,
  by Nelder-Mead or CMA-ES (:func:`cma_es`).

All of them work on a k-diffusion denoiser ``model(x, sigma) -> D`` (the analytic
:class:`~stepfuse.testing.gmm.GaussianMixture`'s ``denoise``, a
:class:`DiscreteVPDenoiser` around a diffusers network, or any k-diffusion model wrapper) and
return a :class:`SamplingPlan`. A plan is saved as JSON (``plan.save(path)``) and runs in
``stepfuse.k_diffusion.sample_*(model, x, None, plan=plan)`` or in a diffusers drop-in
(``DPMSolverMultistepScheduler.from_plan(plan, pipe.scheduler.config)`` or
``scheduler.set_timesteps(plan=plan)``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import k_diffusion as kd
from .integrations import k_diffusion as _kd_impl
from .solvers.optimal_schedule import first_order_step_costs, optimal_step_indices
from .solvers.plan import SamplingPlan

__all__ = [
    "DiscreteVPDenoiser",
    "OPTIMIZERS",
    "SamplingPlan",
    "cma_es",
    "distill_scales",
    "load_plan",
    "optimal_schedule",
    "run_plan",
    "refine_sigmas",
    "search_schedule",
    "teacher_trajectory",
    "time_shift",
]

#: Samplers whose every step makes one model evaluation: D-ODE scales are fitted per step.
#: ``dpmpp_3m`` is ``sample_dpmpp_3m_sde`` with ``eta = 0``: DPM-Solver++(3M), the ODE sampler.
SINGLE_EVALUATION = ("euler", "dpmpp_2m", "dpmpp_3m", "lms")
#: Samplers that apply shifted start levels.
SHIFTING = ("euler", "heun", "dpm_2", "dpmpp_2m", "dpmpp_3m", "lms")


def load_plan(path) -> SamplingPlan:
    """The :class:`SamplingPlan` saved at ``path``."""
    return SamplingPlan.load(path)


def _sampler(name: str, allowed: Sequence[str], argument: str = "solver") -> Callable:
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{argument} must be one of {list(allowed)}, got {name!r}")
    if name == "dpmpp_3m":
        return functools.partial(kd.sample_dpmpp_3m_sde, eta=0.0)
    return getattr(kd, f"sample_{name}")


def run_plan(model, x, plan, solver: str, extra_args=None) -> torch.Tensor:
    """Sample from ``x`` with ``solver`` (a name in :data:`SHIFTING` or ``SINGLE_EVALUATION``) on ``plan``."""
    run = _sampler(solver, sorted(set(SINGLE_EVALUATION) | set(SHIFTING)))
    return run(model, x, None, extra_args=extra_args, disable=True, plan=plan)


def _check_model_x(model, x) -> None:
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, sigma), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")


def _base_plan(plan) -> SamplingPlan:
    """``plan`` itself, or a plan on the sigma grid ``plan`` (a sequence or a tensor; validated)."""
    if isinstance(plan, SamplingPlan):
        return plan
    if isinstance(plan, torch.Tensor):
        plan = plan.detach().to("cpu", torch.float64).tolist()
    return SamplingPlan(sigmas=plan)


def _grid(sigmas) -> np.ndarray:
    return np.asarray(_base_plan(sigmas).sigmas, dtype=np.float64)


def refine_sigmas(sigmas, substeps: int, rho: float = 7.0) -> np.ndarray:
    """Each interval of ``sigmas`` split into ``substeps`` steps uniform in ``sigma^(1/rho)``.

    The Karras et al. (2022, eq. 5) spacing inside every interval; the original points are kept
    exactly, every ``substeps``-th entry of the result (float64).
    """
    if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
        raise ValueError(f"substeps must be an int >= 1, got {substeps!r}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive number, got {rho!r}")
    grid = _grid(sigmas)
    out = [grid[0]]
    for hi, lo in zip(grid[:-1], grid[1:]):
        a, b = hi ** (1.0 / rho), lo ** (1.0 / rho)
        inner = (a + (b - a) * np.arange(1, substeps) / substeps) ** rho
        out.extend(inner.tolist())
        out.append(lo)
    return np.asarray(out, dtype=np.float64)


@torch.no_grad()
def teacher_trajectory(model, x, sigmas, extra_args=None, teacher: str = "heun") -> tuple:
    """States and data predictions of a fine run through ``sigmas`` from ``x``.

    Returns ``(states, denoised)``: ``states[n]`` is the sample at ``sigmas[n]`` (``[N + 1, *x.shape]``,
    the last one the output), ``denoised[n]`` the model's ``D`` there (``[N, *x.shape]``).
    """
    _check_model_x(model, x)
    grid = _grid(sigmas)
    run = _sampler(teacher, ("euler", "heun", "dpm_2", "dpmpp_2m", "lms"), "teacher")
    states, denoised = [], []

    def record(info):
        states.append(info["x"].detach().clone())
        denoised.append(info["denoised"].detach().clone())

    out = run(model, x, torch.tensor(grid, dtype=torch.float64, device=x.device), extra_args=extra_args,
              callback=record, disable=True)
    states.append(out.detach().clone())
    return torch.stack(states), torch.stack(denoised)


def optimal_schedule(model, x, num_steps: int, sigma_min: float, sigma_max: float, teacher_steps: int = 100,
                     rho: float = 7.0, extra_args=None, solver: str = "dpmpp_2m", teacher: str = "heun") -> SamplingPlan:
    """The ``num_steps`` noise levels (plus the final 0) minimising a first-order student's error.

    A ``teacher`` run over ``teacher_steps`` Karras levels from ``sigma_max`` to ``sigma_min``
    (then 0) visits ``N + 1`` points; the cost of jumping from point ``j`` to ``i`` is the
    mean squared error of a DDIM/Euler step from the teacher's state at ``j`` against its state at
    ``i`` (:func:`~stepfuse.solvers.optimal_schedule.first_order_step_costs`, no extra model
    calls), and the cheapest path with ``num_steps`` edges is solved by the C++ DP.
    """
    _check_model_x(model, x)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if isinstance(teacher_steps, bool) or not isinstance(teacher_steps, int) or teacher_steps < num_steps:
        raise ValueError(f"teacher_steps must be an int >= num_steps ({num_steps}), got {teacher_steps!r}")
    grid = kd.get_sigmas_karras(teacher_steps, sigma_min, sigma_max, rho=rho).double().numpy()
    states, denoised = teacher_trajectory(model, x, grid, extra_args, teacher)
    cost = first_order_step_costs(states, denoised, grid)
    indices = optimal_step_indices(cost, num_steps)
    return SamplingPlan(
        sigmas=[float(grid[i]) for i in indices], solver=solver,
        metadata={"method": "optimal_schedule", "teacher": teacher, "teacher_steps": teacher_steps,
                  "teacher_indices": [int(i) for i in indices], "batch": int(x.shape[0])},
    )


#: Derivative-free optimisers :func:`search_schedule` can use.
OPTIMIZERS = ("nelder-mead", "cma-es")


def cma_es(objective: Callable[[np.ndarray], float], x0, sigma0: float, max_evaluations: int,
           seed: int = 0) -> tuple:
    """Minimise ``objective`` from ``x0`` with the covariance matrix adaptation evolution strategy,
    ``(mu/mu_w, lambda)``-CMA-ES with the default population, weights and learning rates of
    Hansen, "The CMA Evolution Strategy: A Tutorial" (2016), Sec. 4 / Appendix A.

    ``sigma0`` is the initial step size; a non-finite objective value ranks last.  Returns
    ``(best x, best value, evaluations)``.  Unlike Nelder-Mead it keeps improving on the 2K - 2
    to 3K - 1 coupled parameters of a joint plan search, where a simplex stalls.
    """
    rng = np.random.default_rng(seed)
    mean = np.asarray(x0, dtype=np.float64).copy()
    n = mean.size
    lam = 4 + int(3 * math.log(n))
    mu = lam // 2
    weights = math.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    weights /= weights.sum()
    mueff = 1.0 / float((weights ** 2).sum())
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    cs = (mueff + 2) / (n + mueff + 5)
    c1 = 2 / ((n + 1.3) ** 2 + mueff)
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
    damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))  # E|N(0, I)|
    pc, ps = np.zeros(n), np.zeros(n)
    basis, scale, cov = np.eye(n), np.ones(n), np.eye(n)
    sigma, evaluations, generation = float(sigma0), 0, 0
    best_x, best_f = mean.copy(), float(objective(mean))
    evaluations += 1
    while evaluations + lam <= max_evaluations:
        z = rng.standard_normal((lam, n))
        y = (z * scale) @ basis.T  # ~ N(0, C)
        xs = mean + sigma * y
        values = np.array([objective(v) for v in xs], dtype=np.float64)
        evaluations += lam
        values[~np.isfinite(values)] = np.inf
        order = np.argsort(values, kind="stable")
        if values[order[0]] < best_f:
            best_f, best_x = float(values[order[0]]), xs[order[0]].copy()
        y_sel = y[order[:mu]]
        step = weights @ y_sel  # (m_new - m) / sigma
        mean = mean + sigma * step
        generation += 1
        # cumulation paths (eqs. 43-46); C^(-1/2) step = B z-step
        ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * (basis @ ((basis.T @ step) / scale))
        h_sigma = float(np.linalg.norm(ps) / math.sqrt(1 - (1 - cs) ** (2 * generation)) / chi_n
                        < 1.4 + 2 / (n + 1))
        pc = (1 - cc) * pc + h_sigma * math.sqrt(cc * (2 - cc) * mueff) * step
        # rank-one and rank-mu update (eq. 47), step size by path length (eq. 44)
        cov = ((1 - c1 - cmu) * cov + c1 * (np.outer(pc, pc) + (1 - h_sigma) * cc * (2 - cc) * cov)
               + cmu * (y_sel.T * weights) @ y_sel)
        sigma *= math.exp((cs / damps) * (np.linalg.norm(ps) / chi_n - 1))
        cov = (cov + cov.T) / 2
        eigvals, basis = np.linalg.eigh(cov)
        scale = np.sqrt(np.maximum(eigvals, 1e-30))
        if sigma * scale.max() < 1e-12:  # converged
            break
    return best_x, best_f, evaluations


@torch.no_grad()
def search_schedule(model, x, plan, solver: str = "dpmpp_2m", teacher_steps: int = 200, max_evaluations: int = 400,
                    extra_args=None, scales: bool = False, shifts: bool = False, optimizer: str = "nelder-mead",
                    seed: int = 0) -> SamplingPlan:
    """Move ``plan``'s interior noise levels to minimise ``solver``'s end-point error on ``x``.

    The DP of :func:`optimal_schedule` scores a first-order step; a multistep solver's error
    also depends on how neighbouring steps combine. This search minimises the mean squared
    distance between ``solver``'s output on the batch and a fine teacher's (``teacher_steps``
    Heun steps over the refined plan) directly, by Nelder-Mead over the log of the interior
    levels (the first level and the last are kept), starting from ``plan``; the approach of
    learning a sampler's schedule against its own output (Watson et al. 2021, "Learning Fast
    Samplers for Diffusion Models by Differentiating Through Sample Quality"), derivative-free.
    With ``scales`` the D-ODE scales of steps ``1 .. K-1`` are searched jointly with the levels
    (from ``plan``'s scales, or 0): the end point, not each step's landing, is then what they
    fit. With ``shifts`` so are the levels every step evaluates the model at (``shifted_sigmas``,
    as log ratios to the step's level, from ``plan``'s or 0): decoupling where a step starts from
    where the model is asked, as LD3 (Tong et al. 2025, "Learning to Discretize Denoising
    Diffusion ODEs") learns them. ``optimizer="cma-es"`` runs :func:`cma_es` (seeded by ``seed``)
    instead of Nelder-Mead; it is the one that keeps improving on the 3K - 1 joint values. Each
    evaluation costs one student run (``K`` model calls on the batch).
    """
    from scipy.optimize import minimize

    _check_model_x(model, x)
    run = _sampler(solver, SINGLE_EVALUATION)
    if isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int) or max_evaluations < 1:
        raise ValueError(f"max_evaluations must be an int >= 1, got {max_evaluations!r}")
    for name, flag in (("scales", scales), ("shifts", shifts)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    if shifts:
        _sampler(solver, SHIFTING)
    base = _base_plan(plan)
    if base.num_steps < 2:
        return base
    substeps = max(1, -(-teacher_steps // base.num_steps))
    target = teacher_trajectory(model, x, refine_sigmas(base.sigmas, substeps), extra_args)[0][-1].double()
    first, last = base.sigmas[0], base.sigmas[-1]
    # Levels may not fall far below the plan's smallest positive one (a step of ~0 length wastes
    # a model call and leaves nothing to divide by).
    floor = 0.5 * min(s for s in base.sigmas if s > 0.0)
    interior = base.num_steps - 1

    n_scales = interior if scales else 0

    def plan_of(v):
        v = np.asarray(v, dtype=np.float64)
        inner = np.exp(v[:interior])
        if inner.min() < floor:
            raise ValueError("level below the floor")
        sigmas = [first, *inner.tolist(), last]
        if np.any(np.diff(np.asarray(sigmas, dtype=np.float32)) >= 0):  # the samplers step in float32
            raise ValueError("levels out of order")
        fitted = [0.0, *v[interior:interior + n_scales].tolist()] if scales else None
        shifted = (np.asarray(sigmas[:-1]) * np.exp(v[interior + n_scales:])).tolist() if shifts else None
        return base.replace(sigmas=sigmas, scales=fitted, shifted_sigmas=shifted)

    def objective(v) -> float:
        try:
            candidate = plan_of(v)
        except ValueError:  # levels out of order: not a schedule
            return math.inf
        out = run(model, x, None, extra_args=extra_args, disable=True, plan=candidate)
        error = float((out.double() - target).square().mean())
        return error if math.isfinite(error) else math.inf

    start = np.log(np.asarray(base.sigmas[1:-1], dtype=np.float64))
    if scales:
        start = np.concatenate([start, np.asarray(base.scales[1:] if base.scales else [0.0] * interior)])
    if shifts:
        given = base.shifted_sigmas or base.sigmas[:-1]
        start = np.concatenate([start, np.log(np.asarray(given) / np.asarray(base.sigmas[:-1]))])
    before = objective(start)
    if optimizer == "cma-es":
        # A step size of 0.05: 5% on the levels and shifts, 0.05 on the scales.
        found, value, evaluations = cma_es(objective, start, 0.05, max_evaluations, seed)
    else:
        # "adaptive" scales the simplex parameters with the dimension (Gao & Han 2012), which the
        # joint search of 2K - 2 values needs.
        result = minimize(objective, start, method="Nelder-Mead", options={
            "maxfev": max_evaluations, "xatol": 1e-6, "fatol": 1e-16, "adaptive": scales or shifts})
        found, value, evaluations = result.x, float(result.fun), int(result.nfev)
    best = found if value < before else start
    searched = "".join(f" with {name}" for name, on in (("d-ode scales", scales), ("shifted levels", shifts)) if on)
    return plan_of(best).replace(solver=solver, metadata={
        **base.metadata, "schedule_search": f"{optimizer} end-point error{searched}",
        "teacher_steps": teacher_steps, "evaluations": evaluations, "mse_before": before,
        "mse_after": float(min(value, before)), "batch": int(x.shape[0])})


@contextlib.contextmanager
def _fitting(fit: Callable):
    token = _kd_impl.SCALE_FIT.set(fit)
    try:
        yield
    finally:
        _kd_impl.SCALE_FIT.reset(token)


@torch.no_grad()
def distill_scales(model, x, plan, solver: str = "dpmpp_2m", teacher_substeps: int = 10, teacher: str = "heun",
                   extra_args=None) -> SamplingPlan:
    """Fit one D-ODE scale per step of ``solver`` on ``plan``'s grid (a plan or a sigma grid).

    The teacher runs ``teacher_substeps`` steps inside every student interval
    (:func:`refine_sigmas`), so its state at each student level is known. The student then runs
    from the same ``x``; at step ``k`` its output is affine in the scale, ``x_{k+1}(l) = b + l d``
    (the adjustment folds linearly into the step's program), and the scale minimising
    ``|x_{k+1}(l) - teacher_{k+1}|^2`` over the batch is ``<d, teacher - b> / <d, d>``: computed
    exactly, in float64, step by step along the student's own trajectory. Keeps ``plan``'s
    shifted sigmas, if any.
    """
    _check_model_x(model, x)
    run = _sampler(solver, SINGLE_EVALUATION)
    base = _base_plan(plan)
    fine = refine_sigmas(base.sigmas, teacher_substeps)
    states, _ = teacher_trajectory(model, x, fine, extra_args, teacher)
    targets = states[::teacher_substeps].to(torch.float64)
    fitted, residuals = [0.0], []

    def fit(k: int, trial: Callable[[float], torch.Tensor]) -> float:
        b = trial(0.0).double()
        d = trial(1.0).double() - b
        target = targets[k + 1]
        dd = float((d * d).sum())
        scale = float((d * (target - b)).sum()) / dd if dd > 0.0 else 0.0
        fitted.append(scale)
        residuals.append(float((b + scale * d - target).square().mean().sqrt()))
        return scale

    student = base.replace(scales=[0.0] * base.num_steps)
    with _fitting(fit):
        run(model, x, None, extra_args=extra_args, disable=True, plan=student)
    return base.replace(scales=fitted, solver=solver, metadata={
        **base.metadata, "scales_method": "d-ode least squares", "teacher": teacher,
        "teacher_substeps": teacher_substeps, "fit_rms": residuals, "batch": int(x.shape[0])})


@torch.no_grad()
def time_shift(model, x, plan, solver: str = "dpmpp_2m", window: float = 0.25, teacher_substeps: int = 10,
               teacher: str = "heun", extra_args=None) -> SamplingPlan:
    """Shifted start levels for ``solver`` on ``plan``'s grid, calibrated on the batch ``x``.

    After step ``i - 1`` a few-step sampler's sample carries more (or less) noise than the
    level ``sigma_i`` it is labelled with (exposure bias). Li et al. (2024) evaluate the model at
    the level whose noise variance matches the sample's, searched in a window around
    ``sigma_i``. Here the data part of the variance at ``sigma_i`` comes from a fine teacher
    run (``Var[x_teacher] - sigma_i^2``), the sample's variance from the student's run so far,
    and ``sigma_s^2 = Var[x] - data part``, clipped to ``sigma_i * exp(+-window)`` and above
    ``sigma_{i+1}``. One calibration replaces the per-step variance measurement (and its
    host sync) at sampling time.
    """
    _check_model_x(model, x)
    run = _sampler(solver, SHIFTING)
    if not (isinstance(window, (int, float)) and math.isfinite(window) and window >= 0):
        raise ValueError(f"window must be a non-negative number, got {window!r}")
    base = _base_plan(plan)
    sig = list(base.sigmas)
    fine = refine_sigmas(sig, teacher_substeps)
    states, _ = teacher_trajectory(model, x, fine, extra_args, teacher)
    teacher_var = states[::teacher_substeps].double().flatten(2).var(dim=2).mean(dim=1).tolist()
    shifted = list(sig[:-1])
    for i in range(1, base.num_steps):
        prefix = base.replace(sigmas=sig[: i + 1], shifted_sigmas=shifted[:i], scales=None)
        xi = run(model, x, None, extra_args=extra_args, disable=True, plan=prefix)
        student_var = float(xi.double().flatten(1).var(dim=1).mean())
        data_var = teacher_var[i] - sig[i] ** 2
        level = math.sqrt(max(student_var - data_var, 0.0))
        lo, hi = max(sig[i] * math.exp(-window), sig[i + 1] * (1.0 + 1e-6)), sig[i] * math.exp(window)
        shifted[i] = min(max(level, lo), hi)
    return base.replace(shifted_sigmas=shifted, solver=solver, metadata={
        **base.metadata, "shift_method": "variance-matched time shift", "window": window,
        "teacher": teacher, "teacher_substeps": teacher_substeps})


class DiscreteVPDenoiser(torch.nn.Module):
    """A k-diffusion denoiser ``D(x, sigma)`` around a discrete-time VP network (k-diffusion's
    ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``).

    ``x`` is the VE sample ``x0 + sigma * eps``; the network sees ``x / sqrt(sigma^2 + 1)`` at
    the (fractional, or rounded with ``quantize``) training timestep whose sigma is ``sigma``,
    and its ``epsilon`` / ``v_prediction`` / ``sample`` output becomes the data prediction.

    Args:
        network: ``network(x_in, t, **extra_args) -> Tensor``.
        alphas_cumprod: the training schedule's ``alphas_cumprod`` (``T`` values).
    """

    def __init__(self, network: Callable, alphas_cumprod, prediction_type: str = "epsilon", quantize: bool = False):
        super().__init__()
        if not callable(network):
            raise TypeError(f"network must be callable, got {type(network).__name__}")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
        acp = np.asarray(torch.as_tensor(alphas_cumprod).detach().double().cpu().numpy(), dtype=np.float64)
        if acp.ndim != 1 or len(acp) < 2 or not np.all((acp > 0) & (acp <= 1)):
            raise ValueError("alphas_cumprod must be 1-D with values in (0, 1]")
        self.network, self.prediction_type, self.quantize = network, prediction_type, bool(quantize)
        self.register_buffer("log_sigmas", torch.from_numpy(np.log(np.sqrt((1 - acp) / acp))), persistent=False)

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep, piecewise linear in log sigma (k-diffusion's ``sigma_to_t``)."""
        log_sigma = sigma.double().clamp_min(1e-10).log()
        table = self.log_sigmas.to(sigma.device)
        low = torch.searchsorted(table, log_sigma.contiguous()).sub(1).clamp(0, len(table) - 2)
        w = ((log_sigma - table[low]) / (table[low + 1] - table[low])).clamp(0, 1)
        t = low + w
        return t.round() if self.quantize else t

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        s = sigma.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        c_in = 1.0 / (s * s + 1.0).sqrt()
        out = self.network(x * c_in, self.sigma_to_t(sigma).to(x.dtype), **extra_args)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x * c_in * c_in - s * c_in * out
        return out
