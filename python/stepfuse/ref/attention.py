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


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: Optional[float] = None,
                 layout: str = "bhsd") -> torch.Tensor:
    """Estimated attention mass of every (query block, key block) pair, float32 ``(B, H, Qb, Kb)``.

    Queries and keys are mean-pooled over the valid tokens of each block; the score of a pair is
    ``scale * <q_mean_i, k_mean_j> + log(n_j)`` with ``n_j`` the tokens in key block ``j`` (a block
    of ``n_j`` alike keys carries ``n_j`` times the mass of one), and each row is softmax-normalised,
    so a row sums to one and its entries estimate the share of attention each key block receives.
    """
    if layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    s_q, s_kv, d = q.shape[2], k.shape[2], q.shape[3]

    def pooled(x, s):
        blocks = -(-s // block_size)
        padded = torch.nn.functional.pad(x.double(), (0, 0, 0, blocks * block_size - s))
        sums = padded.unflatten(2, (blocks, block_size)).sum(3)
        counts = torch.full((blocks,), float(block_size), dtype=torch.float64, device=x.device)
        counts[-1] = s - (blocks - 1) * block_size
        return sums / counts[:, None], counts

    q_mean, _ = pooled(q, s_q)
    k_mean, k_counts = pooled(k, s_kv)
    logits = (q_mean @ k_mean.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(d))
    return torch.softmax(logits + k_counts.log(), dim=-1).float()
