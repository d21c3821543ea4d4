"""Sparse block attention kernels: ``torch.ops.stepfuse.block_sparse_attention`` and
``torch.ops.stepfuse.attention_block_scores`` (csrc/attention.h) on the CPU, the Triton kernels
(stepfuse.attention.triton_kernel) on CUDA, with the fake impls torch.compile traces.

* :func:`block_sparse_attention` - attention of each query block over the key/value blocks its
  row of the block mask lists (FlexAttention's ``kv_num_blocks`` / ``kv_indices``); fp32
  accumulation, output in ``q``'s dtype and layout.  The CPU kernel checks the mask's values
  (counts within ``[0, max_blocks]``, used indices within range and distinct per row).
* :func:`block_scores` - the estimated attention mass of every (query block, key block) pair
  from mean-pooled blocks, float32 ``(B, H, Qb, Kb)``, rows summing to one: what top-k and
  cumulative-threshold mask builders rank.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from .. import _C  # noqa: F401  (registers the ops)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_HEAD_DIMS = tuple(range(16, 129, 16))  # csrc/attention.cpp: multiples of 16 up to 128
_BLOCK_SIZES = (16, 32, 64, 128)  # csrc/attention.cpp, kBlockSizes
_LAYOUTS = ("bhsd", "bshd")
_ops = torch.ops.stepfuse


def _host_args(op: str, block_size, scale, layout, head_dim: Optional[int]):
    """(block_size, scale, bshd) as the schema takes them, with TypeErrors naming the argument."""
    if isinstance(block_size, bool):
        raise TypeError(f"{op}: block_size must be an int, got bool")
    try:
        block_size = operator.index(block_size)
    except TypeError:
        raise TypeError(f"{op}: block_size must be an int, got {type(block_size).__name__}") from None
    if not isinstance(layout, str):
        raise TypeError(f"{op}: layout must be a str ('bhsd' or 'bshd'), got {type(layout).__name__}")
    if layout not in _LAYOUTS:
        raise ValueError(f"{op}: layout must be 'bhsd' or 'bshd', got {layout!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    elif isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a Python float (a host value), got {type(scale).__name__}")
    return block_size, float(scale), layout == "bshd"


def _head_dim(q) -> Optional[int]:
    return q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[-1] > 0 else None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, block_size: int = 64, scale: Optional[float] = None,
                           layout: str = "bhsd", check_indices: bool = True) -> torch.Tensor:
    """Attention of ``q`` over the key/value blocks listed per query block.

    Args:
        q, k, v: ``(B, H, S, D)`` (``layout="bhsd"``) or ``(B, S, H, D)`` (``"bshd"``), float32,
            float16 or bfloat16 (all alike), ``D`` a multiple of 16 up to 128; any strides.  Query and key
            lengths may differ and need not be multiples of ``block_size``.
        kv_num_blocks: int32 ``(B, H, ceil(S_q / block_size))``: how many blocks each query block sees.
        kv_indices: int32 ``(B, H, ceil(S_q / block_size), max_blocks)``: the first
            ``kv_num_blocks`` entries of a row are the (distinct) key blocks; the rest is ignored.
        block_size: 16, 32, 64 or 128 tokens.
        scale: softmax scale, ``1 / sqrt(D)`` by default.
        check_indices: on CUDA, verify the mask's values first (one host read); masks from
            stepfuse's builders are valid by construction and skip it.  The CPU kernel always checks.

    Returns a tensor shaped, laid out and typed like ``q`` (contiguous in that layout); a query
    block with no key block gives zeros.
    """
    op = "block_sparse_attention"
    block_size, scale, bshd = _host_args(op, block_size, scale, layout, _head_dim(q))
    if isinstance(q, torch.Tensor) and q.is_cuda:
        if torch.compiler.is_compiling():
            # Traced: the op, opaque to the compiler with its fake (no graph break, and capturable in
            # a CUDA graph); the mask check, if asked for, stays on the device.
            if check_indices:
                from ..attention.triton_kernel import mask_values_valid

                kv_blocks = -(-k.shape[1 if bshd else 2] // block_size)
                torch._assert_async(mask_values_valid(kv_num_blocks, kv_indices, kv_blocks),
                                    "block_sparse_attention: kv_num_blocks or kv_indices out of range")
            return _ops.block_sparse_attention.default(q, k, v, kv_num_blocks, kv_indices, block_size, scale, bshd)
        # Eager: the Triton launch itself, without the dispatcher's round trip.
        from ..attention.triton_kernel import block_sparse_attention_triton

        return block_sparse_attention_triton(q, k, v, kv_num_blocks, kv_indices, block_size, scale, layout,
                                             check_indices=bool(check_indices))
    return _ops.block_sparse_attention.default(q, k, v, kv_num_blocks, kv_indices, block_size, scale, bshd)


def block_scores(q: torch.Tensor, k: torch.Tensor, block_size: int = 64, scale: Optional[float] = None,
                 layout: str = "bhsd") -> torch.Tensor:
    """float32 ``(B, H, Qb, Kb)``: softmax over key blocks ``j`` of ``scale * <q_mean_i, k_mean_j> + log(n_j)``,
    with blocks mean-pooled over their valid tokens and ``n_j`` the tokens of key block ``j``
    (stepfuse.ref.attention.block_scores).  Arguments as :func:`block_sparse_attention`'s."""
    op = "attention_block_scores"
    block_size, scale, bshd = _host_args(op, block_size, scale, layout, _head_dim(q))
    if isinstance(q, torch.Tensor) and q.is_cuda and not torch.compiler.is_compiling():
        from ..attention.triton_kernel import block_scores_triton

        return block_scores_triton(q, k, block_size, scale, layout)
    return _ops.attention_block_scores.default(q, k, block_size, scale, bshd)


