"""Block-sparse attention forward for Hopper GPUs, written in Gluon (Triton's explicit-layout dialect).

The Triton kernel (:mod:`stepfuse.attention.triton_kernel`) leaves the tensor cores idle while it
computes each tile's softmax: Triton waits for every warpgroup MMA before the first use of a result.
This kernel schedules the loop by hand, as FlashAttention-3 does (Shah et al., 2024, Section 3.2,
"intra-warpgroup overlapping"): the scores ``S_j = Q K_j^T`` of tile ``j`` are issued before the
product ``P_{j-1} V_{j-1}`` of the previous one, and the softmax of ``S_j`` runs while that product
is still on the tensor cores.  Key and value tiles arrive through a ring of shared-memory buffers
filled by the bulk copy engine (TMA), one mbarrier per buffer; the index of the tile after next is
read a whole iteration before its copy is issued.

:func:`block_sparse_fwd_ws` adds FlashAttention-3's other two techniques (Section 3.1): warp
specialisation, where one producer warp only issues the copies and two consumer warpgroups (64
query rows each) only compute, handing ring slots back through "empty" mbarriers; and ping-pong
scheduling, where the consumers take turns to issue their products so that one's softmax runs
under the other's matrix multiplications.

Inputs are ``(B, H, S, D)`` views (either layout, through strides) in float16/bfloat16 with head
dims 64 or 128; sequences of any length (copies past either end read zeros, key columns past the
end are masked).  The wrapper in :mod:`stepfuse.attention.triton_kernel` decides when they are
used (:func:`candidates`, :func:`run`).  Both run on the CPU under :mod:`stepfuse.testing.gluon`
in the tests.
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


@gluon.constexpr_function
def _mma_layout(num_warps, columns):
    """Accumulator layout of a warpgroup MMA with ``columns`` output columns, warps stacked over rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, 16])


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
def _softmax_start(s, dtype: gl.constexpr, HEAD_DIM: gl.constexpr, p_layout: gl.constexpr, o_layout: gl.constexpr):
    # A row's first tile starts the running max and sum, and an empty output accumulator; its
    # probabilities feed the first product.
    m_i = gl.max(s, 1)
    p_f = gl.exp2(s - m_i[:, None])
    acc = gl.zeros([s.shape[0], HEAD_DIM], gl.float32, o_layout)
    return m_i, gl.sum(p_f, 1), gl.convert_layout(p_f.to(dtype), p_layout), acc


@gluon.jit
def _softmax_step(s, m_i, l_i):
    # Online softmax (FlashAttention-2, Algorithm 1): the new running max, the factor rescaling what
    # was accumulated under the old one, the tile's probabilities and the new running sum.
    m_new = gl.maximum(m_i, gl.max(s, 1))
    p_f = gl.exp2(s - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return m_new, alpha, p_f, l_i * alpha + gl.sum(p_f, 1)


@gluon.jit
def _rescale(acc, alpha, o_layout: gl.constexpr):
    # the output accumulated under the old running max, moved to the new one
    return acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]


@gluon.jit
def _store_rows(O, acc, l_i, busy, b, h, sob, soh, sos, row0, S_Q, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr,
                dtype: gl.constexpr, o_layout: gl.constexpr):
    # acc / l_i for query rows row0 .. row0 + ROWS inside the sequence; zeros for a row with no key block.
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    out = gl.where(busy, acc / gl.convert_layout(l_i, row_o)[:, None], 0.0)
    rows = row0 + gl.arange(0, ROWS, row_o)
    dims = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, o_layout))
    gl.store(O + b * sob + h * soh + rows[:, None] * sos + dims[None, :], out.to(dtype), mask=(rows < S_Q)[:, None])


