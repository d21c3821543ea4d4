"""Accuracy of every drop-in solver against the exact ODE solution, per NFE budget.

A perfect model (the exact denoiser of an analytic 2-D Gaussian mixture, ``stepfuse.testing``)
drives each scheduler configuration from exact samples of p at sigma_max; the table gives the
RMS distance to the float64 probability-flow ODE solution from the same start, for NFE budgets
4..50 and each step spacing the scheduler supports.  Non-flow schedulers all use Stable
Diffusion's training schedule (scaled_linear 0.00085..0.012), so rows integrate the same ODE.
diffusers' scheduler runs alongside: "vs diffusers" is the largest relative difference in error.

Two end points (``--end``):
  sigma_min  the integration down to sigma_min = 0.029, without the final jump to 0 (the solver's
             own error: see stepfuse.testing.accuracy.measurement_setup);
  zero       the pipeline's output at sigma = 0; every row then shares the error of the final
             jump from sigma_min, D(x, sigma_min) - x(0) = O(sigma_min^2), a floor near 6e-4 here.

    python benchmarks/bench_solver_accuracy.py [--quick] [--end sigma_min|zero|both] [--out DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, format_table, write_results  # noqa: E402

from stepfuse.testing.accuracy import (  # noqa: E402
    ENDS,
    NFE_BUDGETS,
    SD_TRAIN_SCHEDULE,
    SOLVER_CONFIGS,
    SPACINGS,
    accuracy_table,
    format_rows,
    plot_accuracy,
)

QUICK_BUDGETS = (4, 10, 20)
QUICK_SPACINGS = ("default", "karras")


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--end", choices=[*ENDS, "both"], default="both", help="where runs are compared")
    parser.add_argument("--batch", type=int, default=128, help="trajectories per run")
    args = parser.parse_args()
    device = torch.device(args.device)
    budgets = QUICK_BUDGETS if args.quick else NFE_BUDGETS
    spacings = QUICK_SPACINGS if args.quick else tuple(SPACINGS)
    ends = ENDS if args.end == "both" else (args.end,)

    tables, plots = {}, {}
    for end in ends:
        start = time.perf_counter()
        rows = accuracy_table(spacings=spacings, nfe_budgets=budgets, end=end, batch=args.batch, device=device,
                              progress=lambda line: print("  " + line, file=sys.stderr, flush=True))
        elapsed = time.perf_counter() - start
        table, columns = format_rows(rows, budgets)
        print(f"\nRMS error vs exact ODE solution, end = {end} ({elapsed:.1f} s); columns = NFE budget"
              " (* = fewer evaluations used: Heun takes 2 per step)")
        print(format_table(table, columns))
        failures = {}
        for r in rows:
            for key, note in r["notes"].items():
                who, budget = ("diffusers", key.split()[1]) if str(key).startswith("baseline") else ("stepfuse", key)
                failures.setdefault((r["label"], r["spacing"], who, note), []).append(str(budget))
        for (label, spacing, who, note), failed_budgets in failures.items():
            print(f"  {label} [{spacing}]: {who} {note} at NFE {', '.join(failed_budgets)}")
        tables[end] = {"rows": rows, "seconds": elapsed}

    payload = {
        "benchmark": "solver_accuracy",
        "nfe_budgets": list(budgets),
        "spacings": list(spacings),
        "train_schedule": SD_TRAIN_SCHEDULE,
        "configs": [{"label": label, "scheduler": name, "config": config} for label, name, config in SOLVER_CONFIGS],
        "batch": args.batch,
        "quick": args.quick,
        "tables": tables,
    }
    path = write_results(args.out, "solver_accuracy" + ("_quick" if args.quick else ""), device, payload)
    for end in ends:
        plots[end] = path.parent / f"{path.stem}_{end}.png"
        plot_accuracy(tables[end]["rows"], plots[end],
                      title=f"Solver error vs exact ODE solution on a 2-D Gaussian mixture (end: {end})")
    print(f"\nwrote {path}")
    for plot in plots.values():
        print(f"wrote {plot}")


if __name__ == "__main__":
    main()
