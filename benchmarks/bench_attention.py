"""Block-sparse attention against dense attention and FlexAttention, mask building, and end to end.

1. Kernels: ``stepfuse.ops.block_sparse_attention`` (C++ on the CPU, Triton on a GPU) at block
   densities 100/50/25/20/10% against dense ``scaled_dot_product_attention`` under every SDPA
   backend this machine has, and (GPU) FlexAttention compiled with the same block mask; on a
   Hopper GPU also the opt-in Gluon kernels, each at its fastest configuration.  Random
   block masks keep the same number of key blocks in every row (the diagonal included).
   TFLOP/s count the work done: ``4 B H S^2 D`` times the density for the sparse rows.
2. Mask building: stepfuse's builders against FlexAttention's ``create_block_mask`` given the same
   pattern as a ``mask_mod`` (sliding tiles, radial, and an adaptive mask from block scores).
3. End to end: the bundled DiT (PSNR and class accuracy against dense attention) and a random video
   DiT of realistic size (Wan 2.1 1.3B attention shapes): model-call time dense against sparse, and
   how close the output stays.

    python benchmarks/bench_attention.py [--device cuda] [--parts kernels masks e2e] [--quick]
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DTYPES, base_parser, device_tag, format_table, host_time, kernel_setup, median_time,  # noqa: E402
                    synchronize, write_results)

import stepfuse.attention as sa  # noqa: E402
from stepfuse import ops  # noqa: E402

LENGTHS = {"cpu": [1024, 2048, 4096, 8192], "cuda": [4096, 8192, 16384, 32768]}
HEADS = {"cpu": 8, "cuda": 24}
DENSITIES = [1.0, 0.5, 0.25, 0.2, 0.1]
# Mask block: FlexAttention's default of 128 on a GPU (its kernels tile by 128 and reject 64 here),
# 64 on the CPU, where finer masks cost the C++ kernel nothing.  ``--block`` overrides.
BLOCK_SIZES = {"cpu": 64, "cuda": 128}
BLOCK = BLOCK_SIZES["cpu"]


def random_block_mask(b, h, s, density, block, device, seed=0):
    """``round(density * Kb)`` key blocks per query block, the diagonal one always kept, ascending;
    indices padded to ``Kb`` columns as FlexAttention's are, so every density has one shape (and
    its compiled kernel is not rebuilt per density)."""
    n_blocks = -(-s // block)
    keep = max(1, min(n_blocks, round(density * n_blocks)))
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, h, n_blocks, n_blocks, generator=g)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)
    idx = scores.topk(keep, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    idx = torch.cat([idx, idx.new_zeros(b, h, n_blocks, n_blocks - keep)], dim=-1)
    num = torch.full((b, h, n_blocks), keep, dtype=torch.int32)
    return num.to(device), idx.to(device), keep / n_blocks


def sdpa_backends(device):
    """name -> SDPBackend this machine can run for the benchmark's shapes."""
    from torch.nn.attention import SDPBackend

    if device.type == "cpu":
        return {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_sdpa(q, k, v, backend, seconds):
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v)

    try:
        return seconds(run)
    except RuntimeError:  # the backend does not take this shape / dtype / device
        return None


def flex_runner(q, k, v, num, idx, block):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    mask = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=mask)


def gluon_row(q, k, v, num, idx, best, best_name, flops, seconds) -> dict:
    """Columns for the Gluon kernels (``stepfuse.attention.gluon_kernel``, Hopper, opt-in in the
    library), each at its fastest configuration for this case, where they apply: the
    intra-warpgroup overlap kernel and the warp-specialised ping-pong one."""
    if torch.cuda.get_device_capability(q.device)[0] != 9 or q.shape[-1] not in (64, 128):
        return {}
    try:
        from stepfuse.attention import gluon_kernel
        from stepfuse.attention.triton_kernel import _fastest
    except ImportError:
        return {}
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5 * math.log2(math.e)
    row, fastest = {}, None
    for kind in ("overlap", "pingpong"):
        runs = {c: (lambda c=c: gluon_kernel.run(c, q, k, v, out, num, idx, scale, BLOCK))
                for c in gluon_kernel.candidates(BLOCK) if c[0] == kind}
        if not runs:
            continue
        choice = _fastest(runs)
        t = seconds(runs[choice])
        row.update({f"{kind} ms": round(t * 1e3, 3), f"{kind} TF/s": round(flops / t / 1e12, 3),
                    f"{kind} tiles": str(choice[1])})
        fastest = t if fastest is None else min(fastest, t)
    if fastest is not None:
        row["gluon vs best sdpa"] = f"{best / fastest:.2f}x ({best_name})"
    return row