@gluon.jit
def block_sparse_fwd(q_desc, k_desc, v_desc, O, KV_NUM, KV_IDX, qk_scale,
                     sob, soh, sos, snb, snh, snm, sib, sih, sim, sik, H, S_Q, S_KV,
                     MASK_BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, EVEN_KV: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    SPLIT_N: gl.constexpr = MASK_BLOCK // BLOCK_N  # key tiles per listed block
    dtype: gl.constexpr = q_desc.dtype
    # Accumulator layouts of the two warpgroup MMAs (scores: BLOCK_N columns, output: HEAD_DIM);
    # the probabilities feed the second one straight from registers.
    s_layout: gl.constexpr = _mma_layout(gl.num_warps(), BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(gl.num_warps(), HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

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
    m_i, l_i, p, acc = _softmax_start(s, dtype, HEAD_DIM, p_layout, o_layout)
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
        m_i, alpha, p_f, l_i = _softmax_step(s, m_i, l_i)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])
        acc = _rescale(acc, alpha, o_layout)
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
    _store_rows(O, acc, l_i, n > 0, b, h, sob, soh, sos, pid_m * BLOCK_M, S_Q, BLOCK_M, HEAD_DIM, dtype, o_layout)


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


def _launch(kernel, config, q, k, v, out, kv_num_blocks, kv_indices, qk_scale, mask_block, q_rows: int,
            program_rows: int, block_n: int, **tiles) -> None:
    """Launch ``kernel`` on ``(B, H, S, D)`` views: query tiles of ``q_rows`` rows copied by TMA, a
    program per ``program_rows`` queries, key tiles of ``block_n``; ``tiles`` its other constexprs
    and ``num_warps``."""
    b, h, s_q, d = q.shape
    s_kv = k.shape[2]
    ints = (out.stride(0), out.stride(1), out.stride(2), *kv_num_blocks.stride(), *kv_indices.stride(), h, s_q, s_kv)
    args = (*descriptors(q, k, v, q_rows, block_n), out, kv_num_blocks, kv_indices, qk_scale, *ints)
    meta = dict(MASK_BLOCK=mask_block, HEAD_DIM=d, EVEN_KV=s_kv % mask_block == 0, BLOCK_N=block_n, **tiles)
    # everything the compiled kernel is specialised on: dtypes, integers, alignments, tiles (launch_compiled)
    key = (kernel.fn.__name__, config, mask_block, q.dtype, q.device.index, ints,
           *((tuple(t.shape), t.stride()) for t in (q, k, v)),
           *(t.data_ptr() % 16 == 0 for t in (out, kv_num_blocks, kv_indices)))
    launch_compiled(kernel, (-(-s_q // program_rows), b * h, 1), key, args, meta)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, kv_num_blocks: torch.Tensor,
           kv_indices: torch.Tensor, qk_scale: float, mask_block: int, config: Tuple[int, int, int, int]) -> None:
    """Run the kernel on ``(B, H, S, D)`` views (``out`` likewise) with ``config`` =
    ``(BLOCK_M, BLOCK_N, num_warps, stages)``; ``qk_scale`` is the softmax scale times log2(e), positive."""
    block_m, block_n, warps, stages = config
    _launch(block_sparse_fwd, config, q, k, v, out, kv_num_blocks, kv_indices, qk_scale, mask_block, block_m, block_m,
            block_n, BLOCK_M=block_m, STAGES=stages, num_warps=warps)


# ---------------------------------------------------------------------------------------------
# Warp-specialised variant: a producer warp and two consumer warpgroups in ping-pong


#: (BLOCK_N, stages) candidates of :func:`block_sparse_fwd_ws`, whose program covers 128 queries
#: (two consumer warpgroups of 64).
WS_CONFIGS = ((128, 2), (64, 3))


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty,
                 b, h, q_row, idx_row, sik, n, MASK_BLOCK: gl.constexpr, SPLIT_N: gl.constexpr,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    # The consumers' query halves, then the key and value tiles, each into its ring slot once both
    # consumers have released the slot's previous tile; the next tile's index is read a tile early.
    HALF_M: gl.constexpr = q_desc.block_type.shape[2]
    for c in gl.static_range(2):
        mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, q_row + c * HALF_M, 0], q_bars.index(c), q_smem.index(c))
    start = _tile_start(idx_row, sik, 0, n, MASK_BLOCK, SPLIT_N, BLOCK_N)
    for t in range(n):
        slot = t % STAGES
        reuse = t >= STAGES
        released = (t // STAGES - 1) & 1  # parity of the release of the tile that held the slot
        next_start = _tile_start(idx_row, sik, t + 1, n, MASK_BLOCK, SPLIT_N, BLOCK_N)
        mbarrier.wait(k_empty.index(slot), released, pred=reuse)
        mbarrier.expect(k_full.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, h, start, 0], k_full.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), released, pred=reuse)
        mbarrier.expect(v_full.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, h, start, 0], v_full.index(slot), v_smem.index(slot))
        start = next_start


