"""Block-sparse attention forward for Hopper GPUs, written in Gluon (Triton's explicit-layout dialect).

The Triton kernel (:mod:`stepfuse.attention.triton_kernel`) leaves the tensor cores idle while it
computes each tile's softmax: Triton waits for every warpgroup MMA before the first use of a result.
This kernel schedules the loop by hand, as FlashAttention-3 does (Shah et al., 2024, Section 3.2,
"intra-warpgroup overlapping"): the scores ``S_j = Q K_j^T`` of tile ``j`` are issued before the
product ``P_{j-1} V_{j-1}`` of the previous one, and the softmax of ``S_j`` runs while that product
is still on the tensor cores.  Key and value tiles arrive through a ring of shared-memory buffers
filled by the bulk copy engine (TMA), one mbarrier per buffer; the index of the tile after next is
read a whole iteration before its copy is issued.

Inputs are ``(B, H, S, D)`` views (either layout, through strides) in float16/bfloat16 with head
dims 64 or 128; sequences of any length (copies past either end read zeros, key columns past the
end are masked).  The wrapper in :mod:`stepfuse.attention.triton_kernel` decides when it is used.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .triton_kernel import launch_compiled

#: (BLOCK_M, BLOCK_N, num_warps, stages) candidates: 4 warps are one warpgroup over the query
#: tile; 8 warps are two, each with 64 rows.  Two stages keep 128 x 64 tiles at 96 KiB of shared
#: memory, so two programs share an SM and hide each other's copy latency.
CONFIGS = ((128, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 2), (64, 64, 4, 2), (128, 64, 8, 3))


@gluon.jit
def _tile_start(idx_row, sik, t, n, MASK_BLOCK: gl.constexpr, SPLIT_N: gl.constexpr, BLOCK_N: gl.constexpr):
    # First key of the row's tile t; t is clamped into the row so a tile past its end reads a valid index.
    t = gl.maximum(gl.minimum(t, n - 1), 0)
    return gl.load(idx_row + (t // SPLIT_N) * sik) * MASK_BLOCK + (t % SPLIT_N) * BLOCK_N


@gluon.jit
def _issue_tile(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, h, start, t, n, STAGES: gl.constexpr):
    # K and V of tile t into ring slot t % STAGES; nothing is copied for a tile past the row's end.
    slot = t % STAGES
    pred = t < n
    mbarrier.expect(k_bars.index(slot), k_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [b, h, start, 0], k_bars.index(slot), k_smem.index(slot), pred=pred)
    mbarrier.expect(v_bars.index(slot), v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(v_desc, [b, h, start, 0], v_bars.index(slot), v_smem.index(slot), pred=pred)


@gluon.jit
def _scores(s, idx_row, sik, t, n, qk_scale, S_KV, MASK_BLOCK: gl.constexpr, EVEN_KV: gl.constexpr,
            SPLIT_N: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    # Tile t's scores in base 2 (qk_scale > 0 carries log2 e); key columns past the sequence's end are -inf.
    s = s * qk_scale
    if not EVEN_KV:
        start = _tile_start(idx_row, sik, t, n, MASK_BLOCK, SPLIT_N, BLOCK_N)
        cols = start + gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
        s = gl.where((cols < S_KV)[None, :], s, float("-inf"))
    return s


@gluon.jit
def block_sparse_fwd(q_desc, k_desc, v_desc, O, KV_NUM, KV_IDX, qk_scale,
                     sob, soh, sos, snb, snh, snm, sib, sih, sim, sik, H, S_Q, S_KV,
                     MASK_BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, EVEN_KV: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    SPLIT_N: gl.constexpr = MASK_BLOCK // BLOCK_N  # key tiles per listed block
    NW: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_desc.dtype
    # Accumulator layouts of the two warpgroup MMAs (scores: BLOCK_N columns, output: HEAD_DIM);
    # the probabilities feed the second one straight from registers.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_block = pid_m * BLOCK_M // MASK_BLOCK
    count = gl.load(KV_NUM + b * snb + h * snh + q_block * snm)
    idx_row = KV_IDX + b * sib + h * sih + q_block * sim
    n = count * SPLIT_N

    q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(s), count=1)
        mbarrier.init(v_bars.index(s), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, pid_m * BLOCK_M, 0], q_bar, q_smem)
    for t in gl.static_range(STAGES):
        _issue_tile(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, h,
                    _tile_start(idx_row, sik, t, n, MASK_BLOCK, SPLIT_N, BLOCK_N), t, n, STAGES)
    next_start = _tile_start(idx_row, sik, STAGES, n, MASK_BLOCK, SPLIT_N, BLOCK_N)
    mbarrier.wait(q_bar, 0)
    q = q_smem.reshape([BLOCK_M, HEAD_DIM])

    # Tile 0 starts the running max (its first column lies inside the sequence, so the max is
    # finite).  A row with no tile skips the waits; its output is zeroed at the end.
    mbarrier.wait(k_bars.index(0), 0, pred=n > 0)
    s_tok = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                          gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    s = _scores(warpgroup_mma_wait(num_outstanding=0, deps=[s_tok]), idx_row, sik, 0, n, qk_scale, S_KV, MASK_BLOCK,
                EVEN_KV, SPLIT_N, BLOCK_N, s_layout)
    m_i = gl.max(s, 1)
    p_f = gl.exp2(s - m_i[:, None])
    l_i = gl.sum(p_f, 1)
    p = gl.convert_layout(p_f.to(dtype), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    for j in range(1, n):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
        s_tok = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                              gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        # P_{j-1} V_{j-1} is issued after S_j, so waiting for S_j alone leaves it running under the softmax.
        mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)
        acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc,
                                is_async=True)
        s = _scores(warpgroup_mma_wait(num_outstanding=1, deps=[s_tok]), idx_row, sik, j, n, qk_scale, S_KV,
                    MASK_BLOCK, EVEN_KV, SPLIT_N, BLOCK_N, s_layout)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        p_f = gl.exp2(s - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p_f, 1)
        m_i = m_new
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p = gl.convert_layout(p_f.to(dtype), p_layout)
        # Tile j - 1 is finished (S_{j-1} and P_{j-1} V_{j-1} are done): its slot takes tile j - 1 + STAGES.
        _issue_tile(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, h, next_start, j - 1 + STAGES, n, STAGES)
        next_start = _tile_start(idx_row, sik, j + STAGES, n, MASK_BLOCK, SPLIT_N, BLOCK_N)
    last = gl.maximum(n - 1, 0)
    mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1, pred=n > 0)
    acc_tok = warpgroup_mma(p, v_smem.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM]), acc,
                            is_async=True)
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(s))
        mbarrier.invalidate(v_bars.index(s))
    mbarrier.invalidate(q_bar)
    out = gl.where(n > 0, acc / gl.convert_layout(l_i, row_o)[:, None], 0.0)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, row_o)
    dims = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_layout))
    gl.store(O + b * sob + h * soh + rows[:, None] * sos + dims[None, :], out.to(dtype), mask=(rows < S_Q)[:, None])


@functools.lru_cache(maxsize=None)
def _tile_layout(rows: int, head_dim: int, bf16: bool):
    """Shared-memory layout (swizzle) of a (1, 1, rows, head_dim) tile copied by TMA."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], gl.bfloat16 if bf16 else gl.float16)


def descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int, block_n: int):
    """Tensor descriptors over the ``(B, H, S, D)`` views ``q``, ``k`` and ``v`` for query tiles of
    ``block_m`` rows and key tiles of ``block_n``."""
    d, bf16 = q.shape[3], q.dtype == torch.bfloat16
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d], _tile_layout(rows, d, bf16))
            for t, rows in ((q, block_m), (k, block_n), (v, block_n))]


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, kv_num_blocks: torch.Tensor,
           kv_indices: torch.Tensor, qk_scale: float, mask_block: int, config: Tuple[int, int, int, int]) -> None:
    """Run the kernel on ``(B, H, S, D)`` views (``out`` likewise) with ``config`` =
    ``(BLOCK_M, BLOCK_N, num_warps, stages)``; ``qk_scale`` is the softmax scale times log2(e), positive."""
    block_m, block_n, warps, stages = config
    b, h, s_q, d = q.shape
    s_kv = k.shape[2]
    ints = (out.stride(0), out.stride(1), out.stride(2), *kv_num_blocks.stride(), *kv_indices.stride(), h, s_q, s_kv)
    args = (*descriptors(q, k, v, block_m, block_n), out, kv_num_blocks, kv_indices, qk_scale, *ints)
    meta = dict(MASK_BLOCK=mask_block, HEAD_DIM=d, EVEN_KV=s_kv % mask_block == 0, BLOCK_M=block_m, BLOCK_N=block_n,
                STAGES=stages, num_warps=warps)
    # everything the compiled kernel is specialised on: dtypes, integers, alignments, tiles (launch_compiled)
    key = ("gluon", config, mask_block, q.dtype, q.device.index, ints,
           *((tuple(t.shape), t.stride()) for t in (q, k, v)),
           *(t.data_ptr() % 16 == 0 for t in (out, kv_num_blocks, kv_indices)))
    launch_compiled(block_sparse_fwd, (-(-s_q // block_m), b * h, 1), key, args, meta)
