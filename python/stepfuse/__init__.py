"""stepfuse: fused, training-free fast sampling for diffusion and flow-matching models."""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.stepfuse.*)
from . import ops  # noqa: F401  (fake impls for torch.compile)
from . import guidance  # noqa: F401
from . import k_diffusion  # noqa: F401  (stepfuse.k_diffusion.sample_* without a separate import)
from ._build import build_info
from .solvers.sampler import CapturedLoop, Sampler, sample
from .integrations.accelerate import accelerate, restore

__version__ = _C.build_info["version"]

__all__ = ["build_info", "__version__", "Sampler", "sample", "CapturedLoop", "guidance", "accelerate", "restore"]