def frame_band_block_mask(frames: int, frame_tokens: int, band, block_size: int, prompt_tokens: int = 0,
                          prompt_last: bool = False, sinks: int = 0):
    """``(kv_num_blocks (Qb,), kv_indices (Qb, widest row))`` int32 on the CPU: video tokens in
    natural ``(t, h, w)`` order, a query token keeping the key tokens ``d`` frames away whose
    in-frame position is closer than ``band[d]`` (one int per frame distance); prompt rows and
    columns dense, the first ``sinks`` blocks' worth of video keys kept
    (stepfuse.ref.attention.frame_band_block_mask)."""
    return _ops.frame_band_block_mask.default(frames, frame_tokens, [int(w) for w in band], block_size,
                                              prompt_tokens, bool(prompt_last), sinks)


def sliding_tile_block_mask(grid, tile, window, block_size: int, prompt_tokens: int = 0, prompt_last: bool = False,
                            sinks: int = 0):
    """Sliding Tile Attention's ``(kv_num_blocks, kv_indices)`` for tokens in
    :class:`stepfuse.attention.TileLayout` order, as :func:`frame_band_block_mask` returns them
    (stepfuse.ref.attention.sliding_tile_block_mask)."""
    return _ops.sliding_tile_block_mask.default(list(grid), list(tile), list(window), block_size, prompt_tokens,
                                                bool(prompt_last), sinks)


# -- CUDA kernels of the ops: the Triton kernels, for calls through the dispatcher (traced graphs) --
@torch.library.register_kernel("stepfuse::block_sparse_attention", "cuda")
def _block_sparse_attention_cuda(q, k, v, kv_num_blocks, kv_indices, block_size, scale, bshd):
    from ..attention.triton_kernel import block_sparse_attention_triton

    # contiguous in the layout, as the CPU kernel and the fake return it
    return block_sparse_attention_triton(q, k, v, kv_num_blocks, kv_indices, block_size, scale,
                                         "bshd" if bshd else "bhsd", check_indices=False,
                                         out=torch.empty(q.shape, dtype=q.dtype, device=q.device))


@torch.library.register_kernel("stepfuse::attention_block_scores", "cuda")
def _attention_block_scores_cuda(q, k, block_size, scale, bshd):
    from ..attention.triton_kernel import block_scores_triton

    return block_scores_triton(q, k, block_size, scale, "bshd" if bshd else "bhsd")


