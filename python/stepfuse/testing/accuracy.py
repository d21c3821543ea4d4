"""Solver accuracy against the exact probability-flow ODE of a Gaussian mixture.

A diffusers-style scheduler (diffusers' own or a stepfuse drop-in: same interface) is driven
by a *perfect model*: at the noise level the scheduler steps from, the network output is the
exact epsilon / v / x0 / flow prediction of a :class:`~stepfuse.testing.gmm.GaussianMixture`.
The only error left in the final sample is then the solver's discretisation error (plus
rounding), which is measured against :meth:`GaussianMixture.ode_solution` (float64, DOP853) from
the same start to the same end noise level.

Noise-level conventions of the scheduler families (VE sigma ``s = sigma_t / alpha_t``):

==============  =========================  ====================  ============================
family          sample the loop carries    model input           (alpha, sigma) of the input
==============  =========================  ====================  ============================
VE (Euler,      ``x0 + s eps``             ``x / sqrt(s^2 + 1)``  ``1/sqrt(1+s^2), s alpha``
Heun: init_
noise_sigma>1)
VP (DPM, UniPC)  ``alpha (x0 + s eps)``    the sample             ``1/sqrt(1+s^2), s alpha``
flow            ``(1-s) x0 + s eps``       the sample             ``1 - s, s``
DDIM (no        ``sqrt(a) x0 +             the sample             ``sqrt(a), sqrt(1-a)``,
``sigmas``)     sqrt(1-a) eps``                                   ``a = alphas_cumprod[t]``
==============  =========================  ====================  ============================

(Karras et al. 2022, "Elucidating the Design Space...", eq. 4 and Table 1: every family is the
VE ODE under x -> s(t) x; flow matching is the case alpha = 1 - s, sigma = s.)

Errors are the RMS over all elements of the final sample mapped to data (VE) space,
``x / alpha_end``, minus the reference.  Configurations with clipping or thresholding of the
data prediction are not an ODE solver and make no sense here: pass ``clip_sample=False`` to
DDIM, whose default clips to [-1, 1].
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .gmm import GaussianMixture

__all__ = [
    "PerfectModel",
    "TrajectoryResult",
    "run_trajectory",
    "trajectory_error",
    "empirical_order",
    "default_gmm",
    "SOLVER_CONFIGS",
    "SPACINGS",
    "NFE_BUDGETS",
    "accuracy_table",
    "plot_accuracy",
]

# A flow schedule that starts at s = 1 starts from pure noise, VE sigma = infinity.  Along the VE
# probability-flow ODE x(sigma) = E[x0] + sigma eps + O(1/sigma) as sigma -> infinity (D(x, sigma)
# -> E[x0] + Cov (x - E[x0]) / sigma^2), and the flow maps a perturbation d at sigma to about
# d * sigma' / sigma at sigma' (x(sigma) ~ E[x0] + sigma z): starting the reference at
# x = E[x0] + S eps with S = 1e6 changes the end state by O(Var / S^2), far below any solver error.
_PURE_NOISE_SIGMA = 1e6


def default_gmm() -> GaussianMixture:
    """The mixture the tests and the benchmark use: 4 overlapping components in 2-D, stds 0.5-0.8.

    The overlap matters: between well-separated modes p_0 has deep valleys, where the noise-to-data
    map of the ODE stretches by the density ratio; a sample starting near such a watershed can
    switch modes under an O(h) error, and a handful of those dominated the RMS error and hid the
    asymptotic orders until thousands of steps (seen with spread 3, stds 0.3-0.8).
    """
    return GaussianMixture.random(num_components=4, data_shape=(2,), seed=0, spread=1.5, std=(0.5, 0.8))


# ---------------------------------------------------------------------------------------------
# noise levels of a scheduler
# ---------------------------------------------------------------------------------------------
def _config(scheduler, key, default=None):
    return getattr(scheduler.config, key, default)


def _family(scheduler) -> str:
    """'flow', 'ddim' (alphas_cumprod of the timestep), 've' (Karras-style sample) or 'vp'."""
    if "FlowMatch" in type(scheduler).__name__ or _config(scheduler, "use_flow_sigmas", False):
        return "flow"
    if getattr(scheduler, "sigmas", None) is None:
        return "ddim"
    init = getattr(scheduler, "init_noise_sigma", 1.0)
    return "ve" if float(init) > 1.0 else "vp"


@dataclass(frozen=True)
class _Level:
    """One noise level of a family: VE sigma, scale of the sample, (alpha, sigma) of the model input."""

    ve_sigma: float  # math.inf for pure noise (flow s = 1)
    sample_scale: float  # sample = sample_scale * x_ve
    alpha: float
    sigma: float


def _level(family: str, value: float) -> _Level:
    """``value`` is the schedule's sigma (VE or flow s), or alphas_cumprod for DDIM."""
    if family == "flow":
        s = value
        return _Level(math.inf if s >= 1.0 else s / (1.0 - s), 1.0 - s, 1.0 - s, s)
    if family == "ddim":
        alpha, sigma = math.sqrt(value), math.sqrt(1.0 - value)
        return _Level(sigma / alpha, alpha, alpha, sigma)
    alpha = 1.0 / math.sqrt(1.0 + value * value)
    return _Level(value, 1.0 if family == "ve" else alpha, alpha, value * alpha)


