"""Block-sparse attention for diffusion transformers (kernels first; mask builders and model
integration build on them)."""

from __future__ import annotations

from .triton_kernel import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS, block_sparse_attention_triton

__all__ = ["block_sparse_attention_triton", "SUPPORTED_HEAD_DIMS", "SUPPORTED_BLOCK_SIZES"]
