"""``k_diffusion.sampling``-compatible samplers on stepfuse's fused solver step.

``from stepfuse import k_diffusion`` then ``k_diffusion.sample_dpmpp_2m(model, x, sigmas)``:
same functions, signatures and defaults as k-diffusion's ``sampling`` module (see
:mod:`stepfuse.integrations.k_diffusion`).
"""

from .integrations.k_diffusion import *  # noqa: F401,F403
from .integrations.k_diffusion import __all__  # noqa: F401
