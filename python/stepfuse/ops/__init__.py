"""Thin Python entry points over ``torch.ops.stepfuse.*``, with their fake impls."""

from .solver_step import solver_step

__all__ = ["solver_step"]