# -- fakes: the checks of csrc/attention.cpp that shapes, dtypes and devices allow ----------------
def _check_qk(op: str, q, k, v, block_size: int, scale: float, bshd: bool):
    layout = "(B, S, H, D) for bshd" if bshd else "(B, H, S, D) for bhsd"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have dtype {q.dtype} like q, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on {q.device} like q, got {t.device}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"{op}: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    head_axis, seq_axis = (2, 1) if bshd else (1, 2)
    if k.shape[0] != q.shape[0] or k.shape[head_axis] != q.shape[head_axis] or k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k must match q in batch, heads and head dim {layout}, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    if q.shape[3] not in _HEAD_DIMS:
        raise ValueError(f"{op}: head dim (last axis of q) must be a multiple of 16 from 16 to 128, got {q.shape[3]}")
    if block_size not in _BLOCK_SIZES:
        raise ValueError(f"{op}: block_size must be 16, 32, 64 or 128, got {block_size}")
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    q_blocks = -(-q.shape[seq_axis] // block_size)
    kv_blocks = -(-k.shape[seq_axis] // block_size)
    return q.shape[0], q.shape[head_axis], q_blocks, kv_blocks


@torch.library.register_fake("stepfuse::block_sparse_attention")
def _block_sparse_attention_fake(q, k, v, kv_num_blocks, kv_indices, block_size, scale, bshd):
    op = "block_sparse_attention"
    b, h, q_blocks, _ = _check_qk(op, q, k, v, block_size, scale, bshd)
    for name, t in (("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)):
        if t.dtype != torch.int32:
            raise TypeError(f"{op}: {name} must be int32, got {t.dtype}")
    if kv_num_blocks.device != q.device or kv_indices.device != q.device:
        raise ValueError(f"{op}: kv_num_blocks and kv_indices must be on {q.device} like q, got "
                         f"{kv_num_blocks.device} and {kv_indices.device}")
    if tuple(kv_num_blocks.shape) != (b, h, q_blocks):
        raise ValueError(f"{op}: kv_num_blocks must have shape {(b, h, q_blocks)} (B, H, ceil(S_q / block_size)), "
                         f"got {tuple(kv_num_blocks.shape)}")
    if kv_indices.dim() != 4 or tuple(kv_indices.shape[:3]) != (b, h, q_blocks):
        raise ValueError(f"{op}: kv_indices must have shape {(b, h, q_blocks)} + (max_blocks,), got "
                         f"{tuple(kv_indices.shape)}")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("stepfuse::attention_block_scores")
def _attention_block_scores_fake(q, k, block_size, scale, bshd):
    b, h, q_blocks, kv_blocks = _check_qk("attention_block_scores", q, k, None, block_size, scale, bshd)
    return q.new_empty((b, h, q_blocks, kv_blocks), dtype=torch.float32)


def _geometry_fake(op: str, tokens: int, block_size: int, prompt_tokens: int):
    if block_size < 1 or prompt_tokens < 0 or tokens < 1:
        raise ValueError(f"{op}: block_size, prompt_tokens and the grid must be positive, got {block_size}, "
                         f"{prompt_tokens} and {tokens} tokens")
    blocks = -(-(tokens + prompt_tokens) // block_size)
    width = torch.library.get_ctx().new_dynamic_size(min=1, max=blocks)  # the widest row: data-dependent
    return torch.empty(blocks, dtype=torch.int32), torch.empty(blocks, width, dtype=torch.int32)


@torch.library.register_fake("stepfuse::frame_band_block_mask")
def _frame_band_block_mask_fake(frames, frame_tokens, band, block_size, prompt_tokens, prompt_last, sinks):
    if len(band) != frames:
        raise ValueError(f"frame_band_block_mask: band must hold one width per frame distance ({frames}), got "
                         f"{len(band)}")
    return _geometry_fake("frame_band_block_mask", frames * frame_tokens, block_size, prompt_tokens)


@torch.library.register_fake("stepfuse::sliding_tile_block_mask")
def _sliding_tile_block_mask_fake(grid, tile, window, block_size, prompt_tokens, prompt_last, sinks):
    return _geometry_fake("sliding_tile_block_mask", math.prod(grid), block_size, prompt_tokens)
