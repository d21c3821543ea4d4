"""``stepfuse demo``: speed and quality of fast samplers on a bundled model, against diffusers.

A diffusers baseline (50 DDIM steps, or 50 flow-matching Euler steps for the flow model, with
classifier-free guidance) and stepfuse's solvers at 5-20 steps sample the same digits from the same
initial noise.  Each run is scored for class accuracy and Fréchet distance to held-out real digits
(``stepfuse.metrics``) and for PSNR to a reference run (same noise, a high-NFE solver).  Cache rows
add a training-free feature cache (``stepfuse.cache``) to a stepfuse solver and report the fraction
of block evaluations it skipped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

# solver label -> (VP scheduler class, flow scheduler class, config overrides for flow models)
_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
SOLVERS = {
    "DDIM": ("DDIMScheduler", None, {}),
    "Euler": ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", _FLOW),
    "UniPC": ("UniPCMultistepScheduler", "UniPCMultistepScheduler", _FLOW),
}


# accelerate() solver name of each label.
_ACCELERATE_SOLVERS = {"DDIM": "ddim", "Euler": "euler", "DPM++ 2M": "dpmpp_2m", "UniPC": "unipc"}

# Guidance variants of the demo's rows, built from the run's guidance scale and whether the
# model is a flow-matching one (stepfuse.guidance).  "interval" guides only the first 40% of
# the steps (the high-noise ones, where the class is decided) and skips the unconditional pass
# on the rest.  CFG-Zero*'s zero-init step is a zero velocity: it only means "stay" for flow
# models (a zero epsilon would rescale the sample), so VP models get the optimised scale alone.
GUIDANCES = {
    "cfg": lambda scale, flow: None,  # the pipeline call's own classifier-free guidance
    "interval": lambda scale, flow: _guidance().ClassifierFreeGuidance(scale, stop=0.4),
    "cfg-zero*": lambda scale, flow: _guidance().ClassifierFreeZeroStarGuidance(scale, zero_init_steps=int(flow)),
    "apg": lambda scale, flow: _guidance().AdaptiveProjectedGuidance(scale, eta=0.0),
}


def _guidance():
    from . import guidance

    return guidance


def _cache():
    from . import cache

    return cache


# Feature-cache rows (stepfuse.cache), installed with stepfuse.accelerate(pipe, cache=...).  The
# block caches serve transformers (digits-dit, digits-dit-flow), DeepCache serves UNets.  Checked
# with DPM++ 2M at 20 steps, guidance 2.0, against the uncached run from the same noise: DeepCache
# on digits-unet skips 43% of block evaluations at 37.6 dB; on digits-dit (30 samples) first-block
# skips 33% at 40.2 dB and TeaCache 50% at 40.5 dB (threshold 0.2 would skip 70% at 31.9 dB).
# FirstBlockCache pools the batch ("mean"): with "all", the sample that changed most decides for
# the whole batch, and the demo's batch is large.  TeaCache uses the raw relative L1 change of the
# modulated input, without the rescaling polynomial: fitting one (stepfuse.cache.calibrate) would
# cost extra uncached runs in every demo.
CACHES = {
    "none": lambda: None,
    "first-block": lambda: _cache().FirstBlockCache(threshold=0.08, batch_decision="mean"),
    "dual-block": lambda: _cache().DualBlockCache(front_blocks=1, back_blocks=1, threshold=0.12, batch_decision="mean"),
    "teacache": lambda: _cache().TeaCache(threshold=0.1),
    "taylorseer": lambda: _cache().TaylorSeer(order=1, interval=3, front_blocks=1, back_blocks=1),
    "fora": lambda: _cache().StaticCache(preset="fora-2", front_blocks=1, back_blocks=1),
    "deepcache": lambda: _cache().DeepCache(interval=3, branch=0, cooldown_steps=1),
}

# The cache rows of the default comparison, per denoiser kind (a policy serves one kind only).
DEFAULT_CACHES = {"unet": ("deepcache",), "transformer": ("first-block", "teacache")}


def denoiser_kind(model: str) -> str:
    """``"unet"`` or ``"transformer"``: which denoiser the bundled ``model`` has (read from its
    ``model_index.json``, without loading the weights)."""
    from . import models

    components = json.loads((models.path(model) / "model_index.json").read_text())
    return "unet" if (components.get("unet") or [None])[0] else "transformer"


def _serves(cache: str, kind: str) -> bool:
    policy = CACHES[cache]()
    return policy is None or (policy.family == "unet") == (kind == "unet")


def check_cache(cache: str, kind: str) -> None:
    """Raise ValueError unless ``cache`` is a key of CACHES whose policy serves a ``kind``
    (``"unet"`` or ``"transformer"``) denoiser."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {sorted(CACHES)}, got {cache!r}")
    if not _serves(cache, kind):
        raise ValueError(f"cache {cache!r} ({type(CACHES[cache]()).__name__}) does not serve a {kind} denoiser; "
                         f"use one of {[name for name in CACHES if name != 'none' and _serves(name, kind)]}")


