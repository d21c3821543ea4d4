"""Pure-PyTorch references of every stepfuse op: test oracles and baselines."""

from . import cache
from .guidance import guidance_stats, guided_step
from .philox import philox_blocks, philox_normal
from .solver_step import solver_step

__all__ = ["cache", "guidance_stats", "guided_step", "philox_blocks", "philox_normal", "solver_step"]
