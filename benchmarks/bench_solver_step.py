"""Per-step cost of stepfuse's drop-in schedulers against diffusers' originals.

Both run the same trajectory (``set_timesteps(steps)`` then ``step()`` on a fixed model
output, as a pipeline calls it with ``return_dict=False``); the time per step includes
the Python work a user pays per step (``scale_model_input`` + ``step``; for stepfuse also
building the plan at the first step).
Effective GB/s counts the bytes the fused step must move (inputs read once, outputs
written once).  ``kernel_*`` columns time the fused op alone on a mid-trajectory
program; on a GPU its bandwidth is also given as a share of the measured copy bandwidth.

    python benchmarks/bench_solver_step.py [--device cuda] [--shapes sdxl wan] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES, SHAPES, base_parser, copy_bandwidth, device_time, format_table, synchronize, write_results,
)

import diffusers  # noqa: E402

import stepfuse.schedulers as sf  # noqa: E402
from stepfuse.ops import solver_step  # noqa: E402

# (label, class name, config): the configurations users run most.
SCHEDULERS = [
    ("dpmsolver++ 2M", "DPMSolverMultistepScheduler", {"solver_order": 2}),
    ("dpmsolver++ 3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("sde-dpmsolver++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("unipc bh2 2", "UniPCMultistepScheduler", {"solver_order": 2}),
    ("unipc bh1 3", "UniPCMultistepScheduler", {"solver_order": 3, "solver_type": "bh1"}),
    ("euler", "EulerDiscreteScheduler", {}),
    ("euler ancestral", "EulerAncestralDiscreteScheduler", {}),
    ("heun", "HeunDiscreteScheduler", {}),
    ("ddim", "DDIMScheduler", {}),
    ("flow euler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    ("ddpm", "DDPMScheduler", {}),
    ("lcm", "LCMScheduler", {}),
    ("tcd", "TCDScheduler", {}),
    ("lms 4", "LMSDiscreteScheduler", {}),
    ("kdpm2", "KDPM2DiscreteScheduler", {}),
    ("kdpm2 ancestral", "KDPM2AncestralDiscreteScheduler", {}),
    ("edm euler", "EDMEulerScheduler", {}),
    ("edm dpmsolver++ 2M", "EDMDPMSolverMultistepScheduler", {}),
    ("flow heun", "FlowMatchHeunDiscreteScheduler", {"shift": 3.0}),
    ("ipndm", "IPNDMScheduler", {}),
    ("pndm plms", "PNDMScheduler", {"skip_prk_steps": True}),
    ("deis 3", "DEISMultistepScheduler", {"solver_order": 3}),
    ("dpmsolver++ 3S", "DPMSolverSinglestepScheduler", {"solver_order": 3}),
    ("sa-solver 2P2C", "SASolverScheduler", {}),
    ("sa-solver 3P3C noise", "SASolverScheduler",
     {"predictor_order": 3, "corrector_order": 3, "algorithm_type": "noise_prediction"}),
]


def program_bytes(program, numel: int, itemsize: int, hist_itemsize: int) -> int:
    """Bytes one fused step must move: operands it reads once, slots and sample it writes."""
    width = program.width
    rows = [program.row(r) for r in range(len(program.targets))]
    written, loads = set(), set()
    reads_x = reads_out = uses_noise = False
    for target, row in zip(program.targets, rows):
        reads_x |= row[0] != 0.0
        reads_out |= row[1] != 0.0
        uses_noise |= row[width - 1] != 0.0
        loads |= {s for s in range(program.num_slots) if row[2 + s] != 0.0 and s not in written}
        if target >= 0:
            written.add(target)
    sample_io = int(reads_x) + int(reads_out) + int(uses_noise) + 1
    return numel * (itemsize * sample_io + hist_itemsize * (len(loads) + len(written)))


def time_trajectory(scheduler, sample, model_output, steps: int, device, generator, repeats: int) -> float:
    """Median seconds per ``step()`` over whole trajectories."""
    per_step = []
    # Only stochastic schedulers take a generator; DDIM has no begin index in diffusers.
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for r in range(repeats + 1):  # the first trajectory warms up
        scheduler.set_timesteps(steps, device=device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        x = sample
        synchronize(device)
        start = time.perf_counter()
        for t in scheduler.timesteps:
            # A pipeline calls both per step (diffusers' flow scheduler has no scale_model_input).
            scale(x, t)
            x = scheduler.step(model_output, t, x, return_dict=False, **kwargs)[0]
        synchronize(device)
        if r:
            per_step.append((time.perf_counter() - start) / len(scheduler.timesteps))
    per_step.sort()
    return per_step[len(per_step) // 2]


def executed_programs(scheduler, sample, model_output, steps: int, device) -> list:
    """The StepPrograms one trajectory runs, in order."""
    scheduler.set_timesteps(steps, device=device)
    kwargs = {"generator": torch.Generator(device=device).manual_seed(0)} \
        if "generator" in inspect.signature(scheduler.step).parameters else {}
    programs, x = [], sample
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    for t in scheduler.timesteps:
        scale(x, t)
        x = scheduler.step(model_output, t, x, return_dict=False, **kwargs)[0]
        programs.append(scheduler.last_program)
    return programs


def kernel_time(program, sample, model_output, history_dtype, device, repeats: int) -> float:
    """Median seconds of the fused op alone running ``program``."""
    history = torch.zeros((program.num_slots, *sample.shape), dtype=history_dtype, device=device)
    noise = torch.randn_like(sample) if program.uses_noise else None
    return device_time(lambda: solver_step(sample, model_output, history, program, noise), device)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--schedulers", nargs="+", default=None, help="labels to run (default: all available)")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    device = torch.device(args.device)
    repeats = 3 if args.quick else 10
    peak = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for label, cls_name, config in SCHEDULERS:
        if args.schedulers and label not in args.schedulers:
            continue
        if not hasattr(sf, cls_name):
            print(f"skip {label}: stepfuse.schedulers has no {cls_name} yet")
            continue
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                g = torch.Generator(device=device).manual_seed(0)
                sample = torch.randn(shape, generator=g, device=device).to(dtype)
                model_output = torch.randn(shape, generator=g, device=device).to(dtype)
                ours = getattr(sf, cls_name)(**config)
                theirs = getattr(diffusers, cls_name).from_config(ours.config)
                gen = lambda: torch.Generator(device=device).manual_seed(1)  # noqa: E731
                t_ours = time_trajectory(ours, sample, model_output, args.steps, device, gen(), repeats)
                t_theirs = time_trajectory(theirs, sample, model_output, args.steps, device, gen(), repeats)
                programs = executed_programs(ours, sample, model_output, args.steps, device)
                hist_dtype = ours.history_dtype or dtype
                item, hist_item = sample.element_size(), torch.empty((), dtype=hist_dtype).element_size()
                sizes = [program_bytes(q, sample.numel(), item, hist_item) for q in programs]
                nbytes = sum(sizes) / len(sizes)
                mid = len(programs) // 2
                t_kernel = kernel_time(programs[mid], sample, model_output, hist_dtype, device, repeats)
                kernel_bytes = sizes[mid]
                row = {
                    "scheduler": label,
                    "shape": shape_name,
                    "dtype": dtype_name,
                    "stepfuse_us": round(t_ours * 1e6, 1),
                    "diffusers_us": round(t_theirs * 1e6, 1),
                    "speedup": round(t_theirs / t_ours, 2),
                    "stepfuse_GBps": round(nbytes / t_ours / 1e9, 1),
                    "diffusers_GBps": round(nbytes / t_theirs / 1e9, 1),
                }
                row["kernel_us"] = round(t_kernel * 1e6, 1)
                row["kernel_GBps"] = round(kernel_bytes / t_kernel / 1e9, 1)
                if peak:
                    row["kernel_pct_of_copy_bw"] = round(100 * kernel_bytes / t_kernel / peak, 1)
                rows.append(row)
                print(format_table([row], list(row)).splitlines()[-1], flush=True)
    columns = list(rows[0]) if rows else []
    print()
    if peak:
        print(f"device copy bandwidth: {peak / 1e9:.0f} GB/s (read + write)")
    print(format_table(rows, columns))
    path = write_results(args.out, "bench_solver_step", device,
                         {"steps": args.steps, "copy_bandwidth_GBps": peak and peak / 1e9, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