@gluon.jit
def _ws_consumer(q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty, turns, O, sob, soh, sos,
                 b, h, q_row, S_Q, S_KV, idx_row, sik, n, qk_scale, C: gl.constexpr, MASK_BLOCK: gl.constexpr,
                 HEAD_DIM: gl.constexpr, EVEN_KV: gl.constexpr, BLOCK_N: gl.constexpr, SPLIT_N: gl.constexpr,
                 STAGES: gl.constexpr):
    # Consumer C owns query rows [C * 64, C * 64 + 64) of the program's 128 and runs the loop of
    # block_sparse_fwd on them.  The two consumers take turns to issue their products (FlashAttention-3's
    # ping-pong, Shah et al. 2024, Section 3.1): while one computes a softmax, the tensor cores run the
    # other's products.  Turn k of consumer C is completion k of turns[C]; consumer 0's first is given.
    HALF_M: gl.constexpr = q_smem.shape[3]
    busy = n > 0
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = _mma_layout(gl.num_warps(), BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(gl.num_warps(), HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    mbarrier.wait(q_bars.index(C), 0)
    q = q_smem.index(C).reshape([HALF_M, HEAD_DIM])
    mbarrier.wait(k_full.index(0), 0, pred=busy)
    mbarrier.wait(turns.index(C), 0)
    s_tok = warpgroup_mma(q, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                          gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
    mbarrier.arrive(turns.index(1 - C))
    s = _scores(warpgroup_mma_wait(num_outstanding=0, deps=[s_tok]), idx_row, sik, 0, n, qk_scale, S_KV, MASK_BLOCK,
                EVEN_KV, SPLIT_N, BLOCK_N, s_layout)
    mbarrier.arrive(k_empty.index(0), pred=busy)
    m_i, l_i, p, acc = _softmax_start(s, dtype, HEAD_DIM, p_layout, o_layout)
    for j in range(1, n):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(k_full.index(slot), (j // STAGES) & 1)
        mbarrier.wait(v_full.index(prev), ((j - 1) // STAGES) & 1)
        mbarrier.wait(turns.index(C), j & 1)
        s_tok = warpgroup_mma(q, k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)),
                              gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False, is_async=True)
        acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        mbarrier.arrive(turns.index(1 - C))
        s = _scores(warpgroup_mma_wait(num_outstanding=1, deps=[s_tok]), idx_row, sik, j, n, qk_scale, S_KV,
                    MASK_BLOCK, EVEN_KV, SPLIT_N, BLOCK_N, s_layout)
        mbarrier.arrive(k_empty.index(slot))
        m_i, alpha, p_f, l_i = _softmax_step(s, m_i, l_i)
        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])
        mbarrier.arrive(v_empty.index(prev))
        acc = _rescale(acc, alpha, o_layout)
        p = gl.convert_layout(p_f.to(dtype), p_layout)
    last = gl.maximum(n - 1, 0)
    mbarrier.wait(v_full.index(last % STAGES), (last // STAGES) & 1, pred=busy)
    mbarrier.wait(turns.index(C), gl.maximum(n, 1) & 1)  # turn n (turn 1 for a row with no tile)
    acc_tok = warpgroup_mma(p, v_smem.index(last % STAGES).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    mbarrier.arrive(turns.index(1 - C))
    acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])
    _store_rows(O, acc, l_i, busy, b, h, sob, soh, sos, q_row + C * HALF_M, S_Q, HALF_M, HEAD_DIM, dtype, o_layout)


@gluon.jit
def block_sparse_fwd_ws(q_desc, k_desc, v_desc, O, KV_NUM, KV_IDX, qk_scale,
                        sob, soh, sos, snb, snh, snm, sib, sih, sim, sik, H, S_Q, S_KV,
                        MASK_BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr, EVEN_KV: gl.constexpr,
                        BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    HALF_M: gl.constexpr = q_desc.block_type.shape[2]
    SPLIT_N: gl.constexpr = MASK_BLOCK // BLOCK_N
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_row = pid_m * 2 * HALF_M
    q_block = q_row // MASK_BLOCK
    n = gl.load(KV_NUM + b * snb + h * snh + q_block * snm) * SPLIT_N
    idx_row = KV_IDX + b * sib + h * sih + q_block * sim

    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, HALF_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(2):
        mbarrier.init(q_bars.index(c), count=1)
        mbarrier.init(turns.index(c), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_full.index(s), count=1)
        mbarrier.init(v_full.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=2)  # released by both consumers
        mbarrier.init(v_empty.index(s), count=2)
    mbarrier.arrive(turns.index(0))  # consumer 0 issues first

    # Consumer 0 runs in the program's own 4 warps, consumer 1 in 4 more, the producer in 1; the
    # producer gives its registers up (24 per thread) to the consumers' accumulators (240), as in
    # FlashAttention-3.
    gl.warp_specialize([(_ws_consumer, (q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty, turns, O, sob,
                                        soh, sos, b, h, q_row, S_Q, S_KV, idx_row, sik, n, qk_scale, 0, MASK_BLOCK,
                                        HEAD_DIM, EVEN_KV, BLOCK_N, SPLIT_N, STAGES)),
                        (_ws_consumer, (q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty, turns, O, sob,
                                        soh, sos, b, h, q_row, S_Q, S_KV, idx_row, sik, n, qk_scale, 1, MASK_BLOCK,
                                        HEAD_DIM, EVEN_KV, BLOCK_N, SPLIT_N, STAGES)),
                        (_ws_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_full, v_full,
                                        k_empty, v_empty, b, h, q_row, idx_row, sik, n, MASK_BLOCK, SPLIT_N, BLOCK_N,
                                        STAGES))],
                       [4, 1], [240, 24])
    for c in gl.static_range(2):
        mbarrier.invalidate(q_bars.index(c))
        mbarrier.invalidate(turns.index(c))
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(k_full.index(s))
        mbarrier.invalidate(v_full.index(s))
        mbarrier.invalidate(k_empty.index(s))
        mbarrier.invalidate(v_empty.index(s))


def launch_ws(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, kv_num_blocks: torch.Tensor,
              kv_indices: torch.Tensor, qk_scale: float, mask_block: int, config: Tuple[int, int]) -> None:
    """:func:`launch` for the warp-specialised kernel, ``config = (BLOCK_N, stages)``; mask blocks
    of at least 128 tokens (a program's 128 queries share one row of the mask)."""
    block_n, stages = config
    _launch(block_sparse_fwd_ws, config, q, k, v, out, kv_num_blocks, kv_indices, qk_scale, mask_block, 64, 128,
            block_n, STAGES=stages, num_warps=4)


def candidates(mask_block: int):
    """Every ``(kernel, configuration)`` able to run masks of ``mask_block``-token blocks:
    ``("overlap", CONFIGS entry)`` for :func:`block_sparse_fwd` (tiles within a block) and
    ``("pingpong", WS_CONFIGS entry)`` for :func:`block_sparse_fwd_ws` (blocks of 128 or more)."""
    found = [("overlap", c) for c in CONFIGS if c[0] <= mask_block and c[1] <= mask_block]
    if mask_block >= 128:
        found += [("pingpong", c) for c in WS_CONFIGS if c[0] <= mask_block]
    return found


def run(choice, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor, qk_scale: float, mask_block: int) -> None:
    """Launch the kernel and configuration ``choice`` (one of :func:`candidates`); arguments as
    for :func:`launch`."""
    kind, config = choice
    (launch if kind == "overlap" else launch_ws)(q, k, v, out, kv_num_blocks, kv_indices, qk_scale, mask_block, config)
