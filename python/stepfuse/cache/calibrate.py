"""Per-model calibration of TeaCache's rescaling polynomial and MagCache's magnitude ratios.

Published TeaCache coefficients and MagCache ratios were fitted for one model, one resolution
and one step count.  :func:`calibrate` measures them for the model at hand from a few uncached
runs: at every step and CFG branch it records

* ``x`` — the relative L1 change of TeaCache's indicator (the first block's timestep-modulated
  input) since the previous step, and ``y`` — the relative L1 change of the block stack's output;
  the polynomial ``y ~ poly(x)`` (least squares, ``numpy.polyfit``) is TeaCache's rescaling
  (Liu et al. 2025, sec. 3.4);
* the ratio of successive residual magnitudes ``mean_tokens ||r_t|| / ||r_{t-1}||`` with
  ``r = stack output - stack input`` (Ma et al. 2025, eq. 3), averaged over runs and branches.
"""

from __future__ import annotations

import json
import os
import types
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .adapters import block_stack
from .policies import CachePolicy, MagCache, TeaCache

__all__ = ["Calibration", "calibrate"]

_FORMAT = "stepfuse.cache.calibration/1"


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured, saved and loaded as JSON."""

    model: str
    num_inference_steps: int
    teacache_coefficients: tuple
    mag_ratios: tuple
    samples: Dict[str, list] = field(default_factory=dict)

    def teacache(self, threshold: float = 0.2, **options) -> TeaCache:
        return TeaCache(threshold=threshold, coefficients=self.teacache_coefficients, **options)

    def magcache(self, threshold: float = 0.06, **options) -> MagCache:
        return MagCache(mag_ratios=self.mag_ratios, threshold=threshold, **options)

    def save(self, path: Union[str, os.PathLike]) -> None:
        data = {"format": _FORMAT, **asdict(self)}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Calibration":
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.pop("format", None) != _FORMAT:
            raise ValueError(f"Calibration.load: {os.fspath(path)} is not a stepfuse cache calibration ({_FORMAT})")
        try:
            return cls(model=str(data["model"]), num_inference_steps=int(data["num_inference_steps"]),
                       teacache_coefficients=tuple(float(c) for c in data["teacache_coefficients"]),
                       mag_ratios=tuple(float(r) for r in data["mag_ratios"]), samples=dict(data.get("samples", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Calibration.load: {os.fspath(path)} is malformed: {e}") from None


def _relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    return float((current.double() - previous.double()).abs().sum() / previous.double().abs().sum().clamp_min(1e-30))


def _magnitude_ratio(current: torch.Tensor, previous: torch.Tensor) -> float:
    # Token-wise L2 norms over the feature dimension, their ratio averaged (MagCache eq. 3).
    norm = lambda r: r.double().flatten(1, -2).norm(dim=-1) if r.dim() > 2 else r.double().norm(dim=-1)
    return float((norm(current) / norm(previous).clamp_min(1e-30)).mean())


class _Trace:
    """One branch's previous-step tensors and the per-step measurements so far."""

    def __init__(self):
        self.indicator = self.output = self.residual = None
        self.x: List[float] = []
        self.y: List[float] = []
        self.ratios: List[float] = [1.0]

    def add(self, indicator, stack_input, stack_output) -> None:
        residual = stack_output - stack_input
        if self.output is not None:
            self.x.append(_relative_l1(indicator, self.indicator))
            self.y.append(_relative_l1(stack_output, self.output))
            self.ratios.append(_magnitude_ratio(residual, self.residual))
        self.indicator, self.output, self.residual = indicator.detach(), stack_output.detach(), residual.detach()


@torch.no_grad()
def calibrate(model: torch.nn.Module, runs: Union[Callable[[], object], Sequence[Callable[[], object]]], *,
              degree: int = 4, blocks: Optional[Sequence[str]] = None) -> Calibration:
    """Calibrate TeaCache and MagCache for ``model`` (a transformer stepfuse knows, or one with
    ``blocks`` named) from uncached runs.

    Args:
        runs: a callable running one whole sampling run with ``model`` (e.g. ``lambda: pipe(...)``),
            or several (different prompts, classes or seeds); each starts a fresh trace.
        degree: degree of TeaCache's rescaling polynomial.

    Every run must have the same number of steps; CFG branches called separately (under
    diffusers' ``cache_context`` or :func:`stepfuse.cache.branch`) are traced separately.
    """
    from .runtime import _BRANCH, attach_context, detach_context  # branch names as the caches see them

    if callable(runs):
        runs = [runs]
    runs = list(runs)
    if not runs or not all(callable(r) for r in runs):
        raise TypeError("stepfuse.cache.calibrate: runs must be a callable or a non-empty sequence of callables")
    if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= 8:
        raise ValueError(f"stepfuse.cache.calibrate: degree must be an int in [1, 8], got {degree!r}")
    if getattr(model, "_stepfuse_cache", None) is not None:
        raise ValueError("stepfuse.cache.calibrate: the model has a cache installed; remove() it first")
    stack = block_stack(model, blocks)
    first, last = stack.blocks[0], stack.blocks[-1]
    traces: List[Dict[str, _Trace]] = []
    pending: Dict[str, tuple] = {}

    def branch_name() -> str:
        name = (_BRANCH.get() or (None, None))[0]
        if name is None:
            name = getattr(sink.context, "name", None)
        return name or "default"

    def before_first(module, args, kwargs):
        hidden, _ = stack.io[0].read(args, kwargs)
        pending[branch_name()] = (stack.indicator(first, args, kwargs, hidden).float(), hidden.float())

    def after_last(module, args, kwargs, output):
        key = branch_name()
        indicator, stack_input = pending.pop(key)
        traces[-1].setdefault(key, _Trace()).add(indicator, stack_input, stack.io[-1].unpack(output)[0].float())

    sink = types.SimpleNamespace(context=None)
    attach_context(model, sink)
    handles = [first.register_forward_pre_hook(before_first, with_kwargs=True),
               last.register_forward_hook(after_last, with_kwargs=True)]
    try:
        for run in runs:
            traces.append({})
            run()
    finally:
        for h in handles:
            h.remove()
        detach_context(model)
    all_traces = [t for run in traces for t in run.values()]
    lengths = {len(t.ratios) for t in all_traces}
    if not all_traces or len(lengths) != 1:
        raise ValueError(f"stepfuse.cache.calibrate: every run must call the model the same number of times per "
                         f"branch (got {sorted(lengths) or 'no calls'})")
    steps = lengths.pop()
    x = np.concatenate([t.x for t in all_traces])
    y = np.concatenate([t.y for t in all_traces])
    if len(x) < degree + 1:
        raise ValueError(f"stepfuse.cache.calibrate: {len(x)} step pairs cannot fit a degree-{degree} polynomial")
    coefficients = np.polyfit(x, y, degree)
    ratios = np.mean([t.ratios for t in all_traces], axis=0)
    return Calibration(model=stack.model_name, num_inference_steps=steps,
                       teacache_coefficients=tuple(float(c) for c in coefficients),
                       mag_ratios=tuple(float(r) for r in ratios),
                       samples={"x": x.tolist(), "y": y.tolist()})
