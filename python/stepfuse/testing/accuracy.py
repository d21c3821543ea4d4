"""Solver accuracy against the exact probability-flow ODE of a Gaussian mixture.

A diffusers-style scheduler (diffusers' own or a stepfuse drop-in: same interface) is driven
by a *perfect model*: at the noise level the scheduler steps from, the network output is the
exact epsilon / v / x0 / flow prediction of a :class:`~stepfuse.testing.gmm.GaussianMixture`.
The only error left in the final sample is then the solver's discretisation error (plus
rounding), which is measured against :meth:`GaussianMixture.ode_solution` (float64, DOP853) from
the same start to the same end noise level.

Noise-level conventions of the scheduler families (VE sigma ``s = sigma_t / alpha_t``; the model
input is always ``alpha_t x0 + sigma_t eps`` for the (alpha_t, sigma_t) listed):

* VE, Karras-style (Euler, Heun; ``init_noise_sigma > 1``): the loop carries ``x0 + s eps``,
  ``scale_model_input`` divides by ``sqrt(s^2 + 1)``; alpha_t = 1/sqrt(1 + s^2), sigma_t = s alpha_t.
* VP (DPM-Solver, UniPC): the loop carries the model input; same alpha_t, sigma_t.
* flow (FlowMatchEuler, ``use_flow_sigmas``): the loop carries ``(1 - s) x0 + s eps``;
  alpha_t = 1 - s, sigma_t = s, VE sigma s / (1 - s).
* DDIM (no ``sigmas``): alpha_t = sqrt(a), sigma_t = sqrt(1 - a), a = ``alphas_cumprod[t]``.

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
    "SD_TRAIN_SCHEDULE",
    "ENDS",
    "measurement_setup",
    "steps_for_nfe",
    "accuracy_table",
    "format_rows",
    "plot_accuracy",
    "single_threaded",
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
    device=None,
) -> TrajectoryResult:
    """Sample with ``scheduler`` and the perfect model; compare with the exact ODE solution.

    The start is an exact draw of p at the schedule's first noise level, ``x0 + s0 eps``
    (pure noise ``eps`` for a flow schedule at s = 1), mapped into the scheduler's sample
    space; the loop is a pipeline's (``scale_model_input`` -> model -> ``step``).  The
    reference is the float64 PF-ODE from the same start to the schedule's final noise level.
    ``skip_final_step`` stops one ``step`` call early and compares there: for schedules that
    end with a jump to sigma = 0 from a fixed sigma_min (Heun always; the others with
    ``final_sigmas_type="zero"``), whose error D(x, sigma_min) - x(0) = O(sigma_min^2) does not
    shrink with the number of steps.  For UniPC the sample compared is then the last
    predictor's, without the corrector that the skipped call would have applied.
    ``cache`` (a dict) memoises reference solutions across calls.  ``device``: where the
    sampling loop runs (CPU by default); the reference is always float64 on the CPU.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    kwargs = dict(set_timesteps_kwargs or {})
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    scheduler.set_timesteps(device=device, **kwargs)
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
    sample = sample.to(device=device, dtype=dtype)

    model = PerfectModel(scheduler, gmm)
    scale_model_input = getattr(scheduler, "scale_model_input", lambda x, t: x)
    with single_threaded(sample.numel()):
        for t in timesteps:
            out = model(scale_model_input(sample, t), t)
            sample = scheduler.step(out, t, sample, return_dict=False)[0]

    if family == "ddim":
        end_value = _ddim_end_value(scheduler, timesteps[-1])
    else:
        end_value = float(scheduler.sigmas[_index(scheduler)])
    end = _level(family, end_value)

    key = (id(gmm), batch, seed, ref_sigma_start, end.ve_sigma, rtol)
    reference = None if cache is None else cache.get(key)
    if reference is None:
        reference = gmm.ode_solution(x_ve, ref_sigma_start, end.ve_sigma, rtol=rtol, atol=rtol)
        if cache is not None:
            cache[key] = reference
    got = sample.to(device="cpu", dtype=torch.float64) / end.sample_scale
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
    device=None,
) -> float:
    """RMS data-space error of one sampling run against the exact ODE solution (see :func:`run_trajectory`)."""
    return run_trajectory(
        scheduler, gmm, num_inference_steps, batch, seed, dtype, set_timesteps_kwargs, skip_final_step, cache,
        device=device,
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
    ("dpm++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    ("dpm++ 2M heun", "DPMSolverMultistepScheduler", {"solver_order": 2, "solver_type": "heun"}),
    ("dpm++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("unipc bh1 2", "UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh1"}),
    ("unipc bh2 2", "UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    ("unipc bh1 3", "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}),
    ("unipc bh2 3", "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh2"}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("ddim", "DDIMScheduler", {"clip_sample": False}),
    ("flow euler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("deis 2", "DEISMultistepScheduler", {"solver_order": 2}),
    ("deis 3", "DEISMultistepScheduler", {"solver_order": 3}),
    ("dpm++ 2S", "DPMSolverSinglestepScheduler", {"solver_order": 2}),
    ("dpm++ 3S", "DPMSolverSinglestepScheduler", {"solver_order": 3}),
    ("lms 4", "LMSDiscreteScheduler", {}),
]
# Spacing flag per name; a scheduler supports a spacing when its __init__ takes the flag.
SPACINGS = {
    "default": None,
    "karras": "use_karras_sigmas",
    "exponential": "use_exponential_sigmas",
    "lu": "use_lu_lambdas",
}
NFE_BUDGETS = (4, 5, 6, 8, 10, 15, 20, 30, 50)
# The training schedule of Stable Diffusion 1.x/2.x/XL, given to every non-flow scheduler so that
# all rows integrate the same ODE from the same sigma_max (14.6) to the same sigma_min (0.029).
SD_TRAIN_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
ENDS = ("sigma_min", "zero")


def _accepts(cls, key: str) -> bool:
    return key in inspect.signature(cls.__init__).parameters


def _train_sigma_min(scheduler) -> Optional[float]:
    """sigma at training step 0, where diffusers' "sigma_min" schedules end (None for flow)."""
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None or _family(scheduler) == "flow":
        return None
    return math.sqrt((1.0 - float(acp[0])) / float(acp[0]))


def measurement_setup(cls, config: dict, num_inference_steps: int, end: str = "sigma_min"):
    """``(config, skip_final_step)`` that make a run end where ``end`` says.

    ``"zero"``: the pipeline's output, unchanged (sigma = 0 for every scheduler that can end
    there).  ``"sigma_min"``: the integration up to the schedule's smallest positive sigma,
    without the final jump to 0 (that jump returns D(x, sigma_min) for every solver alike, an
    O(sigma_min^2) error that does not shrink with the steps and hides the solvers' orders):

    * predictor-corrector schedulers (UniPC) end with ``final_sigmas_type="sigma_min"``;
    * schedules whose last positive sigma is the training sigma_min (Karras/exponential/lu
      spacing, Euler/Heun linspace, DDIM leading) stop one ``step`` early (ending with
      ``"sigma_min"`` there would repeat sigma_min: a zero-length step that still costs a model
      evaluation, and that diffusers' DPM-Solver++ 3M turns into NaN);
    * otherwise ``final_sigmas_type="sigma_min"`` where the class takes it (DPM-Solver/UniPC
      linspace end with a step to sigma_min instead of 0);
    * flow schedules stop before their step to 0.
    """
    if end not in ENDS:
        raise ValueError(f"end must be one of {list(ENDS)}, got {end!r}")
    if end == "zero":
        return dict(config), False
    if _accepts(cls, "disable_corrector") and _accepts(cls, "final_sigmas_type"):
        # UniC corrects x_i with the model output at x_i inside the *next* step call: stopping
        # early would drop the last correction.  With "sigma_min" the last call applies it and
        # then steps to sigma_min (a zero-length step where the spacing already ends there).
        return {**config, "final_sigmas_type": "sigma_min"}, False
    probe = cls(**config)
    probe.set_timesteps(max(int(num_inference_steps), 2))
    sigmas = getattr(probe, "sigmas", None)
    if sigmas is None:  # DDIM: its timesteps end at t = 0 with the default spacings
        return dict(config), True
    last, before = float(sigmas[-1]), float(sigmas[-2])
    floor = _train_sigma_min(probe)
    if last > 0:  # already ends at sigma_min; a repeated sigma_min makes the last step a no-op
        return dict(config), before == last
    if floor is None or math.isclose(before, floor, rel_tol=1e-4) or not _accepts(cls, "final_sigmas_type"):
        return dict(config), True
    return {**config, "final_sigmas_type": "sigma_min"}, False


def steps_for_nfe(cls_name: str, nfe: int, skip_final_step: bool = False) -> int:
    """The most steps whose model evaluations fit in ``nfe``.

    Heun takes 2 per step but the last; a skipped final step saves one (both stages for Heun).
    """
    if cls_name == "HeunDiscreteScheduler":
        return max(1, nfe // 2 + 1) if skip_final_step else max(1, (nfe + 1) // 2)
    return nfe + 1 if skip_final_step else nfe


def _measure(make_scheduler, steps, skip, gmm, batch, seed, dtype, cache, device) -> dict:
    """One table cell: ``nfe``, ``error`` (None when the run fails or is not finite), ``sigma_end``, ``note``."""
    try:
        result = run_trajectory(make_scheduler(), gmm, steps, batch, seed, dtype, skip_final_step=skip, cache=cache,
                                device=device)
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return {"nfe": None, "error": None, "sigma_end": None, "note": f"{type(exc).__name__}: {exc}"[:200]}
    finite = math.isfinite(result.error)
    return {"nfe": result.nfe, "error": result.error if finite else None, "sigma_end": result.sigma_end,
            "note": None if finite else "non-finite result"}


def accuracy_table(
    schedulers=None,
    baselines=None,
    configs: Sequence = SOLVER_CONFIGS,
    spacings: Sequence[str] = tuple(SPACINGS),
    nfe_budgets: Sequence[int] = NFE_BUDGETS,
    end: str = "sigma_min",
    train_schedule: Optional[dict] = SD_TRAIN_SCHEDULE,
    gmm: Optional[GaussianMixture] = None,
    batch: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
    progress: Optional[Callable[[str], None]] = None,
) -> List[dict]:
    """Error against the exact ODE solution for every (configuration, spacing, NFE budget).

    ``schedulers``: module holding the classes to measure (default ``stepfuse.schedulers``);
    ``baselines``: module with the same class names, measured alongside (default ``diffusers``;
    ``False`` for none), built with ``from_config`` of the measured scheduler's config.  Classes
    missing from ``schedulers`` and spacings a class does not take are skipped.  ``end``: see
    :func:`measurement_setup`.  ``train_schedule`` is merged into every non-flow config.

    Returns one dict per row: ``label``, ``scheduler``, ``spacing``, ``config`` (as measured at
    the largest budget), ``nfe`` / ``errors`` / ``sigma_end`` (budget -> value; error None when
    the run failed, the reason in ``notes``), and with a baseline ``baseline_errors`` and
    ``max_rel_diff`` (largest relative difference over the budgets both finished).
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
        flow = "FlowMatch" in cls_name or base_config.get("use_flow_sigmas", False)
        for spacing in spacings:
            flag = SPACINGS[spacing]
            if flag is not None and not _accepts(cls, flag):
                continue
            config = {**({} if flow or not train_schedule else train_schedule), **base_config}
            if flag:
                config[flag] = True
            row = {"label": label, "scheduler": cls_name, "spacing": spacing, "config": config, "nfe": {},
                   "errors": {}, "sigma_end": {}, "notes": {}}
            if base_cls is not None:
                row["baseline_errors"] = {}
            for budget in nfe_budgets:
                run_config, skip = measurement_setup(cls, config, budget, end)
                steps = steps_for_nfe(cls_name, budget, skip)
                cell = _measure(lambda: cls(**run_config), steps, skip, gmm, batch, seed, dtype, cache, device)
                row["nfe"][budget], row["errors"][budget] = cell["nfe"], cell["error"]
                row["sigma_end"][budget] = cell["sigma_end"]
                if cell["note"]:
                    row["notes"][budget] = cell["note"]
                if base_cls is not None:
                    theirs = _measure(lambda: base_cls.from_config(cls(**run_config).config), steps, skip, gmm,
                                      batch, seed, dtype, cache, device)
                    row["baseline_errors"][budget] = theirs["error"]
                    if theirs["note"]:
                        row["notes"][f"baseline {budget}"] = theirs["note"]
                row["config"] = run_config
            if base_cls is not None:
                both = [b for b in nfe_budgets if row["errors"][b] is not None and row["baseline_errors"][b]]
                row["max_rel_diff"] = max(
                    (abs(row["errors"][b] - row["baseline_errors"][b]) / row["baseline_errors"][b] for b in both),
                    default=None,
                )
            rows.append(row)
            if progress:
                progress(f"{label} [{spacing}]: " + " ".join(_fmt(row["errors"][b]) for b in nfe_budgets))
    return rows


def _fmt(value: Optional[float]) -> str:
    return "fail" if value is None else f"{value:.2e}"


def format_rows(rows: List[dict], nfe_budgets: Sequence[int] = NFE_BUDGETS) -> tuple:
    """``(table_rows, columns)`` for a text table: one row per configuration, one column per NFE.

    A cell whose run used fewer evaluations than the budget (Heun: 2 per step) is marked ``*``.
    """
    columns = ["config", "spacing", *map(str, nfe_budgets), "sigma_end", "vs diffusers"]
    table = []
    for row in rows:
        cells = {"config": row["label"], "spacing": row["spacing"]}
        for b in nfe_budgets:
            used = row["nfe"].get(b)
            cells[str(b)] = _fmt(row["errors"].get(b)) + ("*" if used is not None and used < b else "")
        ends = {round(v, 4) for v in row["sigma_end"].values() if v is not None}
        cells["sigma_end"] = "/".join(f"{e:g}" for e in sorted(ends)) or "-"
        diff = row.get("max_rel_diff")
        cells["vs diffusers"] = "-" if diff is None else f"{diff:.1e}"
        table.append(cells)
    return table, columns


def plot_accuracy(rows: List[dict], path, title: Optional[str] = None) -> None:
    """Log-log error vs NFE, one panel per spacing, one line per configuration (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    spacings = list(dict.fromkeys(r["spacing"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cmap = plt.get_cmap("tab20")
    colors = {label: cmap(i % 20) for i, label in enumerate(labels)}
    cols = min(2, len(spacings))
    nrows = math.ceil(len(spacings) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 5 * nrows), squeeze=False, sharex=True, sharey=True)
    for ax, spacing in zip(axes.flat, spacings):
        for row in (r for r in rows if r["spacing"] == spacing):
            points = sorted((row["nfe"][b], row["errors"][b]) for b in row["errors"] if row["errors"][b] is not None)
            if not points:
                continue
            single_step = row["scheduler"] in ("HeunDiscreteScheduler",)
            ax.loglog(*zip(*points), "--" if single_step else "-", marker="o", ms=3, color=colors[row["label"]],
                      label=row["label"])
        ticks = sorted({int(b) for r in rows for b in r["errors"]})  # the budgets; Heun's odd NFE fall between
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.tick_params(labelbottom=True)
        ax.set_title(f"spacing: {spacing}")
        ax.set_xlabel("NFE (model evaluations)")
        ax.set_ylabel("RMS error vs exact ODE solution")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(spacings):]:
        ax.axis("off")
    fig.suptitle(title or "Solver error on an analytic Gaussian mixture (perfect model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
