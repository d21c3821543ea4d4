"""Feature-cache kernels: ``torch.ops.stepfuse.cache_*`` (csrc/cache.h), with their fake impls.

* :func:`cache_distance` - per-sample ``(sum |a - b|, sum |b|)`` in one pass (float32 ``[B, 2]``);
  the relative L1 change that first-block / dual-block caches, TeaCache and MagCache-style
  policies threshold.  Deterministic: the same input gives the same bits on every call.
* :func:`cache_decide` - turns those sums into the skip decision (a bool tensor of shape
  ``[]`` on the device) and advances the policy's float64 ``state`` in place, with no host sync.
* :func:`residual_store` / :func:`residual_apply` / :func:`residual_add` - the cached
  residual ``output - input`` of the skipped blocks, and adding it back.
* :func:`taylor_update` / :func:`taylor_predict` - TaylorSeer (Liu et al. 2025): finite-
  difference derivatives of a feature at full steps, and their Taylor forecast at skipped ones.

The compiled ops check their inputs (``ValueError``/``TypeError`` naming the argument); the
wrappers convert host arguments and check what the dispatcher would reject first.
"""

from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import torch

from .. import _C  # noqa: F401  (registers the ops)

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_TAYLOR_ORDER = 4  # csrc/cache.h, kMaxTaylorOrder
_MAX_POLY_TERMS = 16  # csrc/cache.h, kMaxPolyTerms
_ops = torch.ops.stepfuse


def _int(op: str, name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}") from None


def _float(op: str, name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Python number (a host value), got a tensor")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__}") from None


