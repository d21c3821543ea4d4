"""stepfuse.testing.gluon: the CPU emulator of Hopper Gluon kernels computes what the kernel computes
and reports the asynchronous hazards it is meant to find (the block-sparse attention kernel's own
checks are in test_attention_triton.py)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon's Hopper language
    pytest.skip("this Triton has no Gluon for Hopper", allow_module_level=True)

from stepfuse.testing import gluon as emulator  # noqa: E402


@gluon.jit
def staged_product(a_ptr, b_desc, c_desc, FENCE: gl.constexpr, STORE_WAIT: gl.constexpr, REUSE_A: gl.constexpr):
    # C = A B: A through registers into shared memory, B by TMA, one warpgroup MMA, C out by a TMA store.
    M: gl.constexpr = c_desc.block_type.shape[0]
    N: gl.constexpr = c_desc.block_type.shape[1]
    K: gl.constexpr = b_desc.block_type.shape[0]
    blocked: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    rows = gl.arange(0, M, gl.SliceLayout(1, blocked))
    cols = gl.arange(0, K, gl.SliceLayout(0, blocked))
    a = gl.load(a_ptr + rows[:, None] * K + cols[None, :])
    a_smem = gl.allocate_shared_memory(gl.float16, [M, K], c_desc.layout)
    a_smem.store(a)
    if FENCE:
        fence_async_shared()
    b_smem = gl.allocate_shared_memory(gl.float16, [K, N], b_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(b_desc, [0, 0], bar, b_smem)
    mbarrier.wait(bar, 0)
    mbarrier.invalidate(bar)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                         instr_shape=[16, N, 16])
    c = warpgroup_mma(a_smem, b_smem, gl.zeros([M, N], gl.float32, acc_layout))
    if REUSE_A:
        c_smem = a_smem  # C written over A while nothing reads A any more: no hazard
    else:
        c_smem = gl.allocate_shared_memory(gl.float16, [M, N], c_desc.layout)
    c_smem.store(c.to(gl.float16))
    fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [0, 0], c_smem)
    if STORE_WAIT:
        tma.store_wait(0)


def _layout():
    return gl.NVMMASharedLayout.get_default_for([64, 64], gl.float16)


def _run(rows=64, **flags):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 64, generator=g).half() for _ in range(2))
    c = torch.full((rows, 64), float("nan")).half()
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [64, 64], _layout()) for t in (b, c)]
    emulator.emulate(staged_product, (1,), (a, *descs), dict(dict(FENCE=True, STORE_WAIT=True, REUSE_A=False), **flags,
                                                            num_warps=4))
    return a, b, c


@pytest.mark.parametrize("reuse", [False, True])
def test_emulated_product(reuse):
    a, b, c = _run(REUSE_A=reuse)
    torch.testing.assert_close(c.float(), a.float() @ b.float(), rtol=2e-3, atol=2e-2)


def test_emulated_store_is_clipped_to_the_tensor():
    # a 64-row block stored into a 40-row tensor: the rows past its end are dropped, not written
    a, b, c = _run(rows=40)
    torch.testing.assert_close(c.float(), (a.float() @ b.float())[:40], rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("flags,report", [
    (dict(FENCE=False), "no fence_async_shared"),  # the MMA (async proxy) reads what registers wrote
    (dict(STORE_WAIT=False), "TMA stores never waited"),
])
def test_emulator_reports(flags, report):
    with pytest.raises(emulator.GluonHazard, match=report):
        _run(**flags)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles the kernel, which the interpreter replaces")
def test_the_emulated_kernel_is_a_valid_hopper_kernel():
    # What the emulator ran compiles for sm_90 to the instructions it stands in for; mbarrier.expect
    # is an arrival with expected bytes (arrive.expect_tx), as the emulator counts it.
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    desc = f"tensordesc<fp16[64, 64],{_layout()!r}>"
    source = GluonASTSource(fn=staged_product, signature=dict(a_ptr="*fp16", b_desc=desc, c_desc=desc, FENCE="constexpr",
                                                              STORE_WAIT="constexpr", REUSE_A="constexpr"),
                            constexprs={(3,): True, (4,): True, (5,): False})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    for instruction in ("wgmma.mma_async", "cp.async.bulk.tensor", "fence.proxy.async", "mbarrier.arrive.expect_tx",
                        "mbarrier.try_wait.parity", "cp.async.bulk.commit_group", "cp.async.bulk.wait_group.read"):
        assert instruction in ptx, instruction