def _index(scheduler) -> int:
    """The step the scheduler takes next (diffusers' step_index / begin_index protocol)."""
    for index in (scheduler.step_index, getattr(scheduler, "begin_index", None)):
        if index is not None:
            return int(index)
    return 0


def _current_value(scheduler, family: str, timestep=None) -> float:
    if family == "ddim":
        return float(scheduler.alphas_cumprod[int(timestep)])
    return float(scheduler.sigmas[_index(scheduler)])


def _ddim_end_value(scheduler, last_timestep) -> float:
    """alphas_cumprod of the timestep DDIM's last step lands on (prev < 0: final_alpha_cumprod)."""
    prev = int(last_timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)


class PerfectModel:
    """The exact network output of ``gmm`` for ``scheduler``, called as ``model(model_input, t)``.

    The noise level is the scheduler's own: ``sigmas[step_index]`` (``begin_index`` / 0 before
    the first step; this also covers Heun's interleaved schedule, whose corrector stage sits at
    ``sigmas[step_index]`` too), or ``alphas_cumprod[t]`` for DDIM.  ``calls`` counts model
    evaluations (NFE).
    """

    def __init__(self, scheduler, gmm: GaussianMixture, prediction_type: Optional[str] = None):
        self.scheduler = scheduler
        self.gmm = gmm
        self.family = _family(scheduler)
        if prediction_type is None:
            prediction_type = _config(scheduler, "prediction_type", None) or "flow_prediction"
        self.prediction_type = prediction_type
        self.calls = 0

    def __call__(self, model_input: torch.Tensor, timestep) -> torch.Tensor:
        level = _level(self.family, _current_value(self.scheduler, self.family, timestep))
        self.calls += 1
        return self.gmm.model_output(model_input, level.alpha, level.sigma, self.prediction_type)


# ---------------------------------------------------------------------------------------------
# one trajectory against the reference ODE solution
# ---------------------------------------------------------------------------------------------
@dataclass
class TrajectoryResult:
    error: float  # RMS over all elements, data (VE) space
    nfe: int  # model evaluations
    sigma_start: float  # VE sigmas (inf: pure noise)
    sigma_end: float
    sample: torch.Tensor = field(repr=False)  # final sample in data space (float64)
    reference: torch.Tensor = field(repr=False)


@contextlib.contextmanager
def single_threaded(numel: int):
    """Thousands of ops on tiny tensors: intra-op threads only add barriers (10x slower on a
    loaded 2-core machine).  The thread count is process-wide, so it is restored after."""
    threads = torch.get_num_threads()
    if numel < 2**20:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _start_state(gmm: GaussianMixture, batch: int, seed: int):
    """Clean data and noise, drawn once per (batch, seed) so every schedule starts from the same pair."""
    gen = torch.Generator().manual_seed(int(seed))
    x0 = gmm.sample(batch, generator=gen)
    eps = torch.randn((batch, *gmm.data_shape), generator=gen, dtype=torch.float64)
    return x0, eps


