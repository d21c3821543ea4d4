"""Pure-PyTorch references of every stepfuse op: test oracles and baselines."""

from .philox import philox_blocks, philox_normal
from .solver_step import solver_step

__all__ = ["philox_blocks", "philox_normal", "solver_step"]
