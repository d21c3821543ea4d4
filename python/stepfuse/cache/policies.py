"""Feature-cache policies: small frozen config objects, one per method.

Adjacent denoising steps compute nearly the same block features; each policy decides, per
step and per CFG branch, which part of the model's block stack to run and what to reuse
for the rest.  The block caches see a transformer's blocks as one stack
``[front | middle | back]``: the front blocks always run, the middle is run or replaced by
its cached residual (``out - in``), the back blocks always run as a corrector.

The methods and their papers:

* :class:`FirstBlockCache` — ParaAttention's first-block cache / diffusers'
  ``FirstBlockCacheConfig``: the relative L1 change of the first block's residual decides
  whether the other blocks are reused (a :class:`DualBlockCache` with one front block).
* :class:`DualBlockCache` — cache-dit's DBCache: ``front_blocks`` (Fn) computed and used for
  the decision, ``back_blocks`` (Bn) always computed, the middle reused as a residual; warm-up
  steps, a cap on consecutive cached steps and on cached steps in total.
* :class:`TeaCache` — Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video
  Diffusion Model", eq. 4-6: the relative L1 change of the timestep-modulated input, rescaled
  by a polynomial fitted per model (:func:`stepfuse.cache.calibrate`), accumulated until it
  crosses ``threshold``; every block is skipped while it stays below.
* :class:`MagCache` — Ma et al. 2025, "MagCache: Fast Video Generation with Magnitude-Aware
  Cache": calibrated ratios of successive residual magnitudes; the accumulated error
  ``sum |1 - prod ratio|`` is the skip budget (no metric pass at all at run time).
* :class:`TaylorSeer` — Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion
  Models with TaylorSeers", eq. 6-8: finite-difference derivatives of the cached residual at
  full steps, a Taylor forecast at the others; alone (fixed interval) or as the corrector of a
  block cache (``taylorseer=``), forecasting instead of reusing the stale residual.
* :class:`DeepCache` — Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free":
  for UNets, the deep features entering the up-block ``branch`` reused for ``interval - 1``
  steps out of ``interval``; only the shallow down/up blocks run in between.
* :class:`StaticCache` — FORA (Selvaraju et al. 2024) style fixed step masks: full steps every
  ``interval`` steps (or a named preset / explicit mask); the middle blocks reused in between.

Batches: the data-dependent decisions are all-or-nothing per model call.  With
``batch_decision="all"`` (default) the call is cached only when every sample's relative
change is below the threshold (``max`` over samples); ``"mean"`` pools the whole batch
(diffusers' and cache-dit's behaviour, which can cache a sample that changed a lot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Tuple

__all__ = [
    "CachePolicy",
    "FirstBlockCache",
    "DualBlockCache",
    "TeaCache",
    "MagCache",
    "TaylorSeer",
    "DeepCache",
    "StaticCache",
    "STATIC_PRESETS",
]

_BATCH_DECISIONS = ("all", "mean")
_DECISIONS = ("auto", "host", "device")

# Named FORA-style step masks: (warm-up fraction always computed, interval, cool-down steps).
STATIC_PRESETS = {
    "fora-2": (0.1, 2, 1),
    "fora-3": (0.1, 3, 1),
    "fora-4": (0.1, 4, 1),
    "slow": (0.2, 2, 2),
    "medium": (0.15, 3, 1),
    "fast": (0.1, 4, 1),
}


def _real(owner: str, name: str, value, lo: Optional[float] = None, hi: Optional[float] = None,
          open_lo: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    if lo is not None and (value < lo or (open_lo and value == lo)):
        raise ValueError(f"{owner}: {name} must be {'>' if open_lo else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{owner}: {name} must be <= {hi}, got {value}")
    return value


def _int(owner: str, name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{owner}: {name} must be >= {lo}, got {value}")
    return value


def _taylorseer(owner: str, value) -> None:
    if value is not None and not isinstance(value, TaylorSeer):
        raise TypeError(f"{owner}: taylorseer must be a TaylorSeer or None, got {type(value).__name__}")


def _choice(owner: str, name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{owner}: {name} must be one of {options}, got {value!r}")


def _floats(owner: str, name: str, values, minimum_length: int = 0) -> Tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{owner}: {name} must be a sequence of numbers, got {type(values).__name__}")
    out = tuple(_real(owner, f"{name}[{i}]", v) for i, v in enumerate(values))
    if len(out) < minimum_length:
        raise ValueError(f"{owner}: {name} needs at least {minimum_length} values, got {len(out)}")
    return out


def _interval_mask(num_steps: int, warmup: int, interval: int, cooldown: int) -> Tuple[bool, ...]:
    # Full steps: the warm-up, the cool-down, and every interval-th step in between.
    return tuple(i < warmup or i >= num_steps - cooldown or (i - warmup) % interval == 0 for i in range(num_steps))


@dataclass(frozen=True)
class CachePolicy:
    """Options every policy shares.

    Args:
        warmup_steps: steps at the start of a run that always compute everything.
        per_branch: keep a separate cache per CFG branch (model calls made under
            ``cache_context(name)`` / :func:`stepfuse.cache.branch`); a batched CFG call is one branch.
        offload: keep cached tensors in (pinned) host memory between steps, moved to the device
            only when used: less device memory for a copy each way.
        decision: where the data-dependent skip flag is used.  ``"auto"`` reads it on the host
            (a one-byte copy per step) except while a CUDA graph is being captured, where the skip
            becomes a conditional node of the graph (no sync); ``"host"`` always reads it (cannot
            be captured); ``"device"`` hands it to a device-side branch instead (conditional
            nodes when captured; otherwise ``torch.cond``, whose eager form reads it itself).  Residual reuse only: not with ``taylorseer`` or ``offload``.
        distributed: under ``torch.distributed`` (initialised, world size > 1), reduce the
            metric across ranks (one packed all-reduce) so every rank takes the same decision.
        parallel: what the ranks hold: ``"sequence"`` (shards of the same samples: sequence or
            tensor parallelism; the partial sums add up to the unsharded metric exactly) or
            ``"data"`` (different samples: the batch decision spans every rank's samples).
        process_group: the group to reduce over (default: the whole world), e.g. the sequence-
            parallel group of a hybrid layout.
    """

    warmup_steps: int = 0
    per_branch: bool = True
    offload: bool = False
    decision: str = "auto"
    distributed: bool = True
    parallel: str = "sequence"
    process_group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        owner = type(self).__name__
        _int(owner, "warmup_steps", self.warmup_steps, 0)
        _choice(owner, "decision", self.decision, _DECISIONS)
        _choice(owner, "parallel", self.parallel, ("sequence", "data"))
        for name in ("per_branch", "offload", "distributed"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{owner}: {name} must be a bool, got {type(getattr(self, name)).__name__}")

    #: Which runtime serves the policy: "blocks" (transformer block stacks) or "unet".
    family = "blocks"


@dataclass(frozen=True)
class TaylorSeer(CachePolicy):
    """TaylorSeer forecasting of the cached residual (orders 1 and 2).

    Alone, the stack runs in full every ``interval`` steps (after ``warmup_steps``) and the
    residual of the cached span is forecast from its finite-difference derivatives in between.
    As ``taylorseer=`` of a block cache, ``interval`` is unused: the block cache decides and the
    forecast replaces the stale residual.

    Args:
        order: Taylor order (1 or 2; 0 reuses the residual unchanged).
        interval: full steps every ``interval`` steps when used alone.
        front_blocks / back_blocks: blocks always computed before / after the forecast span.
    """

    order: int = 1
    interval: int = 3
    front_blocks: int = 0
    back_blocks: int = 0
    warmup_steps: int = 2

    def __post_init__(self):
        super().__post_init__()
        _int("TaylorSeer", "order", self.order, 0)
        if self.order > 2:
            raise ValueError(f"TaylorSeer: order must be 0, 1 or 2, got {self.order}")
        _int("TaylorSeer", "interval", self.interval, 1)
        _int("TaylorSeer", "front_blocks", self.front_blocks, 0)
        _int("TaylorSeer", "back_blocks", self.back_blocks, 0)


@dataclass(frozen=True)
class _MetricDecided(CachePolicy):
    """Options of the policies that decide from a metric pass (the block caches and TeaCache)."""

    threshold: float = 0.08
    max_consecutive_cached: int = -1
    max_cached_steps: int = -1
    batch_decision: str = "all"
    stride: int = 1
    taylorseer: Optional[TaylorSeer] = None
    warmup_steps: int = 1

    _threshold_max = 10.0

    def __post_init__(self):
        super().__post_init__()
        owner = type(self).__name__
        _real(owner, "threshold", self.threshold, 0.0, self._threshold_max)
        _int(owner, "max_consecutive_cached", self.max_consecutive_cached, -1)
        _int(owner, "max_cached_steps", self.max_cached_steps, -1)
        _choice(owner, "batch_decision", self.batch_decision, _BATCH_DECISIONS)
        _int(owner, "stride", self.stride, 1)
        _taylorseer(owner, self.taylorseer)


@dataclass(frozen=True)
class DualBlockCache(_MetricDecided):
    """Dual-block residual cache (cache-dit's DBCache).

    Args:
        front_blocks: Fn, blocks always computed; the last one's residual drives the decision.
        back_blocks: Bn, blocks always computed after the cached middle (a corrector).
        threshold: cache while the relative L1 change ``sum|r - r_prev| / sum|r_prev|`` of the
            front residual is below it (0 disables caching).
        max_consecutive_cached: at most this many cached steps in a row (-1: no cap).
        max_cached_steps: at most this many cached steps per run (-1: no cap).
        batch_decision: ``"all"`` (every sample under the threshold) or ``"mean"`` (pooled).
        stride: compare every ``stride``-th element (a cheaper metric on huge activations).
        taylorseer: forecast the middle residual instead of reusing it (``TaylorSeer(order=...)``).
    """

    front_blocks: int = 1
    back_blocks: int = 0

    def __post_init__(self):
        super().__post_init__()
        _int(type(self).__name__, "front_blocks", self.front_blocks, 1)
        _int(type(self).__name__, "back_blocks", self.back_blocks, 0)


@dataclass(frozen=True)
class FirstBlockCache(DualBlockCache):
    """First-block residual cache: one front block decides, no back blocks (ParaAttention's
    FBCache, diffusers' ``FirstBlockCacheConfig``); every :class:`DualBlockCache` option applies."""

    def __post_init__(self):
        super().__post_init__()
        if self.front_blocks != 1:
            raise ValueError(f"FirstBlockCache: front_blocks must be 1 (use DualBlockCache), got {self.front_blocks}")


@dataclass(frozen=True)
class TeaCache(_MetricDecided):
    """TeaCache: accumulated, polynomially rescaled relative L1 of the modulated input.

    Args:
        threshold: skip the whole block stack while the accumulated rescaled change stays below it.
        coefficients: the rescaling polynomial, highest degree first (``numpy.polyval`` order),
            fitted for the model by :func:`stepfuse.cache.calibrate`; empty uses the raw change.
        max_consecutive_cached / max_cached_steps / stride / taylorseer: as for the block caches;
        ``batch_decision`` defaults to ``"mean"`` (the paper's pooled metric).
    """

    threshold: float = 0.2
    coefficients: Tuple[float, ...] = ()
    batch_decision: str = "mean"

    _threshold_max = 100.0
    front_blocks = 0
    back_blocks = 0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "coefficients", _floats("TeaCache", "coefficients", self.coefficients))


@dataclass(frozen=True)
class MagCache(CachePolicy):
    """MagCache: skip while the accumulated magnitude-ratio error stays within ``threshold``.

    Args:
        mag_ratios: calibrated ratios ``mean ||r_i|| / ||r_{i-1}||`` of the stack residual, one
            per step of the calibration run (:func:`stepfuse.cache.calibrate`); resampled
            linearly in the step fraction when a run has another step count.
        threshold: error budget ``sum_k |1 - prod_{j<=k} ratio_j|`` over consecutive skips.
        max_skip_steps: at most this many skipped steps in a row (K in the paper).
        retention_ratio: the first fraction of steps always computes.
    """

    mag_ratios: Tuple[float, ...] = ()
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    front_blocks: int = 0
    back_blocks: int = 0
    taylorseer: Optional[TaylorSeer] = None

    def __post_init__(self):
        super().__post_init__()
        ratios = _floats("MagCache", "mag_ratios", self.mag_ratios, minimum_length=2)
        if any(r <= 0 for r in ratios):
            raise ValueError("MagCache: mag_ratios must be positive")
        object.__setattr__(self, "mag_ratios", ratios)
        _real("MagCache", "threshold", self.threshold, 0.0, 10.0)
        _int("MagCache", "max_skip_steps", self.max_skip_steps, 1)
        _real("MagCache", "retention_ratio", self.retention_ratio, 0.0, 1.0)
        _int("MagCache", "front_blocks", self.front_blocks, 0)
        _int("MagCache", "back_blocks", self.back_blocks, 0)
        _taylorseer("MagCache", self.taylorseer)


@dataclass(frozen=True)
class StaticCache(CachePolicy):
    """A fixed step mask: full steps every ``interval`` steps, the middle blocks reused between.

    Args:
        interval: full computation every ``interval`` steps after warm-up (FORA's N).
        preset: a name from :data:`STATIC_PRESETS` (warm-up fraction, interval, cool-down).
        mask: an explicit per-step mask (True = compute), overriding the rest.
        cooldown_steps: the last steps always compute.
        front_blocks / back_blocks: blocks always computed around the reused middle.
        taylorseer: forecast the reused residual instead of reusing it.
    """

    interval: int = 2
    preset: Optional[str] = None
    mask: Optional[Tuple[bool, ...]] = None
    cooldown_steps: int = 1
    front_blocks: int = 0
    back_blocks: int = 0
    taylorseer: Optional[TaylorSeer] = None

    def __post_init__(self):
        super().__post_init__()
        _int("StaticCache", "interval", self.interval, 1)
        _int("StaticCache", "cooldown_steps", self.cooldown_steps, 0)
        _int("StaticCache", "front_blocks", self.front_blocks, 0)
        _int("StaticCache", "back_blocks", self.back_blocks, 0)
        if self.preset is not None and self.preset not in STATIC_PRESETS:
            raise ValueError(f"StaticCache: preset must be one of {sorted(STATIC_PRESETS)}, got {self.preset!r}")
        _taylorseer("StaticCache", self.taylorseer)
        if self.mask is not None:
            if isinstance(self.mask, (str, bytes)) or not hasattr(self.mask, "__iter__") \
                    or not all(isinstance(m, bool) for m in self.mask):
                raise TypeError("StaticCache: mask must be a sequence of bools")
            object.__setattr__(self, "mask", tuple(self.mask))

    def step_mask(self, num_steps: int) -> Tuple[bool, ...]:
        """Which of ``num_steps`` steps compute in full (True)."""
        if self.mask is not None:
            if len(self.mask) != num_steps:
                raise ValueError(f"StaticCache: mask has {len(self.mask)} entries for a run of {num_steps} steps")
            return self.mask
        warmup, interval, cooldown = self.warmup_steps, self.interval, self.cooldown_steps
        if self.preset is not None:
            fraction, interval, cooldown = STATIC_PRESETS[self.preset]
            warmup = max(warmup, int(math.ceil(fraction * num_steps)))
        return _interval_mask(num_steps, warmup, interval, cooldown)


@dataclass(frozen=True)
class DeepCache(CachePolicy):
    """DeepCache for UNets: the features entering up-block ``branch`` (counted from the output
    side: 0 is the last up block) reused for ``interval - 1`` steps out of ``interval``.

    Args:
        interval: a full UNet pass every ``interval`` steps (N in the paper).
        branch: how many shallow up/down block pairs still run at cached steps, minus one
            (``branch=0``: only the outermost down and up blocks run).
        cooldown_steps: the last steps always compute.
    """

    interval: int = 3
    branch: int = 0
    cooldown_steps: int = 0

    family = "unet"

    def __post_init__(self):
        super().__post_init__()
        _int("DeepCache", "interval", self.interval, 1)
        _int("DeepCache", "branch", self.branch, 0)
        _int("DeepCache", "cooldown_steps", self.cooldown_steps, 0)

    def step_mask(self, num_steps: int) -> Tuple[bool, ...]:
        """Which of ``num_steps`` steps run the whole UNet (True)."""
        return _interval_mask(num_steps, self.warmup_steps, self.interval, self.cooldown_steps)