def cache_distance(a: torch.Tensor, b: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """float32 ``[B, 2]``: per sample ``(sum_j |a_j - b_j|, sum_j |b_j|)`` over the flattened elements
    ``j = 0, stride, 2 stride, ...`` (``stride > 1`` subsamples the sums for a cheaper estimate)."""
    return _ops.cache_distance.default(a, b, _int("cache_distance", "stride", stride))


def cache_decide(sums: torch.Tensor, state: torch.Tensor, poly: Sequence[float] = (),
                 threshold: Optional[float] = None, accumulate: bool = False, pooled: bool = False,
                 max_consecutive: int = -1, max_cached: int = -1, force: bool = False) -> torch.Tensor:
    """Whether to reuse the cache this step (bool tensor of shape ``[]`` on ``sums``' device).

    ``sums`` is ``cache_distance``'s output (possibly summed across ranks); ``state`` is
    float64 ``[accumulator, consecutive_cached, total_cached, last_metric]``, updated in place.
    The metric is the relative L1 change, pooled over the batch or the largest per sample;
    ``poly`` (numpy.polyval order) rescales it and ``accumulate`` sums it over skipped steps
    (TeaCache).  Skips while the value is under ``threshold``, at most ``max_consecutive``
    steps in a row and ``max_cached`` in total (negative: unbounded), never when ``force``.
    """
    op = "cache_decide"
    if threshold is None:
        raise ValueError(f"{op}: threshold is required")
    if isinstance(poly, torch.Tensor):
        raise TypeError(f"{op}: poly must be a sequence of Python floats (host values), got a tensor")
    return _ops.cache_decide.default(
        sums, state, [_float(op, "poly", c) for c in poly], _float(op, "threshold", threshold), bool(accumulate),
        bool(pooled), _int(op, "max_consecutive", max_consecutive), _int(op, "max_cached", max_cached), bool(force))


def residual_store(output: torch.Tensor, input: torch.Tensor, residual: torch.Tensor) -> None:
    """``residual = output - input`` in fp32, written into ``residual`` (float32 or the inputs' dtype)."""
    _ops.cache_residual_store.default(output, input, residual)


def residual_apply(x: torch.Tensor, residual: torch.Tensor) -> None:
    """``x += residual`` in place, in fp32 (``residual`` float32 or ``x``'s dtype)."""
    _ops.cache_residual_apply.default(x, residual)


def residual_add(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``x + residual`` as a new contiguous tensor in ``x``'s dtype (a copy of ``x``, then :func:`residual_apply`)."""
    out = x.clone(memory_format=torch.contiguous_format)
    residual_apply(out, residual)
    return out


def taylor_update(feature: torch.Tensor, factors: torch.Tensor, dt: float, valid: int) -> None:
    """Advance TaylorSeer's derivative estimates with a freshly computed ``feature``, in place.

    ``factors`` is ``[order + 1, *feature.shape]`` (order 0 to 4; float32 or ``feature``'s
    dtype); ``valid`` is how many leading slots hold data (0 at the first full step; the
    caller tracks it) and ``dt`` the step distance since the previous full computation.
    ``new[0] = feature``, ``new[k] = (new[k-1] - old[k-1]) / dt`` for ``k <= min(valid, order)``.
    """
    op = "cache_taylor_update"
    _ops.cache_taylor_update.default(feature, factors, _float(op, "dt", dt), _int(op, "valid", valid))


def taylor_predict(factors: torch.Tensor, dt: float, terms: int, out: Optional[torch.Tensor] = None,
                   accumulate: bool = False, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``out = (out if accumulate else 0) + sum_{k < terms} factors[k] dt^k / k!``; returns ``out``.

    ``dt`` is the distance from the last full step; without ``out`` one is allocated in
    ``dtype`` (default: ``factors``' dtype).
    """
    op = "cache_taylor_predict"
    if out is None:
        if accumulate:
            raise ValueError(f"{op}: accumulate=True needs out")
        if factors.dim() < 1:
            raise ValueError(f"{op}: factors must be [order + 1, ...], got shape {tuple(factors.shape)}")
        out = factors.new_empty(factors.shape[1:], dtype=dtype or factors.dtype)
    elif dtype is not None and dtype != out.dtype:
        raise TypeError(f"{op}: dtype {dtype} disagrees with out's dtype {out.dtype}")
    _ops.cache_taylor_predict.default(factors, _float(op, "dt", dt), _int(op, "terms", terms), out, bool(accumulate))
    return out


# -- fakes: the checks of csrc/cache.cpp that shapes, dtypes and devices allow, for traced calls --
def _check_dtype(op: str, name: str, t: torch.Tensor, allowed=_CACHE_DTYPES) -> None:
    if t.dtype not in allowed:
        names = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must be {names}, got {t.dtype}")


def _check_placed(op: str, name: str, t: torch.Tensor, like: torch.Tensor, like_name: str, shape) -> None:
    if t.device != like.device:
        raise ValueError(f"{op}: {name} must be on {like.device} like {like_name}, got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_factors(op: str, factors: torch.Tensor) -> None:
    if factors.dim() < 1 or not 1 <= factors.shape[0] <= _MAX_TAYLOR_ORDER + 1:
        raise ValueError(f"{op}: factors must be [order + 1, ...] with order 0 to {_MAX_TAYLOR_ORDER}, "
                         f"got shape {tuple(factors.shape)}")


@torch.library.register_fake("stepfuse::cache_distance")
def _cache_distance_fake(a, b, stride=1):
    op = "cache_distance"
    _check_dtype(op, "a", a)
    _check_dtype(op, "b", b, (a.dtype,))
    _check_placed(op, "b", b, a, "a", a.shape)
    if a.dim() < 1 or a.shape[0] < 1 or a.numel() < a.shape[0]:
        raise ValueError(f"{op}: a must be [B, ...] with B >= 1 and at least one element per sample, "
                         f"got shape {tuple(a.shape)}")
    if stride < 1:
        raise ValueError(f"{op}: stride must be >= 1, got {stride}")
    return a.new_empty((a.shape[0], 2), dtype=torch.float32)


@torch.library.register_fake("stepfuse::cache_decide")
def _cache_decide_fake(sums, state, poly, threshold, accumulate, pooled, max_consecutive, max_cached, force):
    op = "cache_decide"
    _check_dtype(op, "sums", sums, (torch.float32,))
    if sums.dim() != 2 or sums.shape[0] < 1 or sums.shape[1] != 2:
        raise ValueError(f"{op}: sums must be [B, 2] with B >= 1 (from cache_distance), got {tuple(sums.shape)}")
    _check_dtype(op, "state", state, (torch.float64,))
    _check_placed(op, "state", state, sums, "sums", (4,))
    if len(poly) > _MAX_POLY_TERMS or not all(math.isfinite(c) for c in poly):
        raise ValueError(f"{op}: poly must hold at most {_MAX_POLY_TERMS} finite coefficients, got {list(poly)}")
    if not math.isfinite(threshold):
        raise ValueError(f"{op}: threshold must be finite, got {threshold}")
    return sums.new_empty((), dtype=torch.bool)


@torch.library.register_fake("stepfuse::cache_residual_store")
def _cache_residual_store_fake(output, input, residual):
    op = "cache_residual_store"
    _check_dtype(op, "output", output)
    _check_dtype(op, "input", input, (output.dtype,))
    _check_placed(op, "input", input, output, "output", output.shape)
    _check_dtype(op, "residual", residual, (torch.float32, output.dtype))
    _check_placed(op, "residual", residual, output, "output", output.shape)


@torch.library.register_fake("stepfuse::cache_residual_apply")
def _cache_residual_apply_fake(x, residual):
    op = "cache_residual_apply"
    _check_dtype(op, "x", x)
    _check_dtype(op, "residual", residual, (torch.float32, x.dtype))
    _check_placed(op, "residual", residual, x, "x", x.shape)


@torch.library.register_fake("stepfuse::cache_taylor_update")
def _cache_taylor_update_fake(feature, factors, dt, valid):
    op = "cache_taylor_update"
    _check_dtype(op, "feature", feature)
    _check_factors(op, factors)
    _check_dtype(op, "factors", factors, (torch.float32, feature.dtype))
    _check_placed(op, "factors", factors, feature, "feature", (factors.shape[0], *feature.shape))
    if not math.isfinite(dt) or dt == 0:
        raise ValueError(f"{op}: dt must be finite and non-zero, got {dt}")
    if valid < 0:
        raise ValueError(f"{op}: valid must be >= 0, got {valid}")


@torch.library.register_fake("stepfuse::cache_taylor_predict")
def _cache_taylor_predict_fake(factors, dt, terms, out, accumulate):
    op = "cache_taylor_predict"
    _check_dtype(op, "factors", factors)
    _check_factors(op, factors)
    _check_dtype(op, "out", out)
    _check_placed(op, "out", out, factors, "factors", factors.shape[1:])
    if not math.isfinite(dt):
        raise ValueError(f"{op}: dt must be finite, got {dt}")
    if not 1 <= terms <= factors.shape[0]:
        raise ValueError(f"{op}: terms must be 1 to {factors.shape[0]} (factors.size(0)), got {terms}")
