"""Test utilities: an analytic Gaussian-mixture diffusion model with an exact denoiser, and (in
:mod:`stepfuse.testing.gluon`) a CPU emulator for Hopper Gluon kernels that checks their asynchronous hazards."""

from .gmm import GaussianMixture

__all__ = ["GaussianMixture"]