@dataclass
class RunSpec:
    """One sampler configuration of a comparison."""

    solver: str
    steps: int
    library: str = "stepfuse"  # or "diffusers"
    overrides: Dict = field(default_factory=dict)
    guidance: str = "cfg"  # a key of GUIDANCES (stepfuse runs)
    cache: str = "none"  # a key of CACHES (stepfuse runs)

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {sorted(GUIDANCES)}, got {self.guidance!r}")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {sorted(CACHES)}, got {self.cache!r}")
        if (self.guidance != "cfg" or self.cache != "none") and self.library != "stepfuse":
            raise ValueError("guidance variants and caches run through stepfuse's loop: use library='stepfuse'")

    @property
    def name(self) -> str:
        name = f"{self.library} {self.solver} {self.steps}"
        name = name if self.guidance == "cfg" else f"{name} {self.guidance}"
        return name if self.cache == "none" else f"{name} +{self.cache}"

    @property
    def nfe(self) -> int:
        """Model evaluations per sample: every solver in SOLVERS calls the model once per step
        (CFG's doubled batch counts once, as in the literature; a cached call still counts)."""
        return self.steps


def is_flow(pipe) -> bool:
    """Whether the pipeline's shipped scheduler is a flow-matching one."""
    return "FlowMatch" in type(pipe.scheduler).__name__ or "shift" in pipe.scheduler.config and "beta_start" not in pipe.scheduler.config


