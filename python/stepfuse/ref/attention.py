"""Reference block-sparse attention: the block description expanded to a dense boolean mask and
a masked softmax in float64 (the oracle of the attention kernels' tests); the pooled block
scores; and the shape-only video masks (frame bands, sliding tiles) as vectorised PyTorch on
block tables, the oracle of csrc/attention_masks.cpp."""

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


# -- shape-only video masks -----------------------------------------------------------------------
def _range_any(allowed: torch.Tensor, q_lo, q_hi, k_lo, k_hi) -> torch.Tensor:
    """(Qb, Kb): whether ``allowed[a, b]`` holds for some ``a`` in ``[q_lo, q_hi]`` and ``b`` in
    ``[k_lo, k_hi]`` (inclusive ranges, per block), from prefix sums along each axis."""
    rows = torch.nn.functional.pad(allowed.cumsum(0, dtype=torch.int32), (0, 0, 1, 0))
    rows = (rows[q_hi + 1] - rows[q_lo]) > 0
    cols = torch.nn.functional.pad(rows.cumsum(1, dtype=torch.int32), (1, 0))
    return (cols[:, k_hi + 1] - cols[:, k_lo]) > 0


def _with_prompt(video_blocks: torch.Tensor, spans, block_size: int, sinks: int) -> torch.Tensor:
    from ..attention.masks import _forced

    return (video_blocks & spans[2][:, None] & spans[2][None, :]) | _forced(spans, spans, block_size, sinks)


def frame_band_block_mask(frames: int, frame_tokens: int, band, block_size: int, prompt_tokens: int,
                          prompt_last: bool, sinks: int) -> torch.Tensor:
    """bool ``(Qb, Kb)``: block pairs holding a query/key token pair ``d`` frames apart whose
    in-frame positions are closer than ``band[d]``, with the prompt rows/columns and sinks
    (``torch.ops.stepfuse.frame_band_block_mask`` as a dense block table)."""
    from ..attention.masks import _spans

    total = frames * frame_tokens + prompt_tokens
    spans = _spans(block_size, total, prompt_tokens, "last" if prompt_last else "first")
    g0, g1, video, _ = spans
    # Blocks cut at frame boundaries: each piece's frame and first/last in-frame position.
    offsets = torch.arange((block_size - 1) // frame_tokens + 2)
    frame = g0[:, None] // frame_tokens + offsets
    valid = video[:, None] & (frame <= (g1 // frame_tokens)[:, None])
    p0 = (g0[:, None] - frame * frame_tokens).clamp(min=0)[valid]
    p1 = (g1[:, None] - frame * frame_tokens).clamp(max=frame_tokens - 1)[valid]
    frame = frame[valid]
    count = valid.sum(1)
    lo = count.cumsum(0) - count
    distance = (frame[:, None] - frame[None, :]).abs()
    gap = torch.maximum(p0[None, :] - p1[:, None], p0[:, None] - p1[None, :]).clamp(min=0)
    keep = gap < torch.tensor(list(band), dtype=torch.long)[distance]
    return _with_prompt(_range_any(keep, lo, lo + count - 1, lo, lo + count - 1), spans, block_size, sinks)


def sliding_tile_block_mask(grid, tile, window, block_size: int, prompt_tokens: int, prompt_last: bool,
                            sinks: int) -> torch.Tensor:
    """bool ``(Qb, Kb)``: Sliding Tile Attention's block pairs for tokens in TileLayout order
    (``torch.ops.stepfuse.sliding_tile_block_mask`` as a dense block table)."""
    from ..attention.masks import TileLayout, _spans

    layout = TileLayout(tuple(grid), tuple(tile))
    nt, nh, nw = layout.tiles

    def window_1d(n, w):  # tile j lies in the w-tile window of tile i, shifted inside the grid
        c = torch.arange(n)
        start = (c - w // 2).clamp(0, max(n - w, 0))
        return (c[None, :] >= start[:, None]) & (c[None, :] < start[:, None] + w)

    a_t, a_h, a_w = (window_1d(n, w) for n, w in zip(layout.tiles, window))
    tiles = (a_t[:, None, None, :, None, None] & a_h[None, :, None, None, :, None]
             & a_w[None, None, :, None, None, :]).reshape(nt * nh * nw, nt * nh * nw)
    total = layout.num_tokens + prompt_tokens
    spans = _spans(block_size, total, prompt_tokens, "last" if prompt_last else "first")
    last = layout.num_tokens - 1
    lo = layout.tile_of_position[spans[0].clamp(0, last)]
    hi = layout.tile_of_position[spans[1].clamp(0, last)]
    return _with_prompt(_range_any(tiles, lo, hi, lo, hi), spans, block_size, sinks)
