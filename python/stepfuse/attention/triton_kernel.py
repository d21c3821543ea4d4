"""Block-sparse attention forward in Triton (FlashAttention-2 style online softmax).

The sparsity is described as FlexAttention's block mask is: for every (batch, head, query
block) the number of key/value blocks it attends to (``kv_num_blocks``) and their indices
(``kv_indices``, the first ``kv_num_blocks`` entries of each row are used).  Each program owns
one query block of one head and visits only its listed key/value blocks, so the work is
proportional to the mask's density.  Partial blocks at the end of either sequence are masked
element-wise; accumulation is fp32 whatever the input dtype.

The kernel is built on first use, so ``TRITON_INTERPRET=1`` set before that call runs it on
the CPU (the tests do, on small shapes).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

__all__ = ["block_sparse_attention_triton", "SUPPORTED_HEAD_DIMS", "SUPPORTED_BLOCK_SIZES"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
_LAYOUTS = ("bhsd", "bshd")


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def block_sparse_fwd(Q, K, V, O, KV_NUM, KV_IDX, qk_scale,
                         sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
                         snb, snh, snm, sib, sih, sim, sik,
                         H, S_Q, S_KV,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        cols0 = tl.arange(0, BLOCK_N)
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd,
                    mask=rows[:, None] < S_Q, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        count = tl.load(KV_NUM + b * snb + h * snh + pid_m * snm)
        index_row = KV_IDX + b * sib + h * sih + pid_m * sim
        for j in range(0, count):
            block = tl.load(index_row + j * sik)
            cols = block * BLOCK_N + cols0
            valid = cols < S_KV
            k = tl.load(K + b * skb + h * skh + cols[None, :] * sks + dims[:, None] * skd,
                        mask=valid[None, :], other=0.0)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            # base-2 online softmax (qk_scale carries log2(e)): running max, rescaled sums.
            s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + b * svb + h * svh + cols[:, None] * svs + dims[None, :] * svd,
                        mask=valid[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        # A query block with no key/value block attends to nothing: its output is zero.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + h * soh + rows[:, None] * sos + dims[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=rows[:, None] < S_Q)

    return block_sparse_fwd


def _check(q, k, v, kv_num_blocks, kv_indices, block_size, layout):
    op = "block_sparse_attention"
    if layout not in _LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D tensor ({layout}), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError(f"{op}: q, k and v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                        f"{q.device}/{k.device}/{v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_axis = 1 if layout == "bhsd" else 2
    b, h, d = q.shape[0], q.shape[head_axis], q.shape[3]
    if k.shape[0] != b or k.shape[head_axis] != h or k.shape[3] != d:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{op}: block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    s_q, s_kv = q.shape[3 - head_axis], k.shape[3 - head_axis]
    q_blocks, kv_blocks = -(-s_q // block_size), -(-s_kv // block_size)
    if not isinstance(kv_num_blocks, torch.Tensor) or kv_num_blocks.dtype != torch.int32 \
            or tuple(kv_num_blocks.shape) != (b, h, q_blocks):
        raise ValueError(f"{op}: kv_num_blocks must be an int32 tensor of shape {(b, h, q_blocks)}, got "
                         f"{getattr(kv_num_blocks, 'dtype', None)} {tuple(getattr(kv_num_blocks, 'shape', ()))}")
    if not isinstance(kv_indices, torch.Tensor) or kv_indices.dtype != torch.int32 or kv_indices.dim() != 4 \
            or tuple(kv_indices.shape[:3]) != (b, h, q_blocks):
        raise ValueError(f"{op}: kv_indices must be an int32 tensor of shape {(b, h, q_blocks)} + (max blocks,), got "
                         f"{getattr(kv_indices, 'dtype', None)} {tuple(getattr(kv_indices, 'shape', ()))}")
    if kv_num_blocks.device != q.device or kv_indices.device != q.device:
        raise ValueError(f"{op}: kv_num_blocks and kv_indices must be on {q.device}")
    return b, h, d, s_q, s_kv, q_blocks, kv_blocks


def block_sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                                  kv_indices: torch.Tensor, block_size: int = 64, scale: Optional[float] = None,
                                  layout: str = "bhsd", check_indices: bool = True) -> torch.Tensor:
    """Attention of ``q`` over the key/value blocks listed per query block.

    Args:
        q, k, v: ``(B, H, S, D)`` (``layout="bhsd"``) or ``(B, S, H, D)`` (``"bshd"``); the query
            and key sequences may differ in length and need not be multiples of ``block_size``.
        kv_num_blocks: int32 ``(B, H, ceil(S_q / block_size))``.
        kv_indices: int32 ``(B, H, ceil(S_q / block_size), max_blocks)``; indices of key blocks.
        scale: softmax scale, ``1 / sqrt(D)`` by default.
        check_indices: verify the listed indices lie in range (one small host read).
    """
    b, h, d, s_q, s_kv, q_blocks, kv_blocks = _check(q, k, v, kv_num_blocks, kv_indices, block_size, layout)
    if check_indices:
        used = torch.arange(kv_indices.shape[-1], device=q.device) < kv_num_blocks[..., None].long()
        if bool(((kv_num_blocks < 0) | (kv_num_blocks > kv_indices.shape[-1])).any()) or \
                bool((used & ((kv_indices < 0) | (kv_indices >= kv_blocks))).any()):
            raise ValueError(f"block_sparse_attention: kv_num_blocks must lie in [0, {kv_indices.shape[-1]}] and the "
                             f"used kv_indices in [0, {kv_blocks}) for a key sequence of {s_kv} tokens")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    out = torch.empty_like(q)

    def strides(t):  # (batch, head, sequence, dim) strides whatever the layout
        s = t.stride()
        return (s[0], s[1], s[2], s[3]) if layout == "bhsd" else (s[0], s[2], s[1], s[3])

    grid = (q_blocks, b * h)
    _kernel()[grid](q, k, v, out, kv_num_blocks, kv_indices, float(scale) * 1.4426950408889634,
                    *strides(q), *strides(k), *strides(v), *strides(out),
                    *kv_num_blocks.stride(), *kv_indices.stride(), h, s_q, s_kv,
                    BLOCK_M=block_size, BLOCK_N=block_size, HEAD_DIM=d, IEEE=q.dtype == torch.float32)
    return out
