"""Training-free feature caching: reuse block computations across denoising steps.

::

    import stepfuse.cache as sc

    sc.apply(pipe.transformer, sc.FirstBlockCache(threshold=0.08), num_inference_steps=50)
    image = pipe(...).images
    print(sc.stats(pipe.transformer))
    sc.remove(pipe.transformer)

or ``stepfuse.accelerate(pipe, cache=sc.DualBlockCache(front_blocks=2, back_blocks=1))``, which
also tells the cache each call's step count and releases its memory when the call ends.  The
policies are in :mod:`stepfuse.cache.policies`; :func:`calibrate` fits TeaCache's polynomial and
MagCache's ratios for any model.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from .adapters import block_stack, unet_blocks
from .calibrate import Calibration, calibrate
from .policies import (STATIC_PRESETS, CachePolicy, DeepCache, DualBlockCache, FirstBlockCache, MagCache,
                       StaticCache, TaylorSeer, TeaCache)
from .runtime import BlockCacheRuntime, CacheStats, DeepCacheRuntime, attach_context, branch, detach_context

__all__ = [
    "CachePolicy", "FirstBlockCache", "DualBlockCache", "TeaCache", "MagCache", "TaylorSeer", "DeepCache",
    "StaticCache", "STATIC_PRESETS", "apply", "remove", "stats", "reset", "release", "set_num_inference_steps",
    "branch", "CacheStats", "calibrate", "Calibration",
]

_ATTR = "_stepfuse_cache"


def apply(model: torch.nn.Module, policy: CachePolicy, *, num_inference_steps: Optional[int] = None,
          blocks: Optional[Union[str, Sequence[str]]] = None) -> torch.nn.Module:
    """Install ``policy`` on ``model`` (a diffusers transformer or UNet) and return the model.

    Args:
        num_inference_steps: the run's step count (model calls per CFG branch), needed by static
            masks, MagCache and cool-down steps; a branch's cache also resets when it is reached.
        blocks: block-list attribute names for a transformer stepfuse does not know.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"stepfuse.cache.apply: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(policy, CachePolicy):
        raise TypeError(f"stepfuse.cache.apply: policy must be a stepfuse.cache policy, got {type(policy).__name__}")
    if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                            or not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"stepfuse.cache.apply: num_inference_steps must be a positive int, got {num_inference_steps!r}")
    if getattr(model, _ATTR, None) is not None:
        raise ValueError(f"stepfuse.cache.apply: {type(model).__name__} already has a cache; remove() it first")
    if policy.family == "unet":
        runtime = DeepCacheRuntime(model, policy, unet_blocks(model), num_inference_steps)
    else:
        if hasattr(model, "down_blocks") and hasattr(model, "up_blocks") and blocks is None:
            raise ValueError(f"stepfuse.cache.apply: {type(policy).__name__} caches transformer blocks; "
                             f"{type(model).__name__} is a UNet: use DeepCache")
        runtime = BlockCacheRuntime(model, policy, block_stack(model, blocks), num_inference_steps)
    runtime.install()
    attach_context(model, runtime)
    setattr(model, _ATTR, runtime)
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply`: the original forwards back, every cached tensor released."""
    runtime = _runtime(model, "remove")
    detach_context(model)  # the relay hook wraps the cache's own forward: it goes first
    runtime.uninstall()
    delattr(model, _ATTR)
    return model


def stats(model: torch.nn.Module, reset: bool = False) -> CacheStats:
    """Block evaluations run and skipped, cached steps and memory held since install (or the last reset)."""
    runtime = _runtime(model, "stats")
    out = dataclasses.replace(runtime.resolve(), decisions=list(runtime.stats.decisions))  # a snapshot
    if reset:
        runtime.stats = CacheStats(memory_bytes=out.memory_bytes, peak_memory_bytes=out.memory_bytes)
    return out


def reset(model: torch.nn.Module) -> None:
    """Start a new run: every branch's cache and step count cleared (memory released)."""
    _runtime(model, "reset").release()


release = reset


def set_num_inference_steps(model: torch.nn.Module, num_inference_steps: Optional[int]) -> None:
    """The next run's step count (what :func:`stepfuse.accelerate` sets from the scheduler)."""
    _runtime(model, "set_num_inference_steps").num_inference_steps = num_inference_steps


def _runtime(model, what):
    runtime = getattr(model, _ATTR, None)
    if runtime is None:
        raise ValueError(f"stepfuse.cache.{what}: {type(model).__name__} has no stepfuse cache (apply() one first)")
    return runtime
