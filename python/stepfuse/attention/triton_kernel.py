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
import os
from typing import Optional, Tuple

import torch

__all__ = ["block_sparse_attention_triton", "block_scores_triton", "block_select_triton", "SUPPORTED_HEAD_DIMS",
           "SUPPORTED_BLOCK_SIZES"]

SUPPORTED_HEAD_DIMS = tuple(range(16, 129, 16))  # padded to a power of two inside the kernel
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
_LAYOUTS = ("bhsd", "bshd")


# Autotuned configurations (BLOCK_M, BLOCK_N, num_warps, num_stages): the program's query rows and
# the key sub-tile walked per step, both dividing the mask's block.  Measured on an H100 in bf16
# (benchmarks/results/h100-80gb-hbm3/bench_attention.txt): 128 x 64 with 4 warps and descriptor
# loads is fastest at head dim 128 (490-516 TFLOP/s dense, 4k-32k tokens), 64 x 128 at head dim 64;
# 128 x 128 with 8 warps is close behind, smaller tiles serve 16- and 32-token mask blocks.
# (Triton 3.6's automatic warp specialisation gained nothing here and fails to compile with 4 warps.)
_CONFIGS = ((128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 2), (64, 64, 4, 3),
            (32, 32, 4, 3), (16, 16, 2, 2))


