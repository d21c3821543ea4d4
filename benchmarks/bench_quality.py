"""Sample quality against NFE of stepfuse's solvers on every bundled model (CPU or GPU).

For each bundled model, every solver samples the same class-conditional digits from the same
initial noise with classifier-free guidance, at each NFE budget, next to the diffusers baseline
(50 DDIM steps, or 50 flow-matching Euler steps).  Scores: class accuracy, Fréchet distance to
held-out real digits in the digit classifier's feature space, and PSNR to a 200-step UniPC
reference run from the same noise.  Writes a table per model, JSON, and a quality-vs-NFE plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, device_tag, format_table, write_results  # noqa: E402

from stepfuse import models  # noqa: E402
from stepfuse.demo import SOLVERS, RunSpec, compare  # noqa: E402

COLUMNS = ["solver", "steps", "nfe", "seconds", "accuracy", "fd", "psnr"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(14, 3.6 * len(results)), squeeze=False)
    for r, (model, report) in enumerate(results.items()):
        rows = [row for row in report["rows"] if row["role"] != "baseline"]
        base = next(row for row in report["rows"] if row["role"] == "baseline")
        for c, (key, label) in enumerate([("accuracy", "class accuracy"), ("fd", "Fréchet distance"),
                                          ("psnr", "PSNR to reference (dB)")]):
            ax = axes[r][c]
            for solver in dict.fromkeys(row["solver"] for row in rows):
                pts = [(row["nfe"], row[key]) for row in rows if row["solver"] == solver]
                ax.plot(*zip(*pts), marker="o", label=solver, color=f"C{list(SOLVERS).index(solver)}")
            ax.axhline(base[key], color="black", ls="--", lw=1, label=f"diffusers {base['solver']} {base['steps']}")
            ax.set_xscale("log")
            ax.set_xlabel("NFE")
            ax.set_title(f"{model}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
            if key == "fd":
                ax.set_yscale("log")
        axes[r][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="bundled models (default: all)")
    p.add_argument("--solvers", nargs="+", default=["DPM++ 2M", "UniPC", "Euler"], choices=list(SOLVERS))
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 8, 10, 15, 20, 30, 50])
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--reference-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.nfe, args.samples_per_class, args.reference_steps = args.nfe[:2], 1, 20
    device = torch.device(args.device)
    results = {}
    for model in args.models or models.list():
        runs = [RunSpec(solver, n) for solver in args.solvers for n in args.nfe]
        report = compare(model, runs=runs, reference=RunSpec("UniPC", args.reference_steps),
                         samples_per_class=args.samples_per_class, guidance_scale=args.guidance_scale,
                         seed=args.seed, device=str(device), progress=False)
        report.pop("_grid"), report.pop("_labels")
        results[model] = report
        print(f"\n{model} (guidance {args.guidance_scale}, {report['samples']} samples; reference "
              f"{report['reference']['name']}: accuracy {report['reference']['accuracy']:.3f}, fd "
              f"{report['reference']['fd']:.2f}; held-out real digits: accuracy "
              f"{report['real_heldout']['accuracy']:.3f}, fd between held-out halves {report['real_heldout']['fd']:.2f})")
        print(format_table(report["rows"], ["name", *COLUMNS[2:]]))
    name = "bench_quality" + ("_quick" if args.quick else "")
    path = write_results(args.out, name, device, {"args": {k: str(v) for k, v in vars(args).items()},
                                                   "models": results})
    plot(results, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png')} ({device_tag(device)})")


if __name__ == "__main__":
    main()
