"""Reference block-sparse attention: the block description expanded to a dense boolean mask and
a masked softmax in float64 (the oracle of the attention kernels' tests)."""

from __future__ import annotations

import math
from typing import Optional

import torch


def block_mask_to_dense(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, block_size: int, s_q: int,
                        s_kv: int) -> torch.Tensor:
    """The ``(B, H, S_q, S_kv)`` boolean mask a block description stands for."""
    b, h, q_blocks = kv_num_blocks.shape
    kv_blocks = -(-s_kv // block_size)
    used = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_num_blocks[..., None].long()
    blocks = torch.zeros(b, h, q_blocks, kv_blocks + 1, dtype=torch.bool, device=kv_indices.device)
    # Unused slots scatter into the spare last column, which is then dropped.
    target = torch.where(used, kv_indices.long(), torch.full_like(kv_indices.long(), kv_blocks))
    blocks.scatter_(-1, target, True)
    blocks = blocks[..., :kv_blocks]
    dense = blocks.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return dense[:, :, :s_q, :s_kv]


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, block_size: int, scale: Optional[float] = None,
                           layout: str = "bhsd") -> torch.Tensor:
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s_q, s_kv, d = q.shape[2], k.shape[2], q.shape[3]
    mask = block_mask_to_dense(kv_num_blocks, kv_indices, block_size, s_q, s_kv)
    scores = (q.double() @ k.double().transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(d))
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows attending to nothing give zero
    out = (probs @ v.double()).to(q.dtype)
    return out.transpose(1, 2) if layout == "bshd" else out
