"""Feature caches end to end: stepfuse's policies against diffusers' cache hooks and cache-dit.

Parts (``--part``, default all):

* ``dit``: the bundled ``digits-dit`` pipeline (DDIM or DPM++ 2M, CFG as a doubled batch) with
  every stepfuse policy at several settings, diffusers' First-Block Cache / TaylorSeer / MagCache
  and cache-dit's DBCache (with and without its TaylorSeer calibrator).  TeaCache and both
  MagCaches are calibrated on runs with other seeds and another batch than the evaluated one.
* ``unet``: the bundled ``digits-unet`` with DeepCache (interval x branch) against the uncached UNet.
* ``flux``: a randomly initialised ``FluxTransformer2DModel`` of realistic width and sequence
  length but few layers, driven by a flow-matching Euler loop (the latent drifts as in sampling):
  wall time per step uncached, with stepfuse's first-block cache and TeaCache, diffusers'
  first-block cache and cache-dit's DBCache on the bare transformer.
* ``kernels``: ``bench_cache_ops`` (the fused skip decision against the plain PyTorch metric at
  the Flux and Wan hidden-state shapes), when that script is present.

Every row counts *block evaluations* the same way for all libraries
(``cache_baselines.count_block_evaluations`` with a pre-hook on each block's feed-forward, or
its first resnet / norm where it has none), so the skipped fraction does not depend on a
library's own statistics; stepfuse's own count is kept beside it as a cross-check.
Quality is measured against the uncached run from the same noise: PSNR, plus class accuracy and
Fréchet distance to held-out digits (``stepfuse.metrics``) on the digit models, and the relative
L2 error of the final latent on the random Flux model.  Wall time is the best of ``--repeats``
rounds; each round runs every row once (in alternating order), so load from other jobs hits all
rows alike.  Process CPU seconds are reported too: on a shared CPU they are steadier than wall time.

    python benchmarks/bench_cache.py [--part dit unet flux kernels] [--scheduler ddim|dpmpp2m] [--quick]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, ContextManager, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cache_baselines import (_quiet_loggers, _restored_attributes, block_probe, cache_dit_cache,  # noqa: E402
                             count_block_evaluations, denoiser_blocks, diffusers_cache)
from common import DTYPES, base_parser, device_tag, format_table, synchronize, write_results  # noqa: E402

import stepfuse.cache as sc  # noqa: E402
from stepfuse import metrics as sf_metrics  # noqa: E402

PARTS = ("dit", "unet", "flux", "kernels")
LIBRARIES = ("stepfuse", "diffusers", "cache-dit")
GOAL = {"psnr": 30.0, "block_ratio": 2.0, "speedup": 1.7}
# diffusers' TaylorSeer caches the modules it is told to: whole DiT blocks here (its default
# identifiers match Flux's ``attn`` but nothing in DiT, see cache_baselines).
DIT_BLOCKS_RE = [r"transformer_blocks\.\d+"]
COLUMNS = ["library", "name", "block_evals", "skipped", "seconds", "speedup", "cpu_speedup", "psnr", "accuracy", "fd"]


@dataclasses.dataclass
class Row:
    """One configuration: ``install()`` is a context manager active around one timed run."""

    library: str
    name: str
    install: Callable[[], ContextManager]


@contextlib.contextmanager
def stepfuse_cache(model: torch.nn.Module, policy: sc.CachePolicy, steps: int):
    sc.apply(model, policy, num_inference_steps=steps)
    try:
        yield lambda: sc.stats(model)
    finally:
        sc.remove(model)


def uncached_row() -> Row:
    return Row("uncached", "uncached", contextlib.nullcontext)


def compute_probe(block: torch.nn.Module) -> torch.nn.Module:
    """The block's feed-forward where it has one, else ``cache_baselines.block_probe``: TeaCache
    reads block 0's modulated input (its ``norm1``) at every step, cached or not, so a norm probe
    would count cached steps as evaluations."""
    ff = getattr(block, "ff", None)
    return ff if isinstance(ff, torch.nn.Module) else block_probe(block)


def measure(rows: List[Row], run: Callable[[], torch.Tensor], blocks, repeats: int, device) -> List[dict]:
    """Run every row ``repeats`` times, interleaved; the first round's output, counts and
    (stepfuse rows) the cache's own statistics, the best round's wall and CPU seconds."""
    records = [{"row": r, "wall": [], "cpu": [], "output": None, "evals": None, "stats": None,
                "deterministic": True} for r in rows]
    for round_ in range(repeats):
        order = records if round_ % 2 == 0 else records[::-1]
        for rec in order:
            with rec["row"].install() as handle, count_block_evaluations(blocks, compute_probe) as counts:
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                output = run()
                synchronize(device)
                rec["wall"].append(time.perf_counter() - wall)
                rec["cpu"].append(time.process_time() - cpu)
                if rec["output"] is None:
                    rec["output"], rec["evals"] = output.detach().cpu(), counts.evaluated
                    rec["stats"] = handle() if callable(handle) else None
                else:
                    rec["deterministic"] &= torch.equal(rec["output"], output.detach().cpu())
            print(f"  {rec['row'].library:9s} {rec['row'].name:42s} {rec['wall'][-1]:8.2f} s", flush=True)
    return records


def base_columns(records: List[dict]) -> List[dict]:
    """Block evaluations, skipped fraction and timings of every record, relative to the first (uncached)."""
    base = records[0]
    total, base_wall, base_cpu = base["evals"], min(base["wall"]), min(base["cpu"])
    rows = []
    for rec in records:
        wall, cpu = min(rec["wall"]), min(rec["cpu"])
        row = {"library": rec["row"].library, "name": rec["row"].name, "block_evals": rec["evals"],
               "skipped": round(1 - rec["evals"] / total, 3), "seconds": round(wall, 3),
               "speedup": round(base_wall / wall, 2), "cpu_seconds": round(cpu, 3),
               "cpu_speedup": round(base_cpu / cpu, 2), "deterministic": rec["deterministic"]}
        if rec["stats"] is not None:  # the cache's own count, a cross-check of the probe count
            row["stepfuse_skipped"] = round(rec["stats"].skipped_fraction, 3)
        rows.append(row)
    return rows


# -- digit models ------------------------------------------------------------------------------
def digit_setup(model_name: str, args, device):
    """(pipe, run(labels, seed) -> images, evaluation labels)."""
    from stepfuse import models

    pipe = models.load(model_name, device=str(device))
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler == "dpmpp2m":
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=2)
    else:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    per_class = max(1, args.samples // 10)
    labels = torch.arange(10).repeat_interleave(per_class)

    def run(run_labels, seed: int, steps: int = args.steps) -> torch.Tensor:
        return pipe(class_labels=run_labels.tolist(), num_inference_steps=steps, guidance_scale=args.guidance_scale,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images

    return pipe, run, labels


def score_digits(records: List[dict], labels, device) -> List[dict]:
    digit_metrics = sf_metrics.DigitMetrics(device=device)
    reference = records[0]["output"]
    rows = base_columns(records)
    for row, rec in zip(rows, records):
        scores = digit_metrics(rec["output"], labels, reference=reference)
        row.update({"psnr": round(scores["psnr"], 2), "accuracy": round(scores["accuracy"], 3),
                    "fd": round(scores["fd"], 3)})
    return rows


def calibration_runs(run, args) -> list:
    """Runs on other seeds and another batch (one sample per class, reversed) than the evaluation."""
    labels = torch.arange(9, -1, -1)
    return [lambda s=s: run(labels, args.seed + 1000 + s) for s in range(args.calibration_runs)]


def dit_rows(pipe, run, args) -> tuple:
    model, steps = pipe.transformer, args.steps
    cal_runs = calibration_runs(run, args)
    start = time.perf_counter()
    calibration = sc.calibrate(model, cal_runs)
    with diffusers_cache(model, "magcache", calibrate=True, num_inference_steps=steps) as handle:
        cal_runs[0]()
    diffusers_ratios = handle.mag_ratios
    info = {"calibration": f"{len(cal_runs)} run(s) of labels 9..0 with seeds {args.seed + 1000}.. "
                           f"(evaluation: seed {args.seed}); diffusers' MagCache ratios from the first of them",
            "calibration_seconds": round(time.perf_counter() - start, 1),
            "teacache_coefficients": [round(c, 6) for c in calibration.teacache_coefficients]}

    def sf(name, policy):
        return Row("stepfuse", name, lambda: stepfuse_cache(model, policy, steps))

    def dfs(name, kind, **params):
        return Row("diffusers", f"{kind} {name}", lambda: diffusers_cache(model, kind, **params))

    def cdit(name, kind, **params):
        return Row("cache-dit", f"{kind} {name}", lambda: cache_dit_cache(pipe, kind, **params))

    quick = args.quick
    pick = (lambda xs: xs[1:2]) if quick else (lambda xs: xs)
    dbcache = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 4}
    rows = [uncached_row()]
    rows += [sf(f"FirstBlockCache t={t}", sc.FirstBlockCache(threshold=t)) for t in pick([0.08, 0.12, 0.2])]
    rows += [sf(f"DualBlockCache F{f}B1 t={t}", sc.DualBlockCache(front_blocks=f, back_blocks=1, threshold=t))
             for f, t in pick([(1, 0.15), (1, 0.25), (2, 0.15)])]
    rows += [sf(f"FirstBlockCache t={t} +TaylorSeer o{o}",
                sc.FirstBlockCache(threshold=t, taylorseer=sc.TaylorSeer(order=o)))
             for t, o in pick([(0.12, 1), (0.16, 1), (0.2, 1), (0.2, 2)])]
    rows += [sf(f"TeaCache t={t} (calibrated)", calibration.teacache(t)) for t in pick([0.1, 0.14, 0.2, 0.3])]
    rows += [sf(f"MagCache t={t} (calibrated)", calibration.magcache(t)) for t in pick([0.12, 0.5])]
    rows += [sf(f"TaylorSeer interval={n} o{o}", sc.TaylorSeer(order=o, interval=n))
             for n, o in pick([(2, 1), (3, 1), (4, 1), (4, 2), (5, 1), (6, 1)])]
    rows += [sf(f"StaticCache {p}", sc.StaticCache(preset=p)) for p in pick(["fora-2", "fora-3", "fast"])]
    rows += [dfs(f"t={t}", "first_block", threshold=t) for t in pick([0.05, 0.1, 0.2])]
    rows += [dfs(f"blocks interval={n} o{o}", "taylorseer", cache_interval=n, max_order=o,
                 cache_identifiers=DIT_BLOCKS_RE, taylor_factors_dtype=torch.float32)
             for n, o in pick([(2, 1), (4, 1), (4, 2)])]
    rows += [dfs(f"t={t} (calibrated)", "magcache", threshold=t, mag_ratios=diffusers_ratios,
                 num_inference_steps=steps) for t in pick([0.12, 0.5])]
    rows += [cdit(f"F1B0 W4 t={t}", "dbcache", residual_diff_threshold=t, **dbcache)
             for t in pick([0.08, 0.16, 0.24])]
    rows += [cdit(f"F1B0 W4 t={t} o{o}", "dbcache_taylorseer", residual_diff_threshold=t, taylorseer_order=o,
                  **dbcache) for t, o in pick([(0.16, 1), (0.24, 2)])]
    return rows, info


def unet_rows(pipe, args) -> List[Row]:
    model, steps = pipe.unet, args.steps
    settings = [(n, b) for n in (2, 3, 4) for b in (0, 1)]
    if args.quick:
        settings = settings[2:4]
    return [uncached_row()] + [
        Row("stepfuse", f"DeepCache interval={n} branch={b}",
            lambda n=n, b=b: stepfuse_cache(model, sc.DeepCache(interval=n, branch=b), steps)) for n, b in settings]


def bench_digits(model_name: str, args, device) -> dict:
    pipe, run, labels = digit_setup(model_name, args, device)
    run(labels, args.seed, steps=2)  # warm-up at the evaluated batch size
    if model_name == "digits-dit":
        rows, info = dit_rows(pipe, run, args)
    else:
        rows, info = unet_rows(pipe, args), {}
    blocks = denoiser_blocks(pipe.denoiser)
    records = measure(rows, lambda: run(labels, args.seed), blocks, args.repeats, device)
    return {"model": model_name, "scheduler": args.scheduler, "steps": args.steps,
            "guidance_scale": args.guidance_scale, "samples": int(labels.numel()), "seed": args.seed,
            "blocks": len(blocks), "timing": f"best of {args.repeats} interleaved rounds", **info,
            "rows": score_digits(records, labels, device)}


def summarize(rows: List[dict]) -> List[str]:
    """Per library the fastest row at PSNR >= 30 / 35 dB, and the acceptance goal."""
    lines = []
    best = {}
    for floor in (GOAL["psnr"], 35.0):
        for lib in LIBRARIES:
            fits = [r for r in rows if r["library"] == lib and r["psnr"] >= floor]
            top = min(fits, key=lambda r: r["seconds"]) if fits else None
            if floor == GOAL["psnr"]:
                best[lib] = top
            lines.append(f"fastest {lib:9s} row at PSNR >= {floor:.0f} dB: " + (
                f"{top['name']} ({top['seconds']} s, {top['speedup']}x wall, {top['cpu_speedup']}x cpu, "
                f"{top['skipped']:.0%} skipped, {top['psnr']} dB)" if top else "none"))
    ours, base = best["stepfuse"], rows[0]
    if ours is None:
        return lines + [f"goal: not met: no stepfuse row reaches {GOAL['psnr']:.0f} dB"]
    ratio = base["block_evals"] / max(ours["block_evals"], 1)
    verdict = [f"{ratio:.2f}x fewer block evaluations ({'ok' if ratio >= GOAL['block_ratio'] else 'MISSED'} "
               f">= {GOAL['block_ratio']}x)",
               f"{ours['speedup']}x lower wall time ({'ok' if ours['speedup'] >= GOAL['speedup'] else 'MISSED'} "
               f">= {GOAL['speedup']}x; cpu time {ours['cpu_speedup']}x)"]
    for lib in LIBRARIES[1:]:
        theirs = best[lib]
        if theirs is None:
            verdict.append(f"{lib}: no row at >= {GOAL['psnr']:.0f} dB")
            continue
        # Our fastest row at equal or better quality than their best.
        match = [r for r in rows if r["library"] == "stepfuse" and r["psnr"] >= theirs["psnr"]]
        mine = min(match, key=lambda r: r["seconds"]) if match else None
        if mine is None:
            verdict.append(f"vs {lib}: no stepfuse row at >= {theirs['psnr']} dB")
            continue
        wins = mine["seconds"] < theirs["seconds"]
        verdict.append(f"vs {lib} best ({theirs['name']}, {theirs['psnr']} dB, {theirs['seconds']} s, "
                       f"{theirs['block_evals']} evals): stepfuse {mine['name']} ({mine['psnr']} dB, "
                       f"{mine['seconds']} s, {mine['block_evals']} evals) {'faster' if wins else 'NOT faster'} "
                       f"in wall time, {'fewer' if mine['block_evals'] < theirs['block_evals'] else 'not fewer'} "
                       "block evaluations")
    lines.append(f"goal: stepfuse best row at >= {GOAL['psnr']:.0f} dB is {ours['name']} ({ours['psnr']} dB): "
                 + "; ".join(verdict))
    return lines


# -- Flux-like transformer ---------------------------------------------------------------------
def flux_config(args, device) -> dict:
    if device.type == "cuda":  # FLUX.1's width (24 x 128) and a 1024^2 image, fewer blocks
        cfg = dict(double=4, single=8, heads=24, head_dim=128, image_tokens=4096, text_tokens=512, dtype="bf16")
    else:
        cfg = dict(double=2, single=4, heads=8, head_dim=64, image_tokens=1024, text_tokens=128, dtype="fp32")
    if args.quick:
        cfg.update(double=1, single=2, image_tokens=256, text_tokens=32)
    cfg.update(steps=args.flux_steps, dtype=args.flux_dtype or cfg["dtype"])
    return cfg


@contextlib.contextmanager
def cache_dit_transformer(model: torch.nn.Module, steps: int, **params):
    """cache-dit's DBCache on a bare transformer (its transformer-only mode)."""
    import cache_dit

    watched = [model, *(getattr(model, n) for n in ("transformer_blocks", "single_transformer_blocks"))]
    with _quiet_loggers("cache_dit"), _restored_attributes(watched):
        cache_dit.enable_cache(model, cache_config=cache_dit.DBCacheConfig(num_inference_steps=steps, **params))
        try:
            yield None
        finally:
            cache_dit.disable_cache(model)


