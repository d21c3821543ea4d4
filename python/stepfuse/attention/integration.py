"""``stepfuse.attention.apply(model, config)`` and friends: install, inspect and remove sparse
attention on a diffusers transformer (the processors and schedule are in :mod:`.runtime`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..cache.runtime import attach_context, detach_context
from .config import SparseAttention
from .runtime import AttentionRuntime, AttentionStats

__all__ = ["apply", "remove", "stats", "reset", "set_num_inference_steps"]

_ATTR = "_stepfuse_attention"
_CONTEXT_HOOK = "stepfuse_attention_context"


def apply(model: torch.nn.Module, config: Optional[SparseAttention] = None, *,
          num_inference_steps: Optional[int] = None) -> torch.nn.Module:
    """Make ``model``'s self-attention block-sparse with ``config`` (default ``SparseAttention()``).

    ``num_inference_steps`` is the run's step count, needed when ``dense_steps`` is a fraction
    (:func:`stepfuse.accelerate` sets it for every call).  Returns ``model``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"stepfuse.attention.apply: model must be a torch.nn.Module, got {type(model).__name__}")
    config = SparseAttention() if config is None else config
    if not isinstance(config, SparseAttention):
        raise TypeError(f"stepfuse.attention.apply: config must be a SparseAttention, got {type(config).__name__}")
    _check_steps(num_inference_steps)
    if getattr(model, _ATTR, None) is not None:
        raise ValueError(f"stepfuse.attention.apply: {type(model).__name__} already has sparse attention; "
                         "remove() it first")
    runtime = AttentionRuntime(model, config, num_inference_steps)
    runtime.install()
    attach_context(model, runtime, _CONTEXT_HOOK)
    setattr(model, _ATTR, runtime)
    return model


def _check_steps(num_inference_steps) -> None:
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                            or not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"stepfuse.attention: num_inference_steps must be a positive int, got {num_inference_steps!r}")


def _runtime(model: torch.nn.Module, what: str) -> AttentionRuntime:
    runtime = getattr(model, _ATTR, None)
    if runtime is None:
        raise ValueError(f"stepfuse.attention.{what}: {type(model).__name__} has no sparse attention (apply() first)")
    return runtime


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: the original processors and forward come back."""
    runtime = _runtime(model, "remove")
    detach_context(model, _CONTEXT_HOOK)
    runtime.uninstall()
    delattr(model, _ATTR)
    return model


def stats(model: torch.nn.Module, reset: bool = False) -> AttentionStats:
    """Attention calls run sparse, dense by the schedule and dense by fallback (with reasons)."""
    runtime = _runtime(model, "stats")
    out = dataclasses.replace(runtime.resolve(), fallbacks=dict(runtime.stats.fallbacks))
    if reset:
        runtime.stats = AttentionStats()
    return out


def reset(model: torch.nn.Module) -> None:
    """Start a new run: every branch's masks and step count cleared."""
    _runtime(model, "reset").release()


def set_num_inference_steps(model: torch.nn.Module, num_inference_steps: Optional[int]) -> None:
    """The next run's step count (what :func:`stepfuse.accelerate` sets from the scheduler)."""
    _check_steps(num_inference_steps)
    _runtime(model, "set_num_inference_steps").num_inference_steps = num_inference_steps
