"""Dynamic thresholding of the data prediction (Saharia et al., "Photorealistic
Text-to-Image Diffusion Models with Deep Language Understanding", 2022, sec. 2.3).

Nonlinear, so it is one reduction pass between the conversion and the linear step.
"""

from __future__ import annotations

import torch


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Clamp each sample to its ``ratio`` quantile of |x0| (at least 1, at most ``max_value``) and rescale."""
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1).float()  # quantile needs fp32; fp32 accumulation anyway
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)