def bench_flux(args, device) -> dict:
    from diffusers import FluxTransformer2DModel

    cfg = flux_config(args, device)
    dtype, steps, width = DTYPES[cfg["dtype"]], cfg["steps"], cfg["heads"] * cfg["head_dim"]
    torch.manual_seed(args.seed)
    rope = cfg["head_dim"] // 4
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=cfg["double"], num_single_layers=cfg["single"],
        attention_head_dim=cfg["head_dim"], num_attention_heads=cfg["heads"], joint_attention_dim=width,
        pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(rope, (cfg["head_dim"] - rope) // 2,
                                                                            (cfg["head_dim"] - rope) // 2),
    ).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(args.seed)
    side = int(math.isqrt(cfg["image_tokens"]))
    x0 = torch.randn(1, side * side, 64, generator=g).to(device, dtype)
    context = torch.randn(1, cfg["text_tokens"], width, generator=g).to(device, dtype)
    pooled = torch.randn(1, 768, generator=g).to(device, dtype)
    rows_, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows_), rows_, cols], -1).reshape(-1, 3).float().to(device)
    txt_ids = torch.zeros(cfg["text_tokens"], 3, device=device)
    # Flow-matching Euler on FLUX's shifted schedule (shift 3): host float64, one float per step.
    shift = 3.0
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    sigmas = (shift * t / (1 + (shift - 1) * t)).tolist()
    timesteps = [torch.full((1,), s, device=device, dtype=dtype) for s in sigmas[:-1]]

    @torch.no_grad()
    def run() -> torch.Tensor:
        x = x0.clone()
        for i in range(steps):
            v = model(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled,
                      timestep=timesteps[i], img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x.float()

    def sf(name, policy):
        return Row("stepfuse", name, lambda: stepfuse_cache(model, policy, steps))

    # The random model's first-block residual moves far more per step than a trained model's.
    thresholds = [0.3, 0.6]
    rows = [uncached_row()]
    rows += [sf(f"FirstBlockCache t={t}", sc.FirstBlockCache(threshold=t)) for t in thresholds]
    rows += [sf(f"TeaCache t={t} (uncalibrated)", sc.TeaCache(threshold=t)) for t in (0.2,)]
    rows += [Row("diffusers", f"first_block t={t}", lambda t=t: diffusers_cache(model, "first_block", threshold=t))
             for t in thresholds]
    notes = []
    try:  # cache-dit's transformer-only mode on Flux; a failure is reported, not fatal
        with cache_dit_transformer(model, steps, Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4,
                                   residual_diff_threshold=0.1):
            run_check = model(hidden_states=x0, encoder_hidden_states=context, pooled_projections=pooled,
                              timestep=timesteps[0], img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
        del run_check
        rows += [Row("cache-dit", f"dbcache F1B0 W4 t={t}",
                     lambda t=t: cache_dit_transformer(model, steps, Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                       max_warmup_steps=4, residual_diff_threshold=t))
                 for t in thresholds]
    except Exception as e:  # noqa: BLE001 - any failure of the third-party adapter is a note
        notes.append(f"cache-dit on the bare FluxTransformer2DModel failed: {type(e).__name__}: {e}")
    run()  # warm-up
    records = measure(rows, run, denoiser_blocks(model), args.flux_repeats, device)
    rows_out = base_columns(records)
    reference = records[0]["output"]
    for row, rec in zip(rows_out, records):
        row["ms_per_step"] = round(row["seconds"] / steps * 1e3, 1)
        row["rel_l2"] = float(f"{float((rec['output'] - reference).norm() / reference.norm()):.3g}")
    return {"config": cfg, "tokens": cfg["image_tokens"] + cfg["text_tokens"], "notes": notes,
            "timing": f"best of {args.flux_repeats} interleaved rounds", "rows": rows_out}


# -- decision kernels --------------------------------------------------------------------------
def bench_kernels(args, device) -> dict:
    try:
        import bench_cache_ops
    except ImportError as e:
        return {"note": f"benchmarks/bench_cache_ops.py not importable ({e}); kernel part skipped"}
    argv = ["bench_cache_ops", "--device", str(device), "--out", str(args.out)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.quick:
        argv += ["--quick", "--shapes", "flux", "--dtypes", "fp32"]
    saved, sys.argv = sys.argv, argv
    try:
        bench_cache_ops.main()
    finally:
        sys.argv = saved
    result = json.loads((Path(args.out) / device_tag(device) / "bench_cache_ops.json").read_text())
    verdict = []
    for row in result.get("decision", []):
        if row["impl"] == "stepfuse stride 1":
            verdict.append({"shape": row["shape"], "dtype": row["dtype"], "vs_plain_metric": row["vs_plain_metric"],
                            "beats_plain_metric": row["vs_plain_metric"] > 1.0})
    return {"source": "bench_cache_ops.json", "decision": verdict}


# -- driver ------------------------------------------------------------------------------------
def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--scheduler", default="ddim", choices=("ddim", "dpmpp2m"))
    p.add_argument("--steps", type=int, default=None, help="sampling steps on the digit models (default 50)")
    p.add_argument("--samples", type=int, default=None, help="evaluated samples, a multiple of 10 (default 20)")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--calibration-runs", type=int, default=2, help="uncached runs TeaCache/MagCache are fitted on")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds on the digit models (default 2)")
    p.add_argument("--flux-steps", type=int, default=None, help="steps of the Flux loop (default 28)")
    p.add_argument("--flux-repeats", type=int, default=1, help="timed rounds on the Flux model")
    p.add_argument("--flux-dtype", default=None, choices=("fp32", "bf16", "fp16"),
                   help="Flux model dtype (default fp32 on a CPU, bf16 on a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1 keeps the tiny models' ops out of thread barriers on a "
                        "loaded CPU; 0 leaves torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.samples = args.steps or 10, args.samples or 10
        args.repeats, args.flux_steps, args.calibration_runs = args.repeats or 1, args.flux_steps or 6, 1
    args.steps, args.samples = args.steps or 50, args.samples or 20
    args.repeats, args.flux_steps = args.repeats or 2, args.flux_steps or 28
    if args.samples < 10 or args.samples % 10:
        raise ValueError(f"--samples must be a positive multiple of 10 (every digit equally often), got {args.samples}")
    device = torch.device(args.device)
    payload, text = {"threads": torch.get_num_threads()}, []
    header = (f"timings on {device_tag(device)} with {torch.get_num_threads()} thread(s)"
              + ("; the CPU is shared with other jobs, so wall times are noisy (cpu_speedup is steadier)"
                 if device.type == "cpu" else ""))
    text.append(header)

    for name, part in (("dit", "digits-dit"), ("unet", "digits-unet")):
        if name not in args.part:
            continue
        print(f"{part}:", flush=True)
        report = bench_digits(part, args, device)
        payload[name] = report
        first = report["rows"][0]
        text += ["", f"{part}: {report['scheduler']} {report['steps']} steps, guidance {report['guidance_scale']}, "
                     f"{report['samples']} samples (seed {report['seed']}), {report['blocks']} blocks; "
                     f"{report['timing']}; uncached: accuracy {first['accuracy']}, fd {first['fd']}"
                 + (f"; calibration: {report['calibration']}" if "calibration" in report else ""),
                 format_table(report["rows"], COLUMNS)]
        nondet = [r["name"] for r in report["rows"] if not r["deterministic"]]
        mismatched = [r["name"] for r in report["rows"]
                      if "stepfuse_skipped" in r and abs(r["stepfuse_skipped"] - r["skipped"]) > 1e-3]
        if nondet:
            text.append(f"outputs differing between rounds: {nondet}")
        if mismatched:
            text.append("stepfuse's own skipped fraction differs from the probe count: "
                        + ", ".join(f"{r['name']} {r['stepfuse_skipped']}" for r in report["rows"]
                                    if r["name"] in mismatched))
        if name == "dit":
            report["summary"] = summarize(report["rows"])
            text += report["summary"]
        print("\n".join(text[-(2 + len(report.get("summary", []))):]), flush=True)

    if "flux" in args.part:
        print("flux:", flush=True)
        report = bench_flux(args, device)
        payload["flux"] = report
        cfg = report["config"]
        text += ["", f"FluxTransformer2DModel (random init): {cfg['double']} double + {cfg['single']} single blocks, "
                     f"{cfg['heads']}x{cfg['head_dim']}, {cfg['image_tokens']} image + {cfg['text_tokens']} text "
                     f"tokens, batch 1, {cfg['dtype']}, flow Euler {cfg['steps']} steps; {report['timing']}; "
                     "rel_l2 = final latent's relative L2 error vs uncached",
                 format_table(report["rows"], ["library", "name", "block_evals", "skipped", "ms_per_step", "speedup",
                                               "cpu_speedup", "rel_l2"])] + report["notes"]
        print("\n".join(text[-2 - len(report["notes"]):]), flush=True)

    if "kernels" in args.part:
        report = bench_kernels(args, device)
        payload["kernels"] = report
        if "note" in report:
            text += ["", report["note"]]
        else:
            text += ["", "decision kernel (cache_distance + cache_decide, stride 1) vs plain PyTorch metric "
                         "(details in bench_cache_ops.txt)", format_table(report["decision"], list(report["decision"][0]))]
        print("\n".join(text[-2:]), flush=True)

    write_results(args.out, "bench_cache", device, payload, text)


if __name__ == "__main__":
    main()
