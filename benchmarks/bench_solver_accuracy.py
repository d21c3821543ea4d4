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

Optimised plans (``--plans``, on by default): stepfuse's plans (``stepfuse.plans``: DP-optimal and
searched schedules, D-ODE scales, exposure-bias time shift) fitted on a calibration batch and
measured on the table's held-out start states, against the best diffusers configuration of the
table at the same NFE and at NFE 20 (end = zero).  ``--models`` repeats that on the bundled
digit models: PSNR to a 200-NFE reference from the same noise, class accuracy and Frechet
distance (``stepfuse.metrics``), against diffusers' schedulers in the same pipeline.

    python benchmarks/bench_solver_accuracy.py [--quick] [--end sigma_min|zero|both] [--no-plans]
        [--models digits-unet digits-dit] [--out DIR]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import math

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, device_tag, format_table, write_results  # noqa: E402

from model_plans import fitted_plans, model_plans  # noqa: E402

from stepfuse import plans  # noqa: E402

from stepfuse.testing.accuracy import (  # noqa: E402
    ENDS,
    NFE_BUDGETS,
    SD_TRAIN_SCHEDULE,
    SOLVER_CONFIGS,
    SPACINGS,
    _start_state,
    accuracy_table,
    default_gmm,
    format_rows,
    plot_accuracy,
)

QUICK_BUDGETS = (4, 10, 20)
QUICK_SPACINGS = ("default", "karras")
PLAN_BUDGETS = (5, 8)
PLAN_SOLVERS = ("dpmpp_2m", "dpmpp_3m", "lms")
# Stable Diffusion's training schedule ends (the table's rows integrate from/to these).
SD_SIGMA_MAX, SD_SIGMA_MIN = 14.614641, 0.029167


def best_baseline(rows, budget: int) -> tuple:
    """The smallest diffusers error at ``budget`` and the row it came from."""
    best = (math.inf, "")
    for r in rows:
        err = r.get("baseline_errors", {}).get(budget)
        if err is not None and r["nfe"].get(budget) == budget and err < best[0]:
            best = (err, f"{r['label']} [{r['spacing']}]")
    return best


def gmm_plans(rows, batch: int, search: int, evolve: int, progress) -> dict:
    """Plans on the Gaussian mixture, measured like the table (same start states, end = zero)."""
    gmm = default_gmm()
    x0, eps = _start_state(gmm, 512, 1)
    calibration = (x0 + SD_SIGMA_MAX * eps).float()
    x0, eps = _start_state(gmm, batch, 0)  # the table's start states
    x = (x0 + SD_SIGMA_MAX * eps)
    reference = gmm.ode_solution(x, SD_SIGMA_MAX, 0.0)
    result = {"baselines": {b: best_baseline(rows, b) for b in (*PLAN_BUDGETS, 20)}, "plans": {}}
    for k in PLAN_BUDGETS:
        entries = []
        for label, solver, plan in fitted_plans(gmm.denoise, calibration, k, SD_SIGMA_MIN, SD_SIGMA_MAX,
                                                PLAN_SOLVERS, search, progress=progress, evolve=evolve):
            out = plans.run_plan(gmm.denoise, x.float(), plan, solver).double()
            entries.append({"label": label, "error": float((out - reference).square().mean().sqrt()),
                            "plan": plan.to_dict()})
        result["plans"][k] = entries
    return result


def print_plan_summary(title: str, result: dict, key: str, better) -> None:
    print(f"\n{title}")
    table = []
    for k, entries in result["plans"].items():
        base_k, base_20 = result["baselines"][k], result["baselines"][20]
        for e in entries:
            table.append({"nfe": str(k), "plan": e["label"], key: f"{e[key]:.4g}",
                          "diffusers best @nfe": f"{base_k[0]:.4g}", "diffusers best @20": f"{base_20[0]:.4g}"})
        best = min(entries, key=lambda e: e[key] if better == "lower" else -e[key])
        print(f"  NFE {k}: best plan {best['label']} {key} {best[key]:.4g}; diffusers best at NFE {k}: "
              f"{base_k[0]:.4g} ({base_k[1]}), at NFE 20: {base_20[0]:.4g} ({base_20[1]})")
    print(format_table(table, ["nfe", "plan", key, "diffusers best @nfe", "diffusers best @20"]))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--end", choices=[*ENDS, "both"], default="both", help="where runs are compared")
    parser.add_argument("--batch", type=int, default=128, help="trajectories per run")
    parser.add_argument("--no-plans", dest="plans", action="store_false", help="skip the optimised plans")
    parser.add_argument("--search", type=int, default=600, help="schedule-search evaluations per plan")
    parser.add_argument("--evolve", type=int, default=40000,
                        help="CMA-ES evaluations per Gaussian-mixture plan (levels + d-ode + shifts); 0 skips it")
    parser.add_argument("--models", nargs="*", default=[], help="bundled models to measure plans on")
    parser.add_argument("--keep-models", action="store_true",
                        help="without --models, keep the model plans of the earlier results file")
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

    extra = {}
    if args.plans and "zero" in tables:
        extra["gmm_plans"] = gmm_plans(tables["zero"]["rows"], args.batch, args.search, args.evolve,
                                       lambda line: print("  " + line, file=sys.stderr, flush=True))
        print_plan_summary("Optimised plans on the Gaussian mixture: RMS error vs exact ODE solution (end = zero)",
                           extra["gmm_plans"], "error", "lower")
    if args.models:
        extra["model_plans"] = {name: model_plans(name, args.search // 4, quick=args.quick) for name in args.models}
    elif args.keep_models:
        earlier = Path(args.out) / device_tag(device) / ("solver_accuracy" + ("_quick" if args.quick else "") + ".json")
        if earlier.exists():  # JSON made the NFE keys strings
            extra["model_plans"] = {
                name: {metric: {part: {int(k): v for k, v in table.items()} for part, table in result.items()}
                       for metric, result in per_metric.items()}
                for name, per_metric in json.loads(earlier.read_text()).get("model_plans", {}).items()}
    for name, result in extra.get("model_plans", {}).items():
        for metric, better in (("psnr", "higher"), ("accuracy", "higher"), ("fd", "lower")):
            print_plan_summary(f"Optimised plans on {name}: {metric}", result[metric], metric, better)

    payload = {
        "benchmark": "solver_accuracy",
        "nfe_budgets": list(budgets),
        "spacings": list(spacings),
        "train_schedule": SD_TRAIN_SCHEDULE,
        "configs": [{"label": label, "scheduler": name, "config": config} for label, name, config in SOLVER_CONFIGS],
        "batch": args.batch,
        "quick": args.quick,
        "tables": tables,
        **extra,
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
