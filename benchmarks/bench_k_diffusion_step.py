"""Per-step cost of stepfuse.k_diffusion's samplers against k-diffusion's originals.

Both implementations sample the same schedule (``get_sigmas_karras(steps, 0.03, 14.6)``) from
the same start with the same seeds and a model that costs almost nothing (``x * 0.5``), so the
time per model evaluation is the sampler's own overhead per step. Stochastic samplers get
the same ``noise_sampler``, which hands out Gaussian noise drawn before the timing: drawing
noise (``torch.randn_like`` costs ~0.2-0.6 ms at the SDXL shape on a CPU core; k-diffusion's
default Brownian tree far more) is the same work in both and not the sampler's own. Each time is the median of
whole sampler calls, the two implementations interleaved so that load from other processes
hits both alike; ``rel_err`` is the relative difference of their final samples.

    python benchmarks/bench_k_diffusion_step.py [--device cuda] [--shapes sd15 sdxl] [--dtypes fp32 bf16]
"""

from __future__ import annotations

import inspect
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, SHAPES, base_parser, format_table, synchronize, write_results  # noqa: E402
from kdiffusion_reference import load_sampling  # noqa: E402

from stepfuse import k_diffusion as sfk  # noqa: E402
from stepfuse.testing.parity import relative_error  # noqa: E402

# (label, function name, keyword arguments): every grid sampler of stepfuse.k_diffusion.
SAMPLERS = [
    ("euler", "sample_euler", {}),
    ("euler ancestral", "sample_euler_ancestral", {}),
    ("heun", "sample_heun", {}),
    ("dpm_2", "sample_dpm_2", {}),
    ("dpm_2 ancestral", "sample_dpm_2_ancestral", {}),
    ("lms", "sample_lms", {}),
    ("dpm++ 2s ancestral", "sample_dpmpp_2s_ancestral", {}),
    ("dpm++ sde", "sample_dpmpp_sde", {}),
    ("dpm++ 2m", "sample_dpmpp_2m", {}),
    ("dpm++ 2m sde", "sample_dpmpp_2m_sde", {}),
    ("dpm++ 2m sde heun", "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
    ("dpm++ 3m sde", "sample_dpmpp_3m_sde", {}),
]
SIGMA_MIN, SIGMA_MAX = 0.03, 14.6
SEED = 0
NOISE_BANK = 8  # distinct pre-drawn noise tensors the noise sampler cycles through


def cheap_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A denoiser whose cost is one elementwise op, so the sampler's own work dominates."""
    return x * 0.5


def sampler_call(module, name: str, kwargs: dict, x: torch.Tensor, sigmas: torch.Tensor, model=cheap_model):
    """``fn()`` running one whole sampler call with fixed seeds; it returns the final sample."""
    fn = getattr(module, name)
    kwargs = dict(kwargs)
    takes_noise = "noise_sampler" in inspect.signature(fn).parameters
    if takes_noise:
        g = torch.Generator(device=x.device).manual_seed(SEED)
        bank = [torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) for _ in range(NOISE_BANK)]

    def run() -> torch.Tensor:
        torch.manual_seed(SEED)  # any draw a sampler makes itself
        if takes_noise:
            draws = iter(bank * (2 * len(sigmas)))  # the same sequence of draws in every call
            kwargs["noise_sampler"] = lambda sigma, sigma_next: next(draws)
        return fn(model, x, sigmas, disable=True, **kwargs)

    return run


def count_evaluations(module, name: str, kwargs: dict, x: torch.Tensor, sigmas: torch.Tensor) -> tuple:
    """(model evaluations of one call, its final sample)."""
    calls = []

    def counting_model(x_in, sigma):
        calls.append(None)
        return cheap_model(x_in, sigma)

    out = sampler_call(module, name, kwargs, x, sigmas, counting_model)()
    return len(calls), out


def interleaved_median(fns: list, device: torch.device, repeats: int, warmup: int = 1) -> list:
    """Median seconds per call of each of ``fns``, run in turn so that load changes hit all alike."""
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        for fn, samples in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if r >= warmup:
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["sdxl"], choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    p.add_argument("--samplers", nargs="+", default=None, help="labels to run (default: all)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per sampler (default 25, 3 with --quick)")
    args = p.parse_args()
    reference = load_sampling()
    if reference is None:
        raise SystemExit("k-diffusion's sampling module is not importable: nothing to compare against")
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 25)
    sigmas = sfk.get_sigmas_karras(args.steps, SIGMA_MIN, SIGMA_MAX, device=device)
    rows = []
    for label, name, kwargs in SAMPLERS:
        if args.samplers and label not in args.samplers:
            continue
        for shape_name in args.shapes:
            for dtype_name in args.dtypes:
                g = torch.Generator(device=device).manual_seed(SEED)
                x = (torch.randn(SHAPES[shape_name], generator=g, device=device) * SIGMA_MAX).to(DTYPES[dtype_name])
                nfe_ours, out_ours = count_evaluations(sfk, name, kwargs, x, sigmas)
                nfe_theirs, out_theirs = count_evaluations(reference, name, kwargs, x, sigmas)
                if nfe_ours != nfe_theirs:
                    print(f"note {label}: {nfe_ours} model evaluations in stepfuse, {nfe_theirs} in k-diffusion")
                t_ours, t_theirs = interleaved_median(
                    [sampler_call(sfk, name, kwargs, x, sigmas), sampler_call(reference, name, kwargs, x, sigmas)],
                    device, repeats)
                # Per model evaluation: each implementation's call time over its own evaluation count.
                per_ours, per_theirs = t_ours / nfe_ours, t_theirs / nfe_theirs
                row = {
                    "sampler": label,
                    "shape": shape_name,
                    "dtype": dtype_name,
                    "nfe": nfe_ours,
                    "stepfuse_us": round(per_ours * 1e6, 1),
                    "kdiffusion_us": round(per_theirs * 1e6, 1),
                    "speedup": round(per_theirs / per_ours, 2),
                    "rel_err": f"{relative_error(out_ours, out_theirs):.1e}",
                }
                rows.append(row)
                print(format_table([row], list(row)).splitlines()[-1], flush=True)
    print()
    print(format_table(rows, list(rows[0]) if rows else []))
    path = write_results(args.out, "bench_k_diffusion_step", device, {
        "steps": args.steps, "sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "repeats": repeats,
        "model": "x * 0.5", "noise_sampler": f"{NOISE_BANK} pre-drawn Gaussian tensors, cycled", "rows": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
