"""What sparse attention a model runs, and when it runs dense (the schedule).

One frozen config, :class:`SparseAttention`, holds the mask pattern and its parameters, the block
size, and the schedule: dense attention for the first ``dense_steps`` denoising steps and the first
``dense_layers`` attention layers (the early, high-noise steps fix the layout, and the first layers
attend broadly: Sparse VideoGen, Xi et al. 2025; Radial Attention, Li et al. 2025), masks rebuilt
every ``rebuild_every`` steps and reused in between (masks of neighbouring steps overlap heavily),
and a separate mask per classifier-free-guidance branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

__all__ = ["SparseAttention", "SPARSE_PATTERNS"]

#: adaptive: mean-pooled block scores kept by cumulative mass or top-k (SpargeAttn / XAttention style);
#: sliding_tile: 3-D tiles of video tokens and a window of tiles around each (Sliding Tile Attention);
#: radial: a spatial window that shrinks with temporal distance (Radial Attention);
#: per_head: each head's spatial or temporal pattern chosen by profiling (Sparse VideoGen).
SPARSE_PATTERNS = ("adaptive", "sliding_tile", "radial", "per_head")
_BLOCK_SIZES = (16, 32, 64, 128)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"SparseAttention: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"SparseAttention: {name} must be >= {minimum}, got {value}")
    return value


def _triple(name: str, value) -> Optional[Tuple[int, int, int]]:
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"SparseAttention: {name} must be a (t, h, w) triple of ints, got {value!r}")
    for v in value:
        _positive_int(name, v)
    return tuple(int(v) for v in value)


@dataclass(frozen=True)
class SparseAttention:
    """Block-sparse attention for a diffusion transformer's self-attention layers.

    Args:
        pattern: one of :data:`SPARSE_PATTERNS`.
        block_size: tokens per query/key block (16, 32, 64 or 128); ``None`` picks 128 on a GPU
            (the Triton kernel's 128-row tiles need whole 128-token blocks: about 20% more
            throughput than 64 on an H100) and 64 on the CPU, or the largest smaller size that
            still cuts the sequence into ``min_blocks_per_side`` blocks.
        mass: adaptive pattern: keep per query block the fewest key blocks whose estimated
            attention mass reaches this fraction (cumulative mass).
        top_k: adaptive pattern: keep this many key blocks per query block instead of ``mass``.
        min_blocks: adaptive pattern: at least this many key blocks per query block.
        sinks: key blocks at the start of the (visual) sequence every query keeps (attention sinks).
        dense_prompt: prompt tokens of joint attention (Flux, SD3) attend to every token and every
            token attends to them.  Off, the adaptive pattern's scores choose prompt blocks like any
            others; the geometric patterns always keep prompt tokens dense (they have no place on
            the latent grid).
        tile / window: sliding_tile pattern: tile shape in tokens (t, h, w) (``None``: one block's
            worth, e.g. (4, 4, 4) for 64 tokens of video, (1, 8, 8) for an image) and the window of
            tiles each tile attends to (odd sizes, centred).
        decay: radial pattern: how fast the spatial window shrinks with temporal distance (1.0:
            halves with every doubling of the frame distance, as in the paper).
        profile_rows: per_head pattern: query rows sampled per head to choose its pattern.
        dense_steps: the first steps run dense: an int count, or a float in [0, 1) as the fraction
            of the run's steps.
        dense_layers: the first this many attention layers always run dense.
        rebuild_every: data-dependent masks (adaptive, per_head) are rebuilt every this many steps
            and reused in between.
        per_branch: separate masks per classifier-free-guidance branch.
        min_blocks_per_side: shorter sequences run dense (fewer blocks leave nothing to skip).
    """

    pattern: str = "adaptive"
    block_size: Optional[int] = None
    mass: Optional[float] = 0.95
    top_k: Optional[int] = None
    min_blocks: int = 1
    sinks: int = 0
    dense_prompt: bool = True
    tile: Optional[Tuple[int, int, int]] = None
    window: Tuple[int, int, int] = (3, 3, 3)
    decay: float = 1.0
    profile_rows: int = 64
    dense_steps: Union[int, float] = 0.2
    dense_layers: int = 1
    rebuild_every: int = 2
    per_branch: bool = True
    min_blocks_per_side: int = 4

    def __post_init__(self):
        if self.pattern not in SPARSE_PATTERNS:
            raise ValueError(f"SparseAttention: pattern must be one of {SPARSE_PATTERNS}, got {self.pattern!r}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or self.block_size not in _BLOCK_SIZES):
            raise ValueError(f"SparseAttention: block_size must be None or one of {_BLOCK_SIZES}, got {self.block_size!r}")
        if self.top_k is not None:
            _positive_int("top_k", self.top_k)
            object.__setattr__(self, "mass", None)  # top_k replaces the mass criterion
        elif self.mass is None:
            raise ValueError("SparseAttention: give mass or top_k")
        else:
            if isinstance(self.mass, bool) or not isinstance(self.mass, (int, float)) \
                    or not (0.0 < float(self.mass) <= 1.0):
                raise ValueError(f"SparseAttention: mass must be in (0, 1], got {self.mass!r}")
        _positive_int("min_blocks", self.min_blocks)
        _positive_int("sinks", self.sinks, 0)
        _positive_int("profile_rows", self.profile_rows)
        _positive_int("dense_layers", self.dense_layers, 0)
        _positive_int("rebuild_every", self.rebuild_every)
        _positive_int("min_blocks_per_side", self.min_blocks_per_side)
        object.__setattr__(self, "tile", _triple("tile", self.tile))
        window = _triple("window", self.window)
        if any(w % 2 == 0 for w in window):
            raise ValueError(f"SparseAttention: window sizes must be odd (a centred window), got {window}")
        object.__setattr__(self, "window", window)
        if isinstance(self.decay, bool) or not isinstance(self.decay, (int, float)) or not (
                math.isfinite(self.decay) and self.decay > 0):
            raise ValueError(f"SparseAttention: decay must be a positive number, got {self.decay!r}")
        steps = self.dense_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, float)):
            raise TypeError(f"SparseAttention: dense_steps must be an int or a float fraction, got {type(steps).__name__}")
        if isinstance(steps, int) and steps < 0 or isinstance(steps, float) and not (0.0 <= steps < 1.0):
            raise ValueError(f"SparseAttention: dense_steps must be an int >= 0 or a fraction in [0, 1), got {steps!r}")
        for name in ("dense_prompt", "per_branch"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"SparseAttention: {name} must be a bool, got {type(getattr(self, name)).__name__}")

    @property
    def data_dependent(self) -> bool:
        """Whether masks depend on the queries and keys (then rebuilt on schedule), not only on the shape."""
        return self.pattern in ("adaptive", "per_head")

    def dense_step_count(self, total_steps: Optional[int]) -> int:
        """How many leading steps run dense in a run of ``total_steps``."""
        if isinstance(self.dense_steps, int):
            return self.dense_steps
        if total_steps is None:
            raise ValueError("SparseAttention: dense_steps is a fraction of the run, which needs its step count: pass "
                             "num_inference_steps to stepfuse.attention.apply (stepfuse.accelerate sets it) or give "
                             "dense_steps as an int")
        return int(math.ceil(self.dense_steps * total_steps - 1e-9))

    def pick_block_size(self, seq_len: int, on_gpu: bool = False) -> int:
        """The block size for a sequence of ``seq_len`` tokens."""
        if self.block_size is not None:
            return self.block_size
        for size in reversed(_BLOCK_SIZES):
            if size <= (128 if on_gpu else 64) and -(-seq_len // size) >= self.min_blocks_per_side:
                return size
        return _BLOCK_SIZES[0]