def make_scheduler(base_config, solver: str, flow: bool, library: str = "stepfuse", **overrides):
    """The scheduler ``solver`` from ``library`` configured from a model's shipped scheduler config."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    if library not in ("stepfuse", "diffusers"):
        raise ValueError(f"library must be 'stepfuse' or 'diffusers', got {library!r}")
    vp_name, flow_name, flow_overrides = SOLVERS[solver]
    class_name = flow_name if flow else vp_name
    if class_name is None:
        raise ValueError(f"{solver} has no flow-matching form")
    if library == "stepfuse":
        from . import schedulers as module
    else:
        import diffusers as module
    config = dict(base_config)
    if flow and class_name != "FlowMatchEulerDiscreteScheduler":
        config = {**config, **flow_overrides, "flow_shift": config.get("shift", 1.0)}
    return getattr(module, class_name).from_config(config, **overrides)


def sample(pipe, spec: RunSpec, base_config, labels: torch.Tensor, latents: torch.Tensor, guidance_scale: float,
           flow: bool, progress: bool = True) -> tuple:
    """Run ``pipe`` with the scheduler of ``spec``; returns (images in [0, 1], seconds, fraction of
    block evaluations the cache skipped: 0 without one).

    diffusers runs use the pipeline's own loop with diffusers' scheduler; stepfuse runs go through
    ``stepfuse.accelerate`` (the stepfuse loop, guidance fused into each step, the cache installed).
    """
    from .integrations.accelerate import accelerate, restore

    pipe.scheduler = make_scheduler(base_config, spec.solver, flow, "diffusers")
    pipe.set_progress_bar_config(disable=not progress, desc=f"{spec.name:>24}", leave=True)
    cache = CACHES[spec.cache]()
    if spec.library == "stepfuse":
        accelerate(pipe, _ACCELERATE_SOLVERS[spec.solver], guidance=GUIDANCES[spec.guidance](guidance_scale, flow),
                   cache=cache, **spec.overrides)
    elif spec.overrides:
        pipe.scheduler = make_scheduler(base_config, spec.solver, flow, "diffusers", **spec.overrides)
    try:
        start = time.perf_counter()
        images = pipe(labels.tolist(), num_inference_steps=spec.steps, guidance_scale=guidance_scale,
                      latents=latents.clone(), output_type="pt").images
        seconds = time.perf_counter() - start
        # restore() below removes the cache and its counters: read them first.
        skipped = _cache().stats(pipe.denoiser).skipped_fraction if cache is not None else 0.0
        return images, seconds, skipped
    finally:
        if spec.library == "stepfuse":
            restore(pipe)


def compare(
    model: str = "digits-unet",
    runs: Optional[Sequence[RunSpec]] = None,
    baseline_solver: Optional[str] = None,
    baseline_steps: int = 50,
    reference: Optional[RunSpec] = None,
    samples_per_class: int = 8,
    guidance_scale: float = 2.0,
    seed: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Sample every run from the same noise and score it; returns the report dictionary.

    The baseline is diffusers' ``baseline_solver`` (default DDIM, or Euler for flow models) at
    ``baseline_steps``; ``runs`` default to stepfuse's UniPC and DPM++ 2M at 5, 8, 10 and 20 steps,
    DPM++ 2M at 10 steps under each guidance variant, and DPM++ 2M at 20 steps with each of the
    model's ``DEFAULT_CACHES`` (next to its uncached 20-step row).
    """
    from . import models
    from .metrics import DigitMetrics

    kind = denoiser_kind(model)
    runs = None if runs is None else list(runs)
    for spec in (runs or []) + ([reference] if reference is not None else []):
        check_cache(spec.cache, kind)
    pipe = models.load(model, device=device)
    flow = is_flow(pipe)
    base_config = pipe.scheduler.config
    baseline = RunSpec(baseline_solver or ("Euler" if flow else "DDIM"), baseline_steps, "diffusers")
    reference = reference or RunSpec("UniPC", 100, "stepfuse")
    if runs is None:
        runs = [RunSpec(s, n) for s in ("UniPC", "DPM++ 2M") for n in (5, 8, 10, 20)]
        runs += [RunSpec("DPM++ 2M", 10, guidance=g) for g in GUIDANCES if g != "cfg"]
        runs += [RunSpec("DPM++ 2M", 20, cache=c) for c in DEFAULT_CACHES[kind]]

    labels = torch.arange(10).repeat_interleave(samples_per_class)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn((labels.numel(), *pipe.sample_shape), generator=gen)
    metrics = DigitMetrics(device=device)

    # One warm-up call per library so one-time costs (lazy imports, first kernel launch) are not timed.
    for lib in ("diffusers", "stepfuse"):
        sample(pipe, RunSpec(baseline.solver, 2, lib), base_config, labels[:2], latents[:2], guidance_scale, flow, False)

    log(f"reference: {reference.name} steps")
    ref_images = sample(pipe, reference, base_config, labels, latents, guidance_scale, flow, progress)[0]
    rows = []
    grid = {"reference": ref_images}
    for role, spec in [("baseline", baseline)] + [("stepfuse", r) for r in runs]:
        images, seconds, skipped = sample(pipe, spec, base_config, labels, latents, guidance_scale, flow, progress)
        scores = metrics(images, labels, reference=ref_images)
        rows.append({"name": spec.name, "role": role, **asdict(spec), "nfe": spec.nfe, "skipped": round(skipped, 3),
                     "seconds": round(seconds, 3), **{k: round(v, 5) for k, v in scores.items()}})
        grid[spec.name] = images
    base_seconds = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = round(base_seconds / row["seconds"], 2)
    real = metrics.real_baseline()
    return {
        "model": model, "flow": flow, "guidance_scale": guidance_scale, "samples": int(labels.numel()),
        "seed": seed, "device": str(pipe.device), "threads": torch.get_num_threads(),
        "reference": {**asdict(reference), "name": reference.name,
                      **{k: round(v, 5) for k, v in metrics(ref_images, labels).items()}},
        "real_heldout": {k: round(v, 5) for k, v in real.items()},
        "rows": rows, "_grid": grid, "_labels": labels,
    }