@functools.lru_cache(maxsize=None)
def _interpreting() -> bool:
    # read once, as Triton does: the kernels are built for one mode per process
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _kernel(mask_block: int, tuned: bool):
    import triton
    import triton.language as tl

    @triton.jit
    def block_sparse_fwd(Q, K, V, O, KV_NUM, KV_IDX, qk_scale,
                         sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
                         snb, snh, snm, sib, sih, sim, sik,
                         H, S_Q, S_KV, D,
                         MASK_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
                         EVEN_KV: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # EVEN_KV: S_KV is a multiple of MASK_BLOCK, so no key column needs masking; EVEN_D: D is
        # a power of two (no padded lanes).  TMA: K and V are (B, H, S, D) tensor descriptors whose
        # block loads go through Hopper's bulk copy engine and read zeros past either end.
        SPLIT_N: tl.constexpr = MASK_BLOCK // BLOCK_N  # key sub-tiles per listed block
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        q_block = pid_m * BLOCK_M // MASK_BLOCK
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        cols0 = tl.arange(0, BLOCK_N)
        # HEAD_DIM is D rounded up to a power of two; the padding lanes load zeros and add nothing.
        in_dim = dims < D
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :] * sqd,
                    mask=(rows[:, None] < S_Q) & in_dim[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        count = tl.load(KV_NUM + b * snb + h * snh + q_block * snm)
        index_row = KV_IDX + b * sib + h * sih + q_block * sim
        # One flat loop over (listed block, sub-tile) so the compiler pipelines the loads across blocks.
        for j in range(0, count * SPLIT_N):
            block = tl.load(index_row + (j // SPLIT_N) * sik)
            start = block * MASK_BLOCK + (j % SPLIT_N) * BLOCK_N
            cols = start + cols0
            valid = cols < S_KV
            if TMA:
                k = K.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM).T
            elif EVEN_KV and EVEN_D:
                k = tl.load(K + b * skb + h * skh + cols[None, :] * sks + dims[:, None] * skd)
            else:
                k = tl.load(K + b * skb + h * skh + cols[None, :] * sks + dims[:, None] * skd,
                            mask=valid[None, :] & in_dim[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, k, input_precision="ieee")
            else:
                s = tl.dot(q, k)
            # base-2 online softmax (qk_scale carries log2(e)): running max, rescaled sums.
            if EVEN_KV:
                # qk_scale > 0 (the host flips q's sign otherwise), so the row max can be scaled
                # after the reduction and the scaling fused into the exponent's argument.
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                m_safe = m_new
                s = s * qk_scale - m_safe[:, None]
            else:
                s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A sub-tile wholly past the sequence's end leaves m at -inf: keep the exponents finite.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                s = s - m_safe[:, None]
            p = tl.math.exp2(s)
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if TMA:
                v = V.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            elif EVEN_KV and EVEN_D:
                v = tl.load(V + b * svb + h * svh + cols[:, None] * svs + dims[None, :] * svd)
            else:
                v = tl.load(V + b * svb + h * svh + cols[:, None] * svs + dims[None, :] * svd,
                            mask=valid[:, None] & in_dim[None, :], other=0.0)
            acc = acc * alpha[:, None]  # then accumulated in place by the matrix unit
            if IEEE:
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
        # A query block with no key/value block attends to nothing: its output is zero.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + h * soh + rows[:, None] * sos + dims[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=(rows[:, None] < S_Q) & in_dim[None, :])

    if not tuned:
        return block_sparse_fwd
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=_descriptor_blocks)
               for m, n, w, s in _CONFIGS if m <= mask_block and n <= mask_block]
    # Tuned per query length too: the best tile at 4k tokens (few programs per SM) is not the one at 32k.
    return triton.autotune(configs, key=["HEAD_DIM", "IEEE", "H", "S_Q", "EVEN_KV", "TMA"])(block_sparse_fwd)


#: The autotuner's choice per (block size, padded head dim, fp32, heads, query length, whole key
#: blocks, dtype, descriptor loads): launched directly once known.
_TUNED: dict = {}


#: Compiled kernels by everything their specialisation depends on (see :func:`launch_compiled`).
_COMPILED: dict = {}


def launch_compiled(kernel, grid: Tuple[int, int, int], key: tuple, args: tuple, meta: dict) -> None:
    """``kernel[grid](*args, **meta)`` (a Triton or Gluon JIT function; ``meta`` its constexprs and
    launch options), run as compiled once Triton has compiled it for ``key``.

    Triton specialises a compiled kernel on its integer arguments (equal to 1, divisible by 16), its
    pointers' alignment and dtypes, its constexprs and options: ``key`` must determine all of them
    (and the tensors' device).  Launching the compiled kernel skips Triton's per-call binding of the
    arguments (its specialisation scan and cache lookup), which costs as much host time as the
    rest of a call."""
    from triton.runtime import driver

    # (the current device too: Triton compiles and launches for it, whatever the tensors' device)
    key = (key, driver.active.get_current_device())
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **meta)
        if hasattr(compiled, "function"):  # the compiled kernel Triton launched
            if len(_COMPILED) >= 256:
                _COMPILED.clear()
            _COMPILED[key] = compiled
        return
    compiled[grid](*args, *(meta[name] for name in kernel.arg_names[len(args):]))


def _descriptor_blocks(nargs):
    """Autotuner pre-hook: a TMA descriptor's block is the configuration's key sub-tile."""
    for name in ("K", "V"):
        if not isinstance(nargs[name], torch.Tensor):
            nargs[name].block_shape = [1, 1, nargs["BLOCK_N"], nargs["HEAD_DIM"]]


