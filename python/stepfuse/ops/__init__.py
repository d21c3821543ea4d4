"""Thin Python entry points over ``torch.ops.stepfuse.*``, with their fake impls."""

from .guidance import guidance_stats, guided_step
from .solver_step import solver_step

__all__ = ["guidance_stats", "guided_step", "solver_step"]