def bench_kernels(args, device, seconds) -> list:
    rows = []
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    lengths = args.lengths or LENGTHS[device.type]
    for d in args.head_dims:
        for s in lengths:
            b, h = 1, args.heads or HEADS[device.type]
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(b, h, s, d, generator=g).to(device, dtype) for _ in range(3))
            flops = 4 * b * h * s * s * d
            dense = {}
            for name, backend in sdpa_backends(device).items():
                if name == "math" and s > (4096 if device.type == "cpu" else 8192):
                    continue  # materialises S x S scores: slow and large
                t = time_sdpa(q, k, v, backend, seconds)
                if t is not None:
                    dense[name] = t
            best_name = min(dense, key=dense.get)
            best = dense[best_name]
            row = {"d": d, "S": s, "dtype": args.dtype or str(dtype).split(".")[-1]}
            row.update({f"sdpa {n} ms": round(t * 1e3, 3) for n, t in dense.items()})
            row["best sdpa TF/s"] = round(flops / best / 1e12, 3)
            for density in args.densities:
                num, idx, actual = random_block_mask(b, h, s, density, BLOCK, device)
                # check_indices=False: the mask is valid by construction, as the runtime's masks are;
                # the check reads the mask back on the host (a sync per call on a GPU).
                def ours():
                    ops.block_sparse_attention(q, k, v, num, idx, block_size=BLOCK, check_indices=False)

                t = seconds(ours)
                rec = dict(row, density=f"{actual:.0%}", **{"ours ms": round(t * 1e3, 3),
                                                             "ours TF/s": round(flops * actual / t / 1e12, 3),
                                                             "vs best sdpa": f"{best / t:.2f}x ({best_name})"})
                if device.type == "cuda":
                    from stepfuse.attention.triton_kernel import _kernel

                    best_config = getattr(_kernel(BLOCK, True), "best_config", None)  # the autotuner's pick
                    rec["tiles"] = str(best_config).replace("\n", " ") if best_config is not None else "-"
                    # host time per call: where it exceeds the kernel's, back-to-back calls are launch-bound
                    rec["ours host us"] = round(host_time(ours, device) * 1e6, 1)
                    try:
                        flex = flex_runner(q, k, v, num, idx, BLOCK)
                        tf = seconds(flex)
                        rec["flex ms"] = round(tf * 1e3, 3)
                        rec["flex host us"] = round(host_time(flex, device) * 1e6, 1)
                        rec["vs flex"] = f"{tf / t:.2f}x"
                    except Exception as e:  # noqa: BLE001 - FlexAttention's compile may fail on a machine
                        rec["vs flex"] = f"n/a ({type(e).__name__})"
                    if args.gluon:
                        rec.update(gluon_row(q, k, v, num, idx, best, best_name, flops * actual, seconds))
                rows.append(rec)
                print(rec, flush=True)
    return rows


# -- mask building ----------------------------------------------------------------------------------------

