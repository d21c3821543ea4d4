"""Test utilities: an analytic Gaussian-mixture diffusion model with an exact denoiser."""

from .gmm import GaussianMixture

__all__ = ["GaussianMixture"]