COLUMNS = ["name", "nfe", "skipped", "seconds", "speedup", "accuracy", "fd", "psnr"]


def format_table(rows: List[dict], columns: Sequence[str] = COLUMNS) -> str:
    cells = [[f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    just = [str.ljust if c == "name" else str.rjust for c in columns]
    lines = ["  ".join(j(v, w) for j, v, w in zip(just, columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(j(v, w) for j, v, w in zip(just, row, widths)) for row in cells]
    return "\n".join(lines)


def plot_grid(grid: Dict[str, torch.Tensor], labels: torch.Tensor, path: Path, per_class: int = 1) -> None:
    """One row per run, the first ``per_class`` samples of every digit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
    fig, axes = plt.subplots(len(grid), len(picks), figsize=(0.6 * len(picks) + 2.2, 0.62 * len(grid)),
                             squeeze=False)
    for r, (name, images) in enumerate(grid.items()):
        for c, idx in enumerate(picks.tolist()):
            ax = axes[r][c]
            ax.imshow(images[idx, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.22, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scatter(rows: List[dict], path: Path, title: str) -> None:
    """Fréchet distance and PSNR against wall time, one point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in [(axes[0], "fd", "Fréchet distance to real digits (lower is better)"),
                           (axes[1], "psnr", "PSNR to reference run, dB (higher is better)")]:
        for row in rows:
            marker, color = ("*", "black") if row["role"] == "baseline" else ("o", f"C{list(SOLVERS).index(row['solver'])}")
            ax.scatter(row["seconds"], row[key], marker=marker, color=color, s=90 if marker == "*" else 40)
            ax.annotate(row["name"].split(" ", 1)[1], (row["seconds"], row[key]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("wall time (s, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path) -> Dict[str, Path]:
    """report.json, report.md, grid.png and speed_quality.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    grid, labels = report.pop("_grid"), report.pop("_labels")
    paths = {"json": out / "report.json", "md": out / "report.md", "grid": out / "grid.png",
             "scatter": out / "speed_quality.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    table = format_table(report["rows"])
    ref, real = report["reference"], report["real_heldout"]
    paths["md"].write_text(
        f"# stepfuse demo: {report['model']}\n\n"
        f"{report['samples']} class-conditional samples (every digit equally often), guidance scale "
        f"{report['guidance_scale']}, the same initial noise for every run, on {report['device']} "
        f"({report['threads']} threads).  *speedup* is the baseline's wall time over the run's; *accuracy* "
        f"is the digit classifier's agreement with the requested label; *fd* is the Fréchet distance to "
        f"held-out real digits in the classifier's feature space; *skipped* is the fraction of block "
        f"evaluations a feature cache (rows named +cache) reused instead of running; *psnr* (dB) is "
        f"against the reference run ({ref['name']} steps; accuracy {ref['accuracy']:.3f}, fd {ref['fd']:.2f}).  Real digits score accuracy "
        f"{real['accuracy']:.3f} (held-out set) and fd {real['fd']:.2f} (two disjoint held-out halves of "
        f"{real['fd_samples']}).\n\n```\n{table}\n```\n\n"
        f"![samples](grid.png)\n\n![speed and quality](speed_quality.png)\n"
    )
    plot_grid(grid, labels, paths["grid"])
    plot_scatter(report["rows"], paths["scatter"], f"{report['model']}: speed and quality")
    return paths
