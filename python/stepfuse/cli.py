"""The ``stepfuse`` command: ``info``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from . import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "ops":
            value = ", ".join(value) or "(none)"
        print(f"{key.ljust(width)}  {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Speed/quality comparison on a bundled model: table, report, image grid and scatter plot."""
    from .demo import DEFAULT_CACHES, RunSpec, check_cache, compare, denoiser_kind, format_table, write_report

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    runs = [RunSpec(solver, steps) for solver in args.solvers for steps in args.steps]
    runs += [RunSpec(args.guidance_solver, args.guidance_steps, guidance=g) for g in args.guidance]
    kind = denoiser_kind(args.model)
    caches = DEFAULT_CACHES[kind] if args.cache is None else args.cache
    try:
        for cache in caches:
            check_cache(cache, kind)
    except ValueError as e:
        print(f"stepfuse demo: argument --cache: {e}", file=sys.stderr)
        return 2
    runs += [RunSpec(args.cache_solver, args.cache_steps, cache=c) for c in caches if c != "none"]
    report = compare(
        model=args.model, runs=runs, baseline_solver=args.baseline, baseline_steps=args.baseline_steps,
        reference=RunSpec("UniPC", args.reference_steps), samples_per_class=args.samples_per_class,
        guidance_scale=args.guidance_scale, seed=args.seed, device=args.device, progress=not args.no_progress,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    paths = write_report(report, Path(args.out))
    print(format_table(report["rows"]))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _benchmark_dirs() -> list:
    """Installed benchmark scripts first, then a source checkout's ``benchmarks/``."""
    here = Path(__file__).resolve().parent
    return [d for d in (here / "_benchmarks", here.parents[1] / "benchmarks") if d.is_dir()]


def benchmarks() -> dict:
    """Benchmark name (``solver-step``) -> script path (``bench_solver_step.py``)."""
    found = {}
    for folder in _benchmark_dirs():
        for script in sorted(folder.glob("bench_*.py")):
            found.setdefault(script.stem[len("bench_"):].replace("_", "-"), script)
    return found


def _bench(args: argparse.Namespace) -> int:
    import subprocess

    available = benchmarks()
    if args.list or not args.name:
        if not available:
            print("no benchmark scripts found (looked in: " + ", ".join(map(str, _benchmark_dirs())) + ")")
            return 1
        for name, script in available.items():
            doc = ast.get_docstring(ast.parse(script.read_text())) or ""
            print(f"{name:20s} {doc.splitlines()[0] if doc else ''}")
        return 0
    if args.name not in available:
        print(f"stepfuse bench: unknown benchmark {args.name!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    command = [sys.executable, str(available[args.name]), *args.passthrough, "--out", str(Path(args.out).resolve())]
    print("+ " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.call(command)


def main(argv=None) -> int:
    from .demo import CACHES, DEFAULT_CACHES

    parser = argparse.ArgumentParser(prog="stepfuse", description="Fused training-free fast sampling for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, compiled backends and registered ops")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)
    p = sub.add_parser("demo", help="fast solvers against a diffusers baseline on a bundled model: speed and quality")
    p.add_argument("--out", default="stepfuse-demo", help="output folder (default: ./stepfuse-demo)")
    p.add_argument("--model", default="digits-unet", help="bundled model (see stepfuse.models.list())")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 8, 10, 20], help="stepfuse step counts")
    p.add_argument("--solvers", nargs="+", default=["UniPC", "DPM++ 2M"], help="stepfuse solvers")
    p.add_argument("--baseline", default=None, help="diffusers baseline solver (default: DDIM, or Euler for flow)")
    p.add_argument("--baseline-steps", type=int, default=50)
    p.add_argument("--reference-steps", type=int, default=100, help="steps of the UniPC reference run")
    p.add_argument("--samples-per-class", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--guidance", nargs="*", default=["interval", "cfg-zero*", "apg"],
                   help="guidance-variant rows (of interval, cfg-zero*, apg; none: no such rows)")
    p.add_argument("--guidance-solver", default="DPM++ 2M", help="solver of the guidance-variant rows")
    p.add_argument("--guidance-steps", type=int, default=10, help="steps of the guidance-variant rows")
    p.add_argument("--cache", nargs="+", choices=list(CACHES), default=None, metavar="NAME",
                   help="feature-cache rows (of " + ", ".join(CACHES) + "; none: no such rows; default: "
                        + "; ".join(f"{' '.join(v)} for a {k}" for k, v in DEFAULT_CACHES.items()) + ")")
    p.add_argument("--cache-solver", default="DPM++ 2M", help="solver of the feature-cache rows")
    p.add_argument("--cache-steps", type=int, default=20, help="steps of the feature-cache rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_demo)
    p = sub.add_parser("bench", help="run a benchmark script by name; other options pass through to it")
    p.add_argument("name", nargs="?", help="benchmark name (see --list)")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.add_argument("--out", default="stepfuse-bench", help="results folder (default: ./stepfuse-bench)")
    p.set_defaults(func=_bench)
    # Only `bench` forwards unknown options (to the benchmark script it runs).
    args, passthrough = parser.parse_known_args(argv)
    args.passthrough = passthrough
    if args.func is not _bench and args.passthrough:
        parser.error("unrecognized arguments: " + " ".join(args.passthrough))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