@functools.lru_cache(maxsize=None)
def _capability(index: Optional[int]) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` as a (B, H, S, D) view."""
    return t if layout == "bhsd" else t.transpose(1, 2)


def _tma_views(k, v, layout):
    """``k`` and ``v`` as (B, H, S, D) views when the bulk copy engine can read them through tensor
    descriptors (a Hopper or newer GPU, a Triton with host-side descriptors, 16-byte aligned base
    and strides, not turned off by ``STEPFUSE_ATTENTION_TMA=0``), else None."""
    if not k.is_cuda or _interpreting() or os.environ.get("STEPFUSE_ATTENTION_TMA", "1") == "0" \
            or _capability(k.device.index)[0] < 9:
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:  # a Triton without host-side descriptors
        return None
    views = [_bhsd(t, layout) for t in (k, v)]
    return views if all(map(_descriptor_readable, views)) else None


def _descriptor_readable(t: torch.Tensor) -> bool:
    """A tensor descriptor can cover ``t``: not empty (a descriptor's sizes are positive), contiguous
    last dim, 16-byte aligned base and strides."""
    item = t.element_size()
    return t.numel() > 0 and t.stride(-1) == 1 and t.data_ptr() % 16 == 0 \
        and all(st * item % 16 == 0 for st in t.stride()[:-1])


def _tma_descriptors(views, head_dim, block_n):
    """(B, H, S, D) tensor descriptors over the views :func:`_tma_views` gave."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    block = [1, 1, block_n, head_dim]
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), block) for t in views]


def mask_values_valid(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, kv_blocks: int) -> torch.Tensor:
    """A bool scalar on the mask's device: every count lies in ``[0, max_blocks]`` and every used
    index in ``[0, kv_blocks)`` (what the kernel needs to stay in bounds)."""
    used = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_num_blocks[..., None].long()
    counts = ((kv_num_blocks >= 0) & (kv_num_blocks <= kv_indices.shape[-1])).all()
    return counts & (~used | ((kv_indices >= 0) & (kv_indices < kv_blocks))).all()


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
                                  layout: str = "bhsd", check_indices: bool = True,
                                  tiles: Optional[Tuple[int, int, int, int]] = None, tma: bool = True,
                                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of ``q`` over the key/value blocks listed per query block.

    Args:
        q, k, v: ``(B, H, S, D)`` (``layout="bhsd"``) or ``(B, S, H, D)`` (``"bshd"``); the query
            and key sequences may differ in length and need not be multiples of ``block_size``.
        kv_num_blocks: int32 ``(B, H, ceil(S_q / block_size))``.
        kv_indices: int32 ``(B, H, ceil(S_q / block_size), max_blocks)``; indices of key blocks.
        scale: softmax scale, ``1 / sqrt(D)`` by default.
        check_indices: verify the listed indices lie in range (one small host read).
        tiles: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` to run instead of the autotuned choice
            (tile sizes dividing ``block_size``); under ``TRITON_INTERPRET=1`` the default is
            ``(block_size, block_size, 4, 1)``.
        tma: read K and V through tensor descriptors (Hopper's bulk copy engine) where the GPU
            and the strides allow; ``False`` (or ``STEPFUSE_ATTENTION_TMA=0``) keeps pointer loads.
        out: where to write the result (``q``'s shape, dtype and device, any strides); by default
            a new tensor laid out like ``q``.
    """
    b, h, d, s_q, s_kv, q_blocks, kv_blocks = _check(q, k, v, kv_num_blocks, kv_indices, block_size, layout)
    if check_indices and not bool(mask_values_valid(kv_num_blocks, kv_indices, kv_blocks)):
        raise ValueError(f"block_sparse_attention: kv_num_blocks must lie in [0, {kv_indices.shape[-1]}] and the "
                         f"used kv_indices in [0, {kv_blocks}) for a key sequence of {s_kv} tokens")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if out is None:
        out = torch.empty_like(q)
    elif not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"block_sparse_attention: out must be a {q.dtype} tensor of shape {tuple(q.shape)} on "
                         f"{q.device}, got {getattr(out, 'dtype', type(out).__name__)} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    if scale < 0:  # the kernel takes a positive scale: softmax(c q.k) = softmax(|c| (-q).k)
        q, scale = -q, -scale

    def strides(t):  # (batch, head, sequence, dim) strides whatever the layout
        s = t.stride()
        return (s[0], s[1], s[2], s[3]) if layout == "bhsd" else (s[0], s[2], s[1], s[3])

    if tiles is None and _interpreting():
        tiles = (block_size, block_size, 4, 1)
    fixed = {}
    if tiles is not None:
        if len(tiles) != 4 or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tiles) \
                or block_size % tiles[0] or block_size % tiles[1] or tiles[0] < 16 or tiles[1] < 16:
            raise ValueError(f"block_sparse_attention: tiles must be (BLOCK_M, BLOCK_N, num_warps, num_stages) with "
                             f"tile sizes of at least 16 dividing block_size {block_size}, got {tiles!r}")
        fixed = dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1], num_warps=tiles[2], num_stages=tiles[3])
    head_dim = _next_power_of_2(d)
    tma_views = _tma_views(k, v, layout) if tma else None
    use_tma = tma_views is not None
    constants = dict(MASK_BLOCK=block_size, HEAD_DIM=head_dim, IEEE=q.dtype == torch.float32,
                     EVEN_KV=s_kv % block_size == 0, EVEN_D=d == head_dim, TMA=use_tma)
    tuned_key = None if tiles is not None else \
        (block_size, head_dim, constants["IEEE"], h, s_q, constants["EVEN_KV"], q.dtype, use_tma)
    qk_scale = float(scale) * 1.4426950408889634  # the kernels exponentiate in base 2

    def run_triton():
        kernel = _kernel(block_size, tiles is None)
        launch = fixed
        # The autotuner benchmarks the candidates on the first call with a new key; after that,
        # launching the chosen configuration directly skips its per-call argument bookkeeping,
        # which costs tens of microseconds of host time (Triton builds its key by scanning every
        # argument), as much as a sparse kernel at 4k tokens takes on the GPU.
        config = _TUNED.get(tuned_key) if tuned_key is not None else None
        if config is not None:
            launch = config.all_kwargs()
            kernel.best_config = config  # as the autotuner reports its choice
            kernel = kernel.fn
        # (under the autotuner, its pre-hook sets the descriptors' block to each candidate's BLOCK_N)
        kk, vv = _tma_descriptors(tma_views, head_dim, launch.get("BLOCK_N", 16)) if use_tma else (k, v)
        ints = (*strides(q), *strides(k), *strides(v), *strides(out), *kv_num_blocks.stride(), *kv_indices.stride(),
                h, s_q, s_kv, d)
        args = (q, kk, vv, out, kv_num_blocks, kv_indices, qk_scale, *ints)
        if config is None:  # the autotuner (first call) or fixed tiles
            grid = lambda meta: (-(-s_q // meta["BLOCK_M"]), b * h)  # noqa: E731
            kernel[grid](*args, **constants, **launch)
        else:
            key = (tuned_key, tuple(launch.items()), q.device.index, ints,
                   *(t.data_ptr() % 16 == 0 for t in (q, k, v, out, kv_num_blocks, kv_indices)))
            launch_compiled(kernel, (-(-s_q // launch["BLOCK_M"]), b * h, 1), key, args, {**constants, **launch})
        if tuned_key is not None and tuned_key not in _TUNED:
            _TUNED[tuned_key] = kernel.best_config

    gluon_views = _gluon_views(q, out, tma_views, layout, block_size, kv_indices) if tuned_key is not None else None
    if gluon_views is not None:
        from . import gluon_kernel

        def run_gluon(choice):
            gluon_kernel.run(choice, *gluon_views, kv_num_blocks, kv_indices, qk_scale, block_size)

        choice = _GLUON_TUNED.get(tuned_key)
        if choice is None:
            # Measured, not assumed: a Gluon kernel runs only where it beats the autotuned Triton one.
            candidates = {"triton": run_triton}
            candidates.update({c: functools.partial(run_gluon, c) for c in gluon_kernel.candidates(block_size)})
            choice = _GLUON_TUNED[tuned_key] = _fastest(candidates)
        if choice != "triton":
            run_gluon(choice)
            return out
    run_triton()
    return out


#: Per key (as for ``_TUNED``), where the Gluon kernels are enabled: the fastest of their
#: ``(kernel, configuration)`` pairs (``gluon_kernel.candidates``), or ``"triton"`` where the
#: Triton kernel is faster.
_GLUON_TUNED: dict = {}


def _gluon_views(q, out, tma_views, layout, block_size, kv_indices):
    """``(q, k, v, out)`` as (B, H, S, D) views when the Gluon kernels
    (:mod:`stepfuse.attention.gluon_kernel`) may take this call, else None.  They are turned on by
    ``STEPFUSE_ATTENTION_GLUON=1`` and need a Hopper GPU (sm_90: warpgroup MMA), float16/bfloat16,
    head dim 64 or 128, mask blocks of at least 64 and descriptor-readable q, k and v."""
    if os.environ.get("STEPFUSE_ATTENTION_GLUON") != "1" or tma_views is None or kv_indices.shape[-1] == 0 \
            or q.dtype not in (torch.float16, torch.bfloat16) or q.shape[3] not in (64, 128) or block_size < 64 \
            or _capability(q.device.index)[0] != 9:
        return None
    qv, ov = _bhsd(q, layout), _bhsd(out, layout)
    if not _descriptor_readable(qv) or ov.stride(3) != 1:  # out is written through pointers
        return None
    try:
        from . import gluon_kernel  # noqa: F401
    except ImportError:  # a Triton without Gluon's Hopper language
        return None
    return (qv, *tma_views, ov)


def _fastest(candidates: dict):
    """The key of the fastest of ``candidates`` (name -> call), timed on the device as Triton's
    autotuner times its configurations; one that does not fit the GPU is skipped."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    times = {}
    for name, run in candidates.items():
        try:
            times[name] = do_bench(run, warmup=10, rep=40)
        except OutOfResources:
            continue
    return min(times, key=times.get)


@functools.lru_cache(maxsize=None)
def _score_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def block_mean(X, OUT, sxb, sxh, sxs, sxd, H, S, D, N_BLOCKS, BLOCK_SIZE,
                   ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
        # mean over the valid tokens of one block of one head, fp32; padded dims stay zero
        blk = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        dims = tl.arange(0, HEAD_DIM)
        first = blk * BLOCK_SIZE
        count = tl.minimum(BLOCK_SIZE, S - first)
        total = tl.zeros([HEAD_DIM], tl.float32)
        for r in range(0, count, ROWS):
            rows = r + tl.arange(0, ROWS)
            x = tl.load(X + b * sxb + h * sxh + (first + rows)[:, None] * sxs + dims[None, :] * sxd,
                        mask=(rows[:, None] < count) & (dims[None, :] < D), other=0.0)
            total += tl.sum(x.to(tl.float32), 0)
        tl.store(OUT + (bh * N_BLOCKS + blk) * HEAD_DIM + dims, total / count.to(tl.float32))

    @triton.jit
    def block_softmax(QM, KM, OUT, scale, S_KV, QB, KB, BLOCK_SIZE,
                      ROWS: tl.constexpr, COLS: tl.constexpr, HEAD_DIM: tl.constexpr):
        # one row block of one head: logits scale * <q_i, k_j> + log n_j, softmax over all key
        # blocks in chunks (online max and sum, then a second pass that recomputes and normalises)
        bh = tl.program_id(1)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(QM + (bh * QB + rows[:, None]) * HEAD_DIM + dims[None, :], mask=rows[:, None] < QB, other=0.0)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        for start in range(0, KB, COLS):
            cols = start + tl.arange(0, COLS)
            k = tl.load(KM + (bh * KB + cols[None, :]) * HEAD_DIM + dims[:, None], mask=cols[None, :] < KB, other=0.0)
            n_j = tl.maximum(tl.minimum(BLOCK_SIZE, S_KV - cols * BLOCK_SIZE), 1).to(tl.float32)
            s = tl.dot(q, k, input_precision="ieee") * scale + tl.log(n_j)[None, :]
            s = tl.where(cols[None, :] < KB, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        for start in range(0, KB, COLS):
            cols = start + tl.arange(0, COLS)
            k = tl.load(KM + (bh * KB + cols[None, :]) * HEAD_DIM + dims[:, None], mask=cols[None, :] < KB, other=0.0)
            n_j = tl.maximum(tl.minimum(BLOCK_SIZE, S_KV - cols * BLOCK_SIZE), 1).to(tl.float32)
            s = tl.dot(q, k, input_precision="ieee") * scale + tl.log(n_j)[None, :]
            tl.store(OUT + (bh * QB + rows[:, None]) * KB + cols[None, :], tl.exp(s - m_i[:, None]) / l_i[:, None],
                     mask=(rows[:, None] < QB) & (cols[None, :] < KB))

    return block_mean, block_softmax


def block_scores_triton(q: torch.Tensor, k: torch.Tensor, block_size: int = 64, scale: Optional[float] = None,
                        layout: str = "bhsd") -> torch.Tensor:
    """Estimated attention mass of every (query block, key block) pair, float32 ``(B, H, Qb, Kb)``:
    the row softmax of ``scale * <mean q_i, mean k_j> + log n_j`` over key blocks, means over the
    valid tokens of each block (``n_j`` of them), as ``stepfuse.ref.attention.block_scores``.

    Two kernels: block means of q and k (fp32), then per row block the logits and their softmax,
    streamed over the key blocks in chunks so rows of any length fit.
    """
    op = "block_scores"
    if layout not in _LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {_LAYOUTS}, got {layout!r}")
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k)):
        raise ValueError(f"{op}: q and k must be 4-D tensors ({layout})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or k.device != q.device:
        raise TypeError(f"{op}: q and k must be float16, bfloat16 or float32 of one dtype on one device, got "
                        f"{q.dtype}/{k.dtype} on {q.device}/{k.device}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{op}: block_size must be a positive int, got {block_size!r}")
    qv, kv = _bhsd(q, layout), _bhsd(k, layout)
    if qv.shape[:2] != kv.shape[:2] or qv.shape[3] != kv.shape[3]:
        raise ValueError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head dim")
    b, h, s_q, d = qv.shape
    s_kv = kv.shape[2]
    q_blocks, kv_blocks = -(-s_q // block_size), -(-s_kv // block_size)
    head_dim = max(16, _next_power_of_2(d))  # tl.dot needs every side >= 16
    block_mean, block_softmax = _score_kernels()
    means = []
    for x, s, blocks in ((qv, s_q, q_blocks), (kv, s_kv, kv_blocks)):
        out = torch.empty(b * h, blocks, head_dim, dtype=torch.float32, device=q.device)
        block_mean[(blocks, b * h)](x, out, *x.stride(), h, s, d, blocks, block_size,
                                    ROWS=min(64, _next_power_of_2(block_size)), HEAD_DIM=head_dim)
        means.append(out)
    scores = torch.empty(b, h, q_blocks, kv_blocks, dtype=torch.float32, device=q.device)
    rows = 16
    block_softmax[(-(-q_blocks // rows), b * h)](
        *means, scores, float(1.0 / math.sqrt(d) if scale is None else scale), s_kv, q_blocks, kv_blocks, block_size,
        ROWS=rows, COLS=min(128, max(16, _next_power_of_2(kv_blocks))), HEAD_DIM=head_dim)
    return scores


@functools.lru_cache(maxsize=None)
def _select_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def block_select(SCORES, FORCED_ROW, FORCED_COL, NUM, IDX, QB, KB, mass, keep_top, min_blocks,
                     DIAG: tl.constexpr, BY_MASS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        # ROWS query blocks of one (batch, head): rank the key blocks by score with one sort per row
        # (keys: the score's bits, which order as the non-negative floats do, above the reversed
        # column, so ties go to the lower index), find the last kept rank, keep every block whose key
        # reaches it, add the forced blocks, and write the kept indices ascending.
        bh = tl.program_id(1)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, COLS)
        valid = (rows[:, None] < QB) & (cols[None, :] < KB)
        offsets = (bh * QB + rows[:, None]) * KB + cols[None, :]
        score = tl.load(SCORES + offsets, mask=valid, other=-1.0)  # padding ranks last
        key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (COLS - 1 - cols[None, :]).to(tl.int64)
        ranked = tl.sort(key, dim=1, descending=True)
        rank = tl.arange(0, COLS)[None, :]
        if BY_MASS:
            value = (ranked >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            before = tl.cumsum(value, 1) - value  # mass of the higher-ranked blocks
            kept = ((before < mass) | (rank < min_blocks)) & (rank < KB)
            last = tl.sum(kept.to(tl.int32), 1) - 1
        else:
            last = tl.full([ROWS], keep_top - 1, tl.int32)
        threshold = tl.sum(tl.where(rank == last[:, None], ranked, 0), 1)  # the key of the last kept rank
        keep = (key >= threshold[:, None]) & valid
        forced_col = tl.load(FORCED_COL + cols, mask=cols < KB, other=0) != 0
        forced_row = tl.load(FORCED_ROW + rows, mask=rows < QB, other=0) != 0
        keep = keep | ((forced_col[None, :] | forced_row[:, None]) & valid)
        if DIAG:
            keep = keep | ((rows[:, None] == cols[None, :]) & valid)
        slot = tl.cumsum(keep.to(tl.int32), 1) - 1
        tl.store(IDX + (bh * QB + rows[:, None]) * KB + slot, tl.broadcast_to(cols[None, :], [ROWS, COLS]),
                 mask=keep)
        tl.store(NUM + bh * QB + rows, tl.sum(keep.to(tl.int32), 1), mask=rows < QB)

    return block_select


#: Widest key-block row the fused selection sorts in one program.
SELECT_MAX_BLOCKS = 4096


def block_select_triton(scores: torch.Tensor, forced_rows: torch.Tensor, forced_cols: torch.Tensor, *,
                        top_k: Optional[int] = None, mass: Optional[float] = None, min_blocks: int = 1,
                        diagonal: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The adaptive rule of :func:`stepfuse.attention.adaptive_mask` over float32 ``(B, H, Qb, Kb)``
    block scores in one kernel, with nothing read back to the host: per query block the ``top_k``
    best key blocks (at least ``min_blocks``) or the fewest whose mass reaches ``mass`` (at least
    ``min_blocks``), plus the key blocks ``forced_cols`` (bool ``Kb``) marks, whole rows where
    ``forced_rows`` (bool ``Qb``) is set, and the diagonal.  Returns int32 ``kv_num_blocks``
    ``(B, H, Qb)`` and ``kv_indices`` ``(B, H, Qb, Kb)`` (ascending, unused entries zero)."""
    b, h, q_blocks, kv_blocks = scores.shape
    if kv_blocks > SELECT_MAX_BLOCKS:
        raise ValueError(f"block_select: at most {SELECT_MAX_BLOCKS} key blocks, got {kv_blocks}")
    num = torch.empty(b, h, q_blocks, dtype=torch.int32, device=scores.device)
    idx = torch.zeros(b, h, q_blocks, kv_blocks, dtype=torch.int32, device=scores.device)
    cols = _next_power_of_2(kv_blocks)
    rows = max(1, min(16, 2048 // cols, _next_power_of_2(q_blocks)))
    keep_top = min(max(top_k or 0, min_blocks), kv_blocks)
    _select_kernel()[(-(-q_blocks // rows), b * h)](
        scores.contiguous(), forced_rows.to(torch.int8), forced_cols.to(torch.int8), num, idx, q_blocks, kv_blocks,
        float(mass if mass is not None else 1.0), keep_top, min_blocks, DIAG=bool(diagonal), BY_MASS=mass is not None,
        ROWS=rows, COLS=cols)
    return num, idx


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