def run_trajectory(
    scheduler,
    gmm: GaussianMixture,
    num_inference_steps: Optional[int] = None,
    batch: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    set_timesteps_kwargs: Optional[dict] = None,
    skip_final_step: bool = False,
    cache: Optional[dict] = None,
    rtol: float = 1e-10,
) -> TrajectoryResult:
    """Sample with ``scheduler`` and the perfect model; compare with the exact ODE solution.

    The start is an exact draw of p at the schedule's first noise level, ``x0 + s0 eps``
    (pure noise ``eps`` for a flow schedule at s = 1), mapped into the scheduler's sample
    space; the loop is a pipeline's (``scale_model_input`` -> model -> ``step``).  The
    reference is the float64 PF-ODE from the same start to the schedule's final noise level.
    ``skip_final_step`` stops one ``step`` call early and compares there: for schedules that
    always end with a jump to sigma = 0 from a fixed sigma_min (Heun), whose error
    D(x, sigma_min) - x(0) = O(sigma_min^2) does not shrink with the number of steps.
    ``cache`` (a dict) memoises reference solutions across calls.
    """
    kwargs = dict(set_timesteps_kwargs or {})
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    scheduler.set_timesteps(**kwargs)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    family = _family(scheduler)
    timesteps = list(scheduler.timesteps)
    if skip_final_step:
        timesteps = timesteps[:-1]
    start = _level(family, _current_value(scheduler, family, timesteps[0]))

    x0, eps = _start_state(gmm, batch, seed)
    if math.isinf(start.ve_sigma):
        x_ve = gmm.mean + _PURE_NOISE_SIGMA * eps
        sample = eps.clone()  # (1 - s) x0 + s eps at s = 1
        ref_sigma_start = _PURE_NOISE_SIGMA
    else:
        x_ve = x0 + start.ve_sigma * eps
        sample = start.sample_scale * x_ve
        ref_sigma_start = start.ve_sigma
    sample = sample.to(dtype)

    model = PerfectModel(scheduler, gmm)
    scale_model_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
    with single_threaded(sample.numel()):
        for t in timesteps:
            out = model(scale_model_input(sample, t), t)
            sample = scheduler.step(out, t, sample, return_dict=False)[0]

    if family == "ddim":
        end_value = float(scheduler.alphas_cumprod[int(timesteps[-1])]) if skip_final_step else _ddim_end_value(
            scheduler, timesteps[-1]
        )
    else:
        end_value = float(scheduler.sigmas[_index(scheduler)])
    end = _level(family, end_value)

    key = (id(gmm), batch, seed, ref_sigma_start, end.ve_sigma, rtol)
    reference = None if cache is None else cache.get(key)
    if reference is None:
        reference = gmm.ode_solution(x_ve, ref_sigma_start, end.ve_sigma, rtol=rtol, atol=rtol)
        if cache is not None:
            cache[key] = reference
    got = sample.to(torch.float64) / end.sample_scale
    error = float((got - reference).square().mean().sqrt())
    return TrajectoryResult(error, model.calls, start.ve_sigma, end.ve_sigma, got, reference)


def trajectory_error(
    scheduler,
    gmm: GaussianMixture,
    num_inference_steps: Optional[int] = None,
    batch: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    set_timesteps_kwargs: Optional[dict] = None,
    skip_final_step: bool = False,
    cache: Optional[dict] = None,
) -> float:
    """RMS data-space error of one sampling run against the exact ODE solution (see :func:`run_trajectory`)."""
    return run_trajectory(
        scheduler, gmm, num_inference_steps, batch, seed, dtype, set_timesteps_kwargs, skip_final_step, cache
    ).error


def empirical_order(errors_by_steps: Dict[int, float]) -> float:
    """Least-squares slope of -log(error) against log(steps): p in error ~ C steps^-p."""
    if len(errors_by_steps) < 2:
        raise ValueError(f"errors_by_steps needs at least two entries, got {len(errors_by_steps)}")
    steps = np.array(sorted(errors_by_steps), dtype=np.float64)
    errors = np.array([errors_by_steps[int(n)] for n in steps], dtype=np.float64)
    if not (np.all(errors > 0) and np.all(np.isfinite(errors))):
        raise ValueError(f"errors must be positive and finite, got {errors.tolist()}")
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return float(-slope)


