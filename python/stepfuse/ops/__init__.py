"""Thin Python entry points over ``torch.ops.stepfuse.*``, with their fake impls."""

from .attention import block_scores, block_sparse_attention, frame_band_block_mask, sliding_tile_block_mask
from .cache import (cache_decide, cache_distance, residual_add, residual_apply, residual_store,
                    taylor_predict, taylor_update)
from .guidance import guidance_stats, guided_step
from .solver_step import solver_step

__all__ = ["block_scores", "block_sparse_attention", "cache_decide", "cache_distance", "frame_band_block_mask",
           "guidance_stats", "guided_step", "residual_add", "residual_apply", "residual_store", "sliding_tile_block_mask",
           "solver_step", "taylor_predict", "taylor_update"]
