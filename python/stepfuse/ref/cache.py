"""Pure-PyTorch references of the feature-cache ops (``torch.ops.stepfuse.cache_*``), formula by formula.

These are the test oracle of the kernels and the "plain PyTorch" baseline of
``benchmarks/bench_cache_ops.py``.  ``plain_metric`` is the relative L1 distance as other
caching libraries compute it: several passes, and a 0-dim tensor the caller then
compares on the host.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# Floor of the relative distance's denominators (csrc/cache.h, kDistanceFloor).
DISTANCE_FLOOR = 1e-30


def cache_distance(a: torch.Tensor, b: torch.Tensor, stride: int = 1,
                   compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """float32 ``[B, 2]``: per sample ``(sum_j |a_j - b_j|, sum_j |b_j|)``.

    ``j`` runs over the flattened elements ``0, stride, 2 stride, ...``; sums in ``compute_dtype``.
    """
    fa = a.reshape(a.shape[0], -1)[:, ::stride].to(compute_dtype)
    fb = b.reshape(b.shape[0], -1)[:, ::stride].to(compute_dtype)
    return torch.stack([(fa - fb).abs().sum(dim=1), fb.abs().sum(dim=1)], dim=1).to(torch.float32)


def polyval(poly: Sequence[float], x):
    """numpy.polyval order (``poly[0]`` multiplies the highest power), by Horner's rule."""
    value = x * 0 + poly[0]
    for c in poly[1:]:
        value = value * x + c
    return value


def cache_decide(sums: torch.Tensor, state: torch.Tensor, poly: Sequence[float] = (), threshold: float = 0.0,
                 accumulate: bool = False, pooled: bool = False, max_consecutive: int = -1, max_cached: int = -1,
                 force: bool = False) -> torch.Tensor:
    """The skip decision (bool, shape ``[]``) from per-sample sums; ``state`` (float64 [4]) is updated in place.

    The metric is the relative L1 change: pooled over the batch, or the largest per sample.
    TeaCache (Liu et al. 2025) rescales it with a fitted polynomial and accumulates it over
    skipped steps; the cache is reused while the (accumulated) value stays under threshold.
    """
    s = sums.to(torch.float64)
    if pooled:
        metric = s[:, 0].sum() / s[:, 1].sum().clamp(min=DISTANCE_FLOOR)
    else:
        metric = (s[:, 0] / s[:, 1].clamp(min=DISTANCE_FLOOR)).max()
    value = polyval(list(poly), metric) if len(poly) else metric
    candidate = state[0] + value if accumulate else value
    skip = (candidate < threshold) & torch.tensor(not force, device=state.device)
    if max_consecutive >= 0:
        skip = skip & (state[1] < max_consecutive)
    if max_cached >= 0:
        skip = skip & (state[2] < max_cached)
    zero = torch.zeros_like(candidate)
    new = torch.stack([
        torch.where(skip, candidate if accumulate else zero, zero),
        torch.where(skip, state[1] + 1, zero),
        state[2] + skip.to(torch.float64),
        metric,
    ])
    state.copy_(new)
    return skip


def cache_residual_store(output: torch.Tensor, input: torch.Tensor, residual: torch.Tensor) -> None:
    """``residual = output - input`` in fp32, stored in ``residual``'s dtype."""
    residual.copy_((output.float() - input.float()).to(residual.dtype))


def cache_residual_apply(x: torch.Tensor, residual: torch.Tensor) -> None:
    """``x += residual`` in fp32, stored in ``x``'s dtype."""
    x.copy_((x.float() + residual.float()).to(x.dtype))


def cache_taylor_update(feature: torch.Tensor, factors: torch.Tensor, dt: float, valid: int) -> None:
    """TaylorSeer's finite differences (Liu et al. 2025): ``new[0] = f``, ``new[k] = (new[k-1] - old[k-1]) / dt``.

    Only slots ``0 .. min(valid, order)`` are written; ``order = factors.shape[0] - 1``.
    """
    updated = min(valid, factors.shape[0] - 1)
    new = [feature.float()]
    for k in range(1, updated + 1):
        new.append((new[k - 1] - factors[k - 1].float()) / dt)
    for k, value in enumerate(new):
        factors[k].copy_(value.to(factors.dtype))


def taylor_weights(dt: float, terms: int) -> list:
    """``dt^k / k!`` for ``k < terms``, in double."""
    return [dt**k / math.factorial(k) for k in range(terms)]


def cache_taylor_predict(factors: torch.Tensor, dt: float, terms: int, out: torch.Tensor,
                         accumulate: bool = False) -> None:
    """``out = (out if accumulate else 0) + sum_{k < terms} factors[k] dt^k / k!`` in fp32."""
    acc = out.float() if accumulate else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    for k, w in enumerate(taylor_weights(dt, terms)):
        acc = acc + float(torch.tensor(w, dtype=torch.float32)) * factors[k].float()
    out.copy_(acc.to(out.dtype))


def plain_metric(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L1 distance as other caching libraries write it: ``mean|a - b| / mean|b|`` (several passes)."""
    return (a - b).abs().mean() / b.abs().mean()