# ---------------------------------------------------------------------------------------------
# accuracy table: error vs NFE per solver configuration and spacing
# ---------------------------------------------------------------------------------------------
# (label, scheduler class name, config): the main options users run.
SOLVER_CONFIGS = [
    ("dpm++ 1", "DPMSolverMultistepScheduler", {"solver_order": 1}),
    ("dpm++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    ("dpm++ 2M heun", "DPMSolverMultistepScheduler", {"solver_order": 2, "solver_type": "heun"}),
    ("dpm++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("dpmsolver 2M", "DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver"}),
    ("unipc bh1 2", "UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh1"}),
    ("unipc bh2 2", "UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    ("unipc bh1 3", "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}),
    ("unipc bh2 3", "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("ddim", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    ("flow euler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
]
# Spacing flag per label; a scheduler supports a spacing when its __init__ takes the flag.
SPACINGS = {
    "default": None,
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "lu": "use_lu_lambdas",
}
NFE_BUDGETS = (4, 5, 6, 8, 10, 15, 20, 30, 50)


def _accepts(cls, key: str) -> bool:
    return key in inspect.signature(cls.__init__).parameters


def fixed_end_config(cls, config: dict) -> dict:
    """``config`` with a final sigma that does not depend on the number of steps, where the class allows.

    DPM-Solver / UniPC / Euler with ``final_sigmas_type="zero"`` end with a jump from the fixed
    sigma_min to 0 whose error does not shrink with the step count; ``"sigma_min"`` ends there.
    """
    config = dict(config)
    if _accepts(cls, "final_sigmas_type"):
        config.setdefault("final_sigmas_type", "sigma_min")
    return config


def steps_for_nfe(cls_name: str, nfe: int) -> int:
    """The most steps whose model evaluations fit in ``nfe`` (Heun: 2 per step but the last)."""
    if cls_name == "HeunDiscreteScheduler":
        return max(1, (nfe + 1) // 2)
    return nfe


def accuracy_table(
    schedulers=None,
    baselines=None,
    configs: Sequence = SOLVER_CONFIGS,
    spacings: Sequence[str] = tuple(SPACINGS),
    nfe_budgets: Sequence[int] = NFE_BUDGETS,
    gmm: Optional[GaussianMixture] = None,
    batch: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: Optional[Callable[[str], None]] = None,
) -> List[dict]:
    """Error against the exact ODE solution for every (configuration, spacing, NFE budget).

    ``schedulers``: module holding the classes to measure (default ``stepfuse.schedulers``);
    ``baselines``: module with the same class names measured alongside (default ``diffusers``;
    ``False`` for none).  Classes missing from ``schedulers`` and spacings a class does not
    take are skipped.  Returns one dict per row: ``label``, ``scheduler``, ``spacing``,
    ``config``, ``nfe`` (per budget: the evaluations actually used), ``errors`` (budget ->
    RMS error), ``baseline_errors`` and ``max_rel_diff`` (largest relative difference to the
    baseline over the budgets) when a baseline is measured.
    """
    if schedulers is None:
        import stepfuse.schedulers as schedulers
    if baselines is None:
        import diffusers as baselines
    gmm = gmm or default_gmm()
    cache: dict = {}
    rows = []
    for label, cls_name, base_config in configs:
        cls = getattr(schedulers, cls_name, None)
        if cls is None:
            if progress:
                progress(f"skip {label}: {cls_name} not available")
            continue
        base_cls = getattr(baselines, cls_name, None) if baselines else None
        for spacing in spacings:
            flag = SPACINGS[spacing]
            if flag is not None and not _accepts(cls, flag):
                continue
            config = fixed_end_config(cls, {**base_config, **({flag: True} if flag else {})})
            row = {"label": label, "scheduler": cls_name, "spacing": spacing, "config": config,
                   "nfe": {}, "errors": {}}
            if base_cls is not None:
                row["baseline_errors"] = {}
            for budget in nfe_budgets:
                steps = steps_for_nfe(cls_name, budget)
                result = run_trajectory(cls(**config), gmm, steps, batch, seed, dtype, cache=cache)
                row["nfe"][budget], row["errors"][budget] = result.nfe, result.error
                if base_cls is not None:
                    row["baseline_errors"][budget] = run_trajectory(
                        base_cls.from_config(config), gmm, steps, batch, seed, dtype, cache=cache
                    ).error
            if base_cls is not None:
                row["max_rel_diff"] = max(
                    abs(row["errors"][b] - row["baseline_errors"][b]) / row["baseline_errors"][b] for b in nfe_budgets
                )
            rows.append(row)
            if progress:
                progress(f"{label} [{spacing}]: " + " ".join(f"{row['errors'][b]:.2e}" for b in nfe_budgets))
    return rows


def plot_accuracy(rows: List[dict], path) -> None:
    """Log-log error vs NFE, one panel per spacing, one line per configuration (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spacings = list(dict.fromkeys(r["spacing"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cmap = plt.get_cmap("tab20")
    colors = {label: cmap(i % 20) for i, label in enumerate(labels)}
    cols = min(2, len(spacings))
    nrows = math.ceil(len(spacings) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 5 * nrows), squeeze=False, sharey=True)
    for ax, spacing in zip(axes.flat, spacings):
        for row in (r for r in rows if r["spacing"] == spacing):
            budgets = sorted(row["errors"])
            nfe = [row["nfe"][b] for b in budgets]
            style = "--" if row["scheduler"] in ("EulerDiscreteScheduler", "HeunDiscreteScheduler") else "-"
            ax.loglog(nfe, [row["errors"][b] for b in budgets], style, marker="o", ms=3,
                      color=colors[row["label"]], label=row["label"])
        ax.set_title(f"spacing: {spacing}")
        ax.set_xlabel("NFE (model evaluations)")
        ax.set_ylabel("RMS error vs exact ODE solution")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(spacings):]:
        ax.axis("off")
    fig.suptitle("Solver error on an analytic Gaussian mixture (perfect model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
