"""Drop-in replacements for diffusers' schedulers: same class names and config keys.

``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``
"""

from ..integrations.ddim import DDIMScheduler
from ..integrations.dpmsolver_multistep import DPMSolverMultistepScheduler
from ..integrations.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from ..integrations.flow_match import FlowMatchEulerDiscreteScheduler
from ..integrations.unipc_multistep import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "UniPCMultistepScheduler",
]
