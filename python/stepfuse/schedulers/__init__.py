"""Drop-in replacements for diffusers' schedulers: same class names and config keys.

``pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``
"""

from ..integrations.ddim import DDIMScheduler
from ..integrations.ddpm import DDPMScheduler
from ..integrations.deis_multistep import DEISMultistepScheduler
from ..integrations.dpmsolver_multistep import DPMSolverMultistepScheduler
from ..integrations.dpmsolver_singlestep import DPMSolverSinglestepScheduler
from ..integrations.edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
from ..integrations.edm_euler import EDMEulerScheduler
from ..integrations.euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler
from ..integrations.flow_match import FlowMatchEulerDiscreteScheduler
from ..integrations.flow_match_heun import FlowMatchHeunDiscreteScheduler
from ..integrations.ipndm import IPNDMScheduler
from ..integrations.kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler
from ..integrations.lcm import LCMScheduler
from ..integrations.lms import LMSDiscreteScheduler
from ..integrations.pndm import PNDMScheduler
from ..integrations.sasolver import SASolverScheduler
from ..integrations.tcd import TCDScheduler
from ..integrations.unipc_multistep import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "EDMDPMSolverMultistepScheduler",
    "EDMEulerScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "FlowMatchHeunDiscreteScheduler",
    "HeunDiscreteScheduler",
    "IPNDMScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LCMScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SASolverScheduler",
    "TCDScheduler",
    "UniPCMultistepScheduler",
]
