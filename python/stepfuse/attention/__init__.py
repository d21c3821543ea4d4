"""Block-sparse attention for diffusion transformers.

::

    import stepfuse.attention as sa

    sa.apply(pipe.transformer, sa.SparseAttention(pattern="adaptive", mass=0.95), num_inference_steps=50)
    image = pipe(...).images
    print(sa.stats(pipe.transformer))
    sa.remove(pipe.transformer)

or ``stepfuse.accelerate(pipe, attention=sa.SparseAttention())``.  The kernels
(:func:`stepfuse.ops.block_sparse_attention`: C++ on the CPU, Triton on GPUs) take FlexAttention-
style block lists; the builders in :mod:`.masks` make them (sliding 3-D tiles, radial, per-head
spatial/temporal, adaptive from pooled block scores); :class:`SparseAttention` holds the pattern and
the schedule (dense steps and layers, mask reuse, per-CFG-branch masks).
"""

from __future__ import annotations

from .config import SPARSE_PATTERNS, SparseAttention
from .integration import apply, remove, reset, set_num_inference_steps, stats
from .masks import (PATTERNS, BlockMask, HeadPatterns, TileLayout, adaptive_mask, profile_head_patterns, radial_mask,
                    sliding_tile_mask)
from .runtime import AttentionStats, BlockSparseAttnProcessor, attention_layers
from .triton_kernel import (SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS, block_scores_triton,
                            block_sparse_attention_triton)

__all__ = ["SparseAttention", "SPARSE_PATTERNS", "apply", "remove", "stats", "reset", "set_num_inference_steps",
           "AttentionStats", "BlockSparseAttnProcessor", "attention_layers",
           "block_sparse_attention_triton", "block_scores_triton", "SUPPORTED_HEAD_DIMS", "SUPPORTED_BLOCK_SIZES",
           "BlockMask", "TileLayout", "HeadPatterns", "PATTERNS", "sliding_tile_mask", "radial_mask",
           "profile_head_patterns", "adaptive_mask"]
