"""Thin Python entry points over ``torch.ops.stepfuse.*``, with their fake impls."""

from .cache import (cache_decide, cache_distance, residual_add, residual_apply, residual_store,
                    taylor_predict, taylor_update)
from .guidance import guidance_stats, guided_step
from .solver_step import solver_step

__all__ = ["cache_decide", "cache_distance", "guidance_stats", "guided_step", "residual_add", "residual_apply",
           "residual_store", "solver_step", "taylor_predict", "taylor_update"]