def _tile_coords(grid, tile, device):
    """Per token (in tile order): its tile's (t, h, w) coordinates."""
    layout = sa.TileLayout(grid, tile)
    t, hh, w = grid
    pos = torch.arange(t * hh * w, device=device)[layout.permutation.to(device)]
    coords = torch.stack([pos // (hh * w) // tile[0], pos // w % hh // tile[1], pos % w // tile[2]], -1)
    return coords


def mask_cases(grid, device):
    """name -> (stepfuse builder, mask_mod for create_block_mask, sequence length)."""
    tile, window = (4, 4, 4), (3, 3, 3)
    s = grid[0] * grid[1] * grid[2]
    coords = _tile_coords(grid, tile, device)
    tiles = [-(-g // t) for g, t in zip(grid, tile)]
    half = [w // 2 for w in window]

    def sta_mod(b, h, q_idx, kv_idx):
        # The window is shifted inside the grid at the borders (Sliding Tile Attention).
        keep = None
        for axis in range(3):
            cq, ck = coords[q_idx, axis], coords[kv_idx, axis]
            start = (cq - half[axis]).clamp(0, max(tiles[axis] - window[axis], 0))
            inside = (ck >= start) & (ck < start + window[axis])
            keep = inside if keep is None else keep & inside
        return keep

    radial_blocks = sa.radial_mask(grid, block_size=BLOCK).to_dense_blocks()[0, 0].to(device)

    def radial_mod(b, h, q_idx, kv_idx):  # the same block table, read per token
        return radial_blocks[q_idx // BLOCK, kv_idx // BLOCK]

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, s, 64, generator=g).to(device)
    k = torch.randn(1, 8, s, 64, generator=g).to(device)
    adaptive = sa.adaptive_mask(q, k, block_size=BLOCK, mass=0.9).to_dense_blocks().to(device)

    def adaptive_mod(b, h, q_idx, kv_idx):
        return adaptive[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    return {
        # built where the attention runs, as create_block_mask's are (on a GPU: host build + one copy)
        "sliding_tile": (lambda: sa.sliding_tile_mask(grid, tile, window, block_size=BLOCK, device=device), sta_mod,
                         s, None),
        "radial": (lambda: sa.radial_mask(grid, block_size=BLOCK, device=device), radial_mod, s, None),
        "adaptive (scores + selection)": (lambda: sa.adaptive_mask(q, k, block_size=BLOCK, mass=0.9), adaptive_mod,
                                          s, (1, 8)),
    }


def bench_masks(args, device) -> list:
    from torch.nn.attention.flex_attention import create_block_mask

    # On a GPU, 16k tokens and Wan's 21x30x52 latent (32760 tokens), against create_block_mask both
    # eager and under torch.compile (as FlexAttention advises for long sequences: the eager form
    # materialises (heads x tokens x tokens) values and runs out of 80 GB at 61k tokens for the
    # 8-head adaptive case).  The compiled form is not timed on the CPU, where it compiles for minutes.
    grids = [tuple(args.mask_grid)] if args.mask_grid else ([(8, 32, 32)] if device.type == "cpu"
                                                            else [(8, 32, 64), (21, 30, 52)])
    compiled_create = torch.compile(create_block_mask)
    rows = []
    for grid in grids:
        for name, (ours, mod, s, bh) in mask_cases(grid, device).items():
            t_ours = median_time(lambda: (_clear(), ours()), device, repeats=args.mask_repeats)
            b, h = bh or (None, None)

            def flex(compiled=False):
                (compiled_create if compiled else create_block_mask)(mod, b, h, s, s, device=str(device),
                                                                     BLOCK_SIZE=BLOCK)

            start = time.perf_counter()
            flex()
            synchronize(device)
            t_first = time.perf_counter() - start
            t_flex = median_time(flex, device, repeats=args.mask_repeats)
            row = {"pattern": name, "grid": "x".join(map(str, grid)), "tokens": s, "ours ms": round(t_ours * 1e3, 2),
                   "create_block_mask ms": round(t_flex * 1e3, 1),
                   "create_block_mask first call ms": round(t_first * 1e3, 1), "speedup": f"{t_flex / t_ours:.0f}x"}
            if device.type == "cuda":
                t_compiled = median_time(lambda: flex(compiled=True), device, repeats=args.mask_repeats)
                row.update({"compiled ms": round(t_compiled * 1e3, 2), "vs compiled": f"{t_compiled / t_ours:.0f}x"})
            rows.append(row)
            print(rows[-1], flush=True)
    return rows


def _clear():
    """Builders cache shape-only masks; the timings measure an actual build."""
    for fn in (sa.sliding_tile_mask, sa.radial_mask):
        getattr(fn, "cache_clear", lambda: None)()


# -- end to end ---------------------------------------------------------------------------------------------

def interleaved(runs: dict, install, call, model, device, rounds: int, profile_attention: bool):
    """Best-of-``rounds`` wall time per config, configs interleaved round by round (this machine is
    shared: a slow spell then hits every config alike).  ``install(config)`` puts ``config`` on
    ``model`` and returns what undoes it.  Also the first round's output, attention time and stats."""
    best, first = {name: math.inf for name in runs}, {}
    for r in range(rounds):
        for name, config in runs.items():
            undo = install(config)
            try:
                start = time.perf_counter()
                out = call()
                synchronize(device)
                best[name] = min(best[name], time.perf_counter() - start)
                if r == 0:
                    first[name] = (out, attention_seconds(call, device) if profile_attention else None,
                                   sa.stats(model) if config is not None else None)
            finally:
                undo()
    return best, first


class _Installed:
    """Sparse attention on a model for one measurement; calling it removes it."""

    def __init__(self, model, config, steps):
        self.model, self.on = model, config is not None
        if self.on:
            sa.apply(model, config, num_inference_steps=steps)

    def __call__(self):
        if self.on:
            sa.remove(self.model)


def bench_dit(args, device) -> list:
    import stepfuse
    from stepfuse import metrics, models

    pipe = models.load("digits-dit", device=str(device))
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat_interleave(max(1, args.samples // 10))

    def run():
        return pipe(class_labels=labels.tolist(), num_inference_steps=args.steps, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    # 8 x 8 tokens in blocks of 16 (4 blocks of two rows each).  Radial and per-head patterns are
    # about time: a single frame this small leaves them nothing to drop, so they are not listed.
    runs = {
        "dense": None,
        "adaptive mass 0.95 (default)": sa.SparseAttention(block_size=16),
        "adaptive mass 0.9": sa.SparseAttention(block_size=16, mass=0.9),
        "adaptive top-3 of 4": sa.SparseAttention(block_size=16, top_k=3),
        "adaptive top-2 of 4": sa.SparseAttention(block_size=16, top_k=2),
        "sliding_tile, own tile + diagonal": sa.SparseAttention(block_size=16, pattern="sliding_tile",
                                                                window=(1, 1, 1)),
    }

    def install(config):
        stepfuse.accelerate(pipe, solver="dpmpp_2m", attention=config)
        return lambda: None  # the next accelerate() call replaces the config

    best, first = interleaved(runs, install, run, pipe.transformer, device, args.e2e_repeats,
                              profile_attention=False)
    stepfuse.restore(pipe)
    digit_metrics = metrics.DigitMetrics(device=device)
    reference = first["dense"][0]
    rows = []
    for name, config in runs.items():
        images, _, stats = first[name]
        scores = digit_metrics(images, labels, reference=reference)
        rows.append({"config": name, "seconds": round(best[name], 2), "speedup": f"{best['dense'] / best[name]:.2f}x",
                     "attention saved": f"{stats.attention_saved:.0%}" if stats else "0%",
                     "density of sparse calls": f"{stats.density:.0%}" if stats else "-",
                     "psnr vs dense": round(scores["psnr"], 2) if config is not None else "-",
                     "accuracy": round(scores["accuracy"], 3), "fd": round(scores["fd"], 1)})
        print(rows[-1], flush=True)
    return rows


def bench_video(args, device) -> list:
    """A random Wan-shaped DiT (12 heads of 128, Wan 2.1 1.3B) on one latent video, one model call.
    Data-dependent masks are rebuilt on every call (``rebuild_every=1``), so their cost is counted."""
    from diffusers import WanTransformer3DModel

    frames, height, width = args.video or ((4, 64, 64) if device.type == "cpu" else (21, 60, 104))
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                  num_layers=args.video_layers, cross_attn_norm=True,
                                  qk_norm="rms_norm_across_heads").to(device, dtype).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, frames, height, width, generator=g).to(device, dtype),
                  encoder_hidden_states=torch.randn(1, 512, 4096, generator=g).to(device, dtype),
                  timestep=torch.tensor([500.0], device=device))
    tokens = frames * (height // 2) * (width // 2)

    def call():
        with torch.no_grad():
            return model(**inputs).sample

    sparse = dict(dense_steps=0, dense_layers=0, rebuild_every=1)
    runs = {
        "dense": None,
        "adaptive mass 0.9": sa.SparseAttention(mass=0.9, **sparse),
        "adaptive top 20%": sa.SparseAttention(top_k=max(1, -(-tokens // BLOCK) // 5), **sparse),
        "sliding_tile 3x3x3": sa.SparseAttention(pattern="sliding_tile", **sparse),
        "radial": sa.SparseAttention(pattern="radial", **sparse),
    }
    call()  # warm-up
    best, first = interleaved(runs, lambda config: _Installed(model, config, 10 ** 6), call, model, device,
                              args.e2e_repeats, profile_attention=True)
    dense_out, a_dense, _ = first["dense"]
    rows = []
    for name, config in runs.items():
        out, a, stats = first[name]
        row = {"config": name, "tokens": tokens, "ms per call": round(best[name] * 1e3, 1),
               "speedup": f"{best['dense'] / best[name]:.2f}x", "attention ms": round(a * 1e3, 1)}
        if config is not None:
            err = ((out.float() - dense_out.float()).norm() / dense_out.float().norm()).item()
            row.update({"attention saved": f"{1 - a / a_dense:.0%}", "density": f"{stats.density:.0%}",
                        "rel. error vs dense": round(err, 4)})
        rows.append(row)
        print(row, flush=True)
    return rows


def attention_seconds(call, device) -> float:
    """Time one call spends in attention kernels (dense SDPA's or stepfuse's, masks included), from
    the profiler: the ops themselves on the CPU, their kernels on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        synchronize(device)
    names = ("scaled_dot_product", "flash_attention", "block_sparse", "block_scores", "block_sparse_fwd",
             "block_mean", "attention_block_scores", "block_select", "fmha", "cudnn")
    total = 0.0
    for event in prof.key_averages():
        if any(n in event.key for n in names):
            if device.type == "cuda":
                total += getattr(event, "self_device_time_total", 0.0)
            elif event.key.startswith(("aten::_scaled_dot_product", "stepfuse::")):
                total += event.cpu_time_total  # the op with everything it calls, counted once
    return total / 1e6


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", default=["kernels", "masks", "e2e"],
                   choices=["kernels", "masks", "e2e", "dit", "video"], help="e2e = dit + video")
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--lengths", nargs="+", type=int, default=None)
    p.add_argument("--densities", nargs="+", type=float, default=DENSITIES)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="fp32 on the CPU, bf16 on a GPU by default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--mask-grid", nargs=3, type=int, default=None)
    p.add_argument("--mask-repeats", type=int, default=5)
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--video", nargs=3, type=int, default=None, help="latent frames, height, width")
    p.add_argument("--video-layers", type=int, default=2)
    p.add_argument("--e2e-repeats", type=int, default=3)
    p.add_argument("--block", type=int, choices=[16, 32, 64, 128], default=None)
    p.add_argument("--update", action="store_true", help="keep the parts not run from the results file")
    p.add_argument("--no-gluon", dest="gluon", action="store_false", help="leave out the Gluon kernel's columns")
    args = p.parse_args()
    device, _, seconds = kernel_setup(args, launches=10)
    global BLOCK
    BLOCK = args.block or BLOCK_SIZES[device.type]

    payload = {}
    if args.update:  # keep the other parts of an earlier run's results
        earlier = Path(args.out) / device_tag(device) / "bench_attention.json"
        if earlier.exists():
            payload = {k: v for k, v in json.loads(earlier.read_text()).items() if k != "meta"}
    payload["threads"] = torch.get_num_threads()
    if "kernels" in args.parts:
        payload["kernels"] = bench_kernels(args, device, seconds)
    if "masks" in args.parts:
        payload["masks"] = bench_masks(args, device)
    if {"e2e", "dit"} & set(args.parts):
        payload["dit"] = bench_dit(args, device)
        payload["dit_setup"] = f"DPM++ 2M {args.steps} steps, {args.samples} samples"
    if {"e2e", "video"} & set(args.parts):
        payload["video"] = bench_video(args, device)
    text = [f"{payload['threads']} CPU threads; block {BLOCK}; ratios = baseline time / ours"]
    titles = {"kernels": "kernels", "masks": "mask building",
              "dit": f"bundled DiT, {payload.get('dit_setup', '')}", "video": "random Wan-shaped video DiT, one model call"}
    for key, title in titles.items():
        if key in payload:
            text += ["", title, format_table(payload[key], _columns(payload[key]))]
    print("\n" + "\n".join(text))
    write_results(args.out, "bench_attention", device, payload, text)


def _columns(rows: list) -> list:
    seen = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


if __name__ == "__main__":
    main()
