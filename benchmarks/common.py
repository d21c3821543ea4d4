"""Shared benchmark plumbing: device tags, timing, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Latent shapes of widely used models (batch 2 = CFG for the UNets).
SHAPES = {
    "sd15": (2, 4, 64, 64),
    "sdxl": (2, 4, 128, 128),
    "flux": (1, 4096, 64),
    "wan": (1, 16, 21, 90, 160),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_tag(device: torch.device) -> str:
    """A short, file-name-safe name of the machine the numbers come from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name.replace("NVIDIA ", "")).strip("-").lower()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], device: torch.device, repeats: int, min_time: float = 0.0) -> float:
    """Median wall time of ``fn`` in seconds after one warm-up call (device work included)."""
    fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_time:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def device_time(fn: Callable[[], None], device: torch.device, launches: int = 50, repeats: int = 7) -> float:
    """Median seconds per call of ``fn`` issued back to back ``launches`` times.

    On a GPU this is timed with CUDA events, so it is the device time of the work rather
    than the launch-and-synchronise round trip of a single call.
    """
    if device.type != "cuda":
        return median_time(fn, device, repeats=max(repeats, 20))
    fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / launches)
    return statistics.median(times)


def host_time(fn: Callable[[], None], device: torch.device, launches: int = 50) -> float:
    """Seconds of host time per call of ``fn`` issued back to back without waiting for the device:
    what one call costs the CPU (argument checks, dispatch, kernel launch).  A device kernel
    shorter than this leaves the device idle between calls."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(launches):
        fn()
    elapsed = time.perf_counter() - start
    synchronize(device)
    return elapsed / launches


def kernel_seconds(device: torch.device, repeats: int, launches: int = 20) -> Callable[[Callable[[], None]], float]:
    """``seconds(fn)``: per-call device time of ``launches`` back-to-back calls on a GPU (CUDA events),
    the median wall time of single calls on the CPU."""
    def seconds(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            return device_time(fn, device, launches=launches, repeats=repeats)
        return median_time(fn, device, repeats=repeats)

    return seconds


def kernel_setup(args: argparse.Namespace, launches: int):
    """``(device, repeats, seconds)`` for a kernel benchmark's ``--device``, ``--threads``,
    ``--repeats`` and ``--quick``: repeats default to 3 (quick), 5 (CPU) or 20 (GPU rounds)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else (5 if device.type == "cpu" else 20))
    return device, repeats, kernel_seconds(device, repeats, launches=launches)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    n = nbytes // 4
    if device.type == "cpu":
        n //= 16
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = device_time(lambda: dst.copy_(src), device, launches=10)
    return 2 * src.numel() * 4 / t


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON results")
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke runs)")
    return p


def write_results(out_dir: Path, name: str, device: torch.device, payload: dict, text=None) -> Path:
    """``<out_dir>/<device>/<name>.json`` (with run metadata) and, given ``text`` lines, the
    printed tables as ``<name>.txt`` beside it."""
    out_dir = Path(out_dir) / device_tag(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    meta = {
        "device": device_tag(device),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }
    path.write_text(json.dumps({"meta": meta, **payload}, indent=2) + "\n")
    if text is not None:
        path.with_suffix(".txt").write_text("\n".join(text) + "\n")
        print(f"wrote {path} and {path.with_suffix('.txt').name}")
    return path


def format_table(rows: list, columns: list) -> str:
    """Fixed-width text table of dict rows."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
