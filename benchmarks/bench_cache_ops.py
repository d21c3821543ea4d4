"""Feature-cache kernels against the plain PyTorch a caching library runs instead.

Decision: ``cache_distance`` + ``cache_decide`` (one pass over both tensors, the decision
left on the device) against ``ref.plain_metric`` (``(a - b).abs().mean() / b.abs().mean()``,
as first-block caches and TeaCache write it: several passes and temporaries) and against
the reference distance in float32 (``ref.cache_distance``, the same sums in plain PyTorch).
``stride 4`` sums every fourth element, a cheaper estimate of the same relative change.
Element-wise: residual store / apply and TaylorSeer's update (order 2) and forecast (three
terms) against the PyTorch expressions that compute the same thing.  Shapes are the
hidden states of one Flux image ([1, 4096, 3072]) and one Wan 2.1 1.3B video
([1, 32760, 1536]).  GB/s counts the bytes the op must move (inputs once, outputs once); for
``stride 4`` that is still both whole tensors, since every fourth element touches every cache
line (CPU) or 32-byte sector (GPU) of fp32 and 16-bit data.

    python benchmarks/bench_cache_ops.py [--device cuda] [--shapes flux] [--dtypes bf16] [--threads 1]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, base_parser, format_table, kernel_setup, write_results  # noqa: E402

from stepfuse import ops  # noqa: E402
from stepfuse.ref import cache as ref  # noqa: E402

# Hidden-state shapes [batch, tokens, channels] of one image / video.
FEATURE_SHAPES = {"flux": (1, 4096, 3072), "wan": (1, 32760, 1536)}
THRESHOLD = 0.1
TAYLOR_DT = 2.0  # full computations every other step
FORECAST_DT = 1.0


def decision_cases(a, b, state) -> dict:
    """label -> (fn, bytes moved): ours and the baselines of the skip decision."""
    nbytes = 2 * a.numel() * a.element_size()
    return {
        "stepfuse stride 1": (lambda: ops.cache_decide(ops.cache_distance(a, b), state, threshold=THRESHOLD), nbytes),
        "stepfuse stride 4": (lambda: ops.cache_decide(ops.cache_distance(a, b, 4), state, threshold=THRESHOLD),
                              nbytes),
        "plain_metric": (lambda: ref.plain_metric(a, b), nbytes),
        "ref distance fp32": (lambda: ref.cache_distance(a, b, compute_dtype=torch.float32), nbytes),
    }


def elementwise_cases(shape, dtype, device) -> list:
    """(op, stepfuse fn, plain PyTorch fn, bytes moved) of the element-wise cache ops."""
    g = torch.Generator(device=device).manual_seed(0)
    x, y = (torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(2))
    residual, target = torch.empty_like(x), x.clone()
    factors = torch.randn((3, *shape), generator=g, device=device).to(dtype)
    plain_factors = factors.clone()
    out = torch.empty_like(x)
    item = x.element_size() * x.numel()

    def plain_update():
        # TaylorSeer's update written as tensor expressions: new differences, then the slots.
        d1 = (x - plain_factors[0]) / TAYLOR_DT
        d2 = (d1 - plain_factors[1]) / TAYLOR_DT
        plain_factors[0].copy_(x)
        plain_factors[1].copy_(d1)
        plain_factors[2].copy_(d2)

    return [
        ("residual store", lambda: ops.residual_store(x, y, residual), lambda: x - y, 3 * item),
        ("residual apply", lambda: ops.residual_apply(target, residual), lambda: target.add_(residual), 3 * item),
        ("taylor update o2", lambda: ops.taylor_update(x, factors, TAYLOR_DT, 2), plain_update, 6 * item),
        ("taylor predict 3", lambda: ops.taylor_predict(factors, FORECAST_DT, 3, out),
         lambda: factors[0] + factors[1] * FORECAST_DT + factors[2] * (FORECAST_DT**2 / 2), 4 * item),
    ]


def bench_case(shape_name: str, dtype_name: str, device, seconds) -> tuple:
    """Rows of both tables for one shape and dtype (printed as they are measured)."""
    shape, dtype = FEATURE_SHAPES[shape_name], DTYPES[dtype_name]
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(shape, generator=g, device=device).to(dtype)
    b = (a.float() + 0.05 * torch.randn(shape, generator=g, device=device)).to(dtype)
    state = torch.zeros(4, dtype=torch.float64, device=device)
    times = {label: (seconds(fn), nbytes) for label, (fn, nbytes) in decision_cases(a, b, state).items()}
    del a, b
    plain, reference = times["plain_metric"][0], times["ref distance fp32"][0]
    decisions, elementwise = [], []
    for label, (t, nbytes) in times.items():
        decisions.append({
            "shape": shape_name, "dtype": dtype_name, "impl": label, "ms": round(t * 1e3, 3),
            "GBps": round(nbytes / t / 1e9, 2), "vs_plain_metric": round(plain / t, 2),
            "vs_ref_distance": round(reference / t, 2),
        })
        print(format_table(decisions[-1:], list(decisions[-1])).splitlines()[-1], flush=True)
    for op, ours, plain_fn, nbytes in elementwise_cases(shape, dtype, device):
        t_ours, t_plain = seconds(ours), seconds(plain_fn)
        elementwise.append({
            "shape": shape_name, "dtype": dtype_name, "op": op, "stepfuse_ms": round(t_ours * 1e3, 3),
            "plain_ms": round(t_plain * 1e3, 3), "speedup": round(t_plain / t_ours, 2),
            "stepfuse_GBps": round(nbytes / t_ours / 1e9, 2),
        })
        print(format_table(elementwise[-1:], list(elementwise[-1])).splitlines()[-1], flush=True)
    return decisions, elementwise


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(FEATURE_SHAPES), choices=list(FEATURE_SHAPES))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (CPU) or rounds (GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args()
    device, repeats, seconds = kernel_setup(args, launches=20)

    decision_rows, element_rows = [], []
    for shape_name, dtype_name in itertools.product(args.shapes, args.dtypes):
        decisions, elementwise = bench_case(shape_name, dtype_name, device, seconds)
        decision_rows += decisions
        element_rows += elementwise

    threads = torch.get_num_threads()
    text = [f"skip decision (median of {repeats}{' x 20 launches' if device.type == 'cuda' else ''}; "
            f"{threads} CPU threads; ratios = baseline time / row time)",
            format_table(decision_rows, list(decision_rows[0])), "",
            "element-wise cache ops vs plain PyTorch expressions",
            format_table(element_rows, list(element_rows[0]))]
    print("\n" + "\n".join(text))
    payload = {"threshold": THRESHOLD, "repeats": repeats, "shapes": {k: FEATURE_SHAPES[k] for k in args.shapes},
               "decision": decision_rows, "elementwise": element_rows}
    path = write_results(args.out, "bench_cache_ops", device, payload)
    path.with_suffix(".txt").write_text("\n".join(text) + "\n")
    print(f"wrote {path} and {path.with_suffix('.txt').name}")


if __name__ == "__main__":
    main()
