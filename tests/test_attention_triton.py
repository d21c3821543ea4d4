"""The Triton block-sparse attention kernel against the masked dense reference: under
TRITON_INTERPRET=1 on the CPU (small shapes), and on a GPU at real sizes when one is visible."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from stepfuse.attention import block_sparse_attention_triton  # noqa: E402
from stepfuse.attention.triton_kernel import _CONFIGS  # noqa: E402
from stepfuse.ref import attention as ref  # noqa: E402

# Triton reads TRITON_INTERPRET when it is imported, and the suite may have imported it already:
# the interpreted checks run in a fresh interpreter process that sets it first.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NEEDS_INTERPRETER = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where no GPU is")


def _interpreted(call: str) -> None:
    """Run ``call`` (an expression over this module's names) under TRITON_INTERPRET=1."""
    if INTERPRETED:
        eval(call)
        return
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_attention_triton as t; t.{call}"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def random_blocks(b, h, q_blocks, kv_blocks, density, seed=0, device="cpu"):
    """A random block description: each query block keeps about ``density`` of the key blocks
    (at least one), in random order; unused index slots hold junk the kernel must ignore."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(b, h, q_blocks, kv_blocks, generator=g) < density
    keep[..., 0] |= ~keep.any(-1)
    num = keep.sum(-1).to(torch.int32)
    order = torch.rand(b, h, q_blocks, kv_blocks, generator=g).masked_fill(~keep, 2.0).argsort(-1)
    idx = torch.where(torch.arange(kv_blocks) < num[..., None], order, torch.full_like(order, 10 ** 6))
    return num.to(device), idx.to(torch.int32).to(device)


def _inputs(b, h, s_q, s_kv, d, dtype, layout, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lambda s: (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    return [torch.randn(shape(s), generator=g).to(device=device, dtype=dtype) for s in (s_q, s_kv, s_kv)]


TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _compare(b, h, s_q, s_kv, d, block, density, dtype, layout, device="cpu", seed=0, tiles=None, tma=True,
             attention=None, empty_rows=False):
    """``attention(q, k, v, num, idx, block, layout)`` (the Triton kernel with ``tiles`` and ``tma`` by
    default) against the reference on random inputs and a random mask (with some query blocks
    listing no key block when ``empty_rows``)."""
    q, k, v = _inputs(b, h, s_q, s_kv, d, dtype, layout, device, seed)
    num, idx = random_blocks(b, h, -(-s_q // block), -(-s_kv // block), density, seed, device)
    if empty_rows:
        num[..., ::3] = 0
    if attention is None:
        got = block_sparse_attention_triton(q, k, v, num, idx, block_size=block, layout=layout, tiles=tiles, tma=tma)
    else:
        got = attention(q, k, v, num, idx, block, layout)
    want = ref.block_sparse_attention(q, k, v, num, idx, block, layout=layout)
    assert got.shape == q.shape and got.dtype == q.dtype
    if device == "cuda" and dtype != torch.float32:
        # Half precision on the GPU: held to twice the error of PyTorch's own dense attention in
        # the same dtype under the equivalent element mask (both against the float64 reference).
        bhsd = (lambda t: t) if layout == "bhsd" else (lambda t: t.transpose(1, 2))
        mask = ref.block_mask_to_dense(num, idx, block, s_q, s_kv)
        dense = bhsd(torch.nn.functional.scaled_dot_product_attention(bhsd(q), bhsd(k), bhsd(v), attn_mask=mask))
        # A query with no allowed key: SDPA's output is not defined there (NaN), the kernels' is zero.
        attends = bhsd(mask.any(-1, keepdim=True)).expand_as(got)
        assert torch.all(got[~attends] == 0)
        dense = torch.where(attends, dense, 0)
        exact = ref.block_sparse_attention(*(t.double() for t in (q, k, v)), num, idx, block, layout=layout)
        ours, theirs = (got.double() - exact).abs().max(), (dense.double() - exact).abs().max()
        assert ours <= 2 * theirs + 1e-4, f"error {ours:.3g} against dense SDPA's {theirs:.3g}"
        return
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


INTERPRETED_CASES = [(layout, dtype, s_q, s_kv, density) for layout in ("bhsd", "bshd")
                     # bfloat16 is checked on the GPU only: the interpreter emulates it through numpy,
                     # which has no bfloat16 matrix product.
                     for dtype in ("float32", "float16")
                     for s_q, s_kv, density in ((48, 48, 1.0), (40, 56, 0.5), (17, 33, 0.4), (16, 16, 0.3))]


def run_interpreted_cases():
    for layout, dtype, s_q, s_kv, density in INTERPRETED_CASES:
        try:
            _compare(1, 2, s_q, s_kv, 16, 16, density, getattr(torch, dtype), layout)
        except AssertionError as e:
            raise AssertionError(f"layout={layout} dtype={dtype} s_q={s_q} s_kv={s_kv} density={density}: {e}")


def run_subtile_cases():
    # Program tiles smaller than the mask's blocks: a listed block is walked in sub-tiles, and with
    # 40 keys in blocks of 32 the last sub-tile of the second block lies wholly past the end.
    for s_q, s_kv, tiles in ((40, 40, (16, 16, 4, 1)), (64, 40, (32, 16, 4, 1)), (33, 70, (16, 32, 4, 1))):
        for layout in ("bhsd", "bshd"):
            _compare(1, 2, s_q, s_kv, 16, 32, 0.6, torch.float32, layout, tiles=tiles)
    # Head dims that are not powers of two run padded to the next one.
    for d in (48, 80):
        _compare(1, 2, 40, 40, d, 16, 0.5, torch.float32, "bshd")
    # The kernel folds a negative softmax scale into q's sign (it scales the row max after the
    # reduction, which needs a positive scale); logits in the hundreds would overflow otherwise.
    q, k, v = _inputs(1, 2, 48, 48, 16, torch.float32, "bhsd")
    q = q * 100
    num, idx = random_blocks(1, 2, 3, 3, 0.7)
    for scale in (-0.3, 0.0):
        torch.testing.assert_close(block_sparse_attention_triton(q, k, v, num, idx, block_size=16, scale=scale),
                                   ref.block_sparse_attention(q, k, v, num, idx, 16, scale=scale), rtol=2e-5, atol=2e-5)


def check_empty_query_block():
    q, k, v = _inputs(1, 1, 32, 32, 16, torch.float32, "bhsd")
    num = torch.tensor([[[0, 1]]], dtype=torch.int32)
    idx = torch.tensor([[[[5, 5], [1, 0]]]], dtype=torch.int32)
    out = block_sparse_attention_triton(q, k, v, num, idx, block_size=16)
    assert torch.equal(out[:, :, :16], torch.zeros_like(out[:, :, :16]))
    torch.testing.assert_close(out, ref.block_sparse_attention(q, k, v, num, idx, 16), rtol=2e-5, atol=2e-5)


def select_reference(scores, forced_rows, forced_cols, diagonal, **rule):
    from stepfuse.attention.masks import _select

    keep = _select(scores, rule.get("top_k"), rule.get("mass"), rule.get("min_blocks", 1))
    keep = keep | forced_rows[:, None].to(keep.device) | forced_cols[None, :].to(keep.device)
    if diagonal:
        keep |= torch.eye(scores.shape[-2], dtype=torch.bool, device=keep.device)
    return keep


SELECT_CASES = [  # (b, h, query blocks, key blocks, rule, diagonal)
    (1, 2, 5, 7, dict(mass=0.8), False),
    (2, 1, 9, 9, dict(top_k=3), True),
    (1, 1, 4, 33, dict(mass=0.5, min_blocks=3), False),
    (1, 3, 17, 17, dict(mass=1.0), True),   # everything
    (1, 1, 6, 1, dict(top_k=4), False),     # one key block
    (2, 2, 3, 40, dict(top_k=50, min_blocks=2), False),  # budget above the row
]


def run_select_cases(device="cpu"):
    from stepfuse.attention.masks import BlockMask
    from stepfuse.attention.triton_kernel import block_select_triton

    g = torch.Generator().manual_seed(0)
    for b, h, qb, kb, rule, diagonal in SELECT_CASES:
        scores = torch.softmax(2 * torch.randn(b, h, qb, kb, generator=g), -1).to(device)
        forced_rows = torch.zeros(qb, dtype=torch.bool)
        forced_rows[qb // 2] = True
        forced_cols = torch.zeros(kb, dtype=torch.bool)
        forced_cols[-1] = True
        num, idx = block_select_triton(scores, forced_rows.to(device), forced_cols.to(device), diagonal=diagonal,
                                       **rule)
        got = BlockMask(num, idx, 16, qb * 16, kb * 16).to_dense_blocks()
        want = select_reference(scores, forced_rows, forced_cols, diagonal, **rule)
        assert torch.equal(got, want), (rule, diagonal)
        used = torch.arange(kb, device=device) < num[..., None]
        assert bool(((idx[..., 1:] > idx[..., :-1]) | ~used[..., 1:]).all()), "indices not ascending"


@NEEDS_INTERPRETER
def test_interpreted_kernel_matches_reference():
    # both layouts, fp32/fp16, lengths that are and are not multiples of the block, 30-100% density
    _interpreted("run_interpreted_cases()")


@NEEDS_INTERPRETER
def test_interpreted_subtiles_match_reference():
    _interpreted("run_subtile_cases()")


@NEEDS_INTERPRETER
def test_interpreted_block_selection_matches_reference():
    # the fused adaptive-mask selection: top-k or cumulative mass with a minimum, forced rows,
    # columns and diagonal, widths that are not powers of two
    _interpreted("run_select_cases()")


@NEEDS_INTERPRETER
def test_query_block_without_key_blocks_gives_zero():
    _interpreted("check_empty_query_block()")


@pytest.mark.parametrize("case,error,match", [
    (dict(idx_value=7), ValueError, "kv_indices"),
    (dict(num_value=3), ValueError, "kv_num_blocks"),
    (dict(head_dim=24), ValueError, "head dim"),
    (dict(block=48), ValueError, "block_size"),
    (dict(kv_len=40, k_only=True), ValueError, "same shape"),
    (dict(dtype_k=torch.float16), TypeError, "share dtype"),
    (dict(num_shape=(1, 2, 5)), ValueError, "kv_num_blocks must be an int32 tensor of shape"),
    (dict(layout="sbhd"), ValueError, "layout"),
    (dict(tiles=(24, 16, 4, 1)), ValueError, "tiles"),
    (dict(tiles=(16, 16, 4)), ValueError, "tiles"),
])
def test_bad_input(case, error, match):
    d = case.get("head_dim", 16)
    q, k, v = _inputs(1, 2, 32, 32, d, torch.float32, "bhsd")
    if "kv_len" in case:
        k = torch.randn(1, 2, case["kv_len"], d)
    if "dtype_k" in case:
        k = k.to(case["dtype_k"])
    num = torch.full(case.get("num_shape", (1, 2, 2)), case.get("num_value", 1), dtype=torch.int32)
    idx = torch.full((1, 2, 2, 2), case.get("idx_value", 0), dtype=torch.int32)
    with pytest.raises(error, match=match):
        block_sparse_attention_triton(q, k, v, num, idx, block_size=case.get("block", 16),
                                      layout=case.get("layout", "bhsd"), tiles=case.get("tiles"))


class _FakeAutotuner:
    """Stands in for the autotuned kernel: records how each call was launched."""

    def __init__(self):
        self.launches, self.best_config = [], None
        outer = self

        class Jit:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: outer.launches.append(("direct", kwargs))

        self.fn = Jit()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(("autotuner", kwargs))
            self.best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)

        return launch


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs fixed tiles")
def test_tuned_configuration_is_launched_directly(monkeypatch, recording_driver):
    from stepfuse.attention import triton_kernel

    fake = _FakeAutotuner()
    monkeypatch.setattr(triton_kernel, "_kernel", lambda block, tuned: fake)
    num, idx = random_blocks(1, 2, 2, 2, 1.0)
    for s_q in (64, 64, 48, 64, 48):
        q, k, v = _inputs(1, 2, s_q, 64, 32, torch.float16, "bhsd")
        block_sparse_attention_triton(q, k, v, num, idx, block_size=32, check_indices=False)
    # the autotuner sees each new key once; later calls launch its choice with the same constants
    assert [how for how, _ in fake.launches] == ["autotuner", "direct", "autotuner", "direct", "direct"]
    direct = fake.launches[1][1]
    assert {k: direct[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")} == \
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    assert {k: v for k, v in direct.items() if k not in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages",
                                                           "num_ctas")} == fake.launches[0][1]


class _RecordingDriver:
    """A stand-in for Triton's CUDA driver on a machine without a GPU: kernels compile for sm_90 as
    on an H100, and each launch records the arguments Triton hands the CUDA launcher."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.launches = []
        self.target = GPUTarget("cuda", 90, 32)
        driver = self

        class Utils:
            def load_binary(self, name, kernel, shared, device):
                return 1, 1, 128, 0, 1024  # module, function, registers, spills, max threads

        class Launcher:
            def __init__(self, src, metadata):
                pass

            def __call__(self, *args):
                driver.launches.append(args)

        self.utils, self.launcher_cls = Utils(), Launcher
        self.get_current_device = lambda: 0
        self.get_current_stream = lambda device=None: 0

    def get_current_target(self):
        return self.target


def _same_launch(a, b) -> bool:
    """Two recorded launches agree: grid, stream, kernel and every argument (tensors by identity,
    tensor descriptors by memory, shape, strides, block and layout; the profiler-hook metadata aside)."""
    def same(x, y):
        if x is y or type(x).__name__ == "LazyDict":
            return True
        if isinstance(x, torch.Tensor):
            return False
        if type(x).__name__ == "TensorDescriptor":
            return type(y) is type(x) and x.base.data_ptr() == y.base.data_ptr() and \
                [list(t) for t in (x.shape, x.strides, x.block_shape)] == [list(t) for t in (y.shape, y.strides,
                                                                                          y.block_shape)] and \
                getattr(x, "layout", None) == getattr(y, "layout", None)  # (Gluon's descriptors carry one)
        return type(x) is type(y) and x == y

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


@pytest.fixture
def recording_driver(monkeypatch):
    import triton.compiler.compiler
    import triton.runtime.jit

    from stepfuse.attention import triton_kernel

    driver = _RecordingDriver()
    # set_active's effect, undone by monkeypatch (reset_active would look for a real GPU driver)
    monkeypatch.setattr(triton.runtime.driver, "_active", driver)
    monkeypatch.setattr(triton.compiler.compiler, "max_shared_mem", lambda device: 227 * 1024)
    monkeypatch.setattr(triton_kernel, "_COMPILED", {})
    monkeypatch.setattr(triton_kernel, "_TUNED", {})
    monkeypatch.setattr(triton_kernel, "_capability", lambda index: (9, 0))
    runs = []
    jit_run = triton.runtime.jit.JITFunction.run
    monkeypatch.setattr(triton.runtime.jit.JITFunction, "run", lambda self, *a, **kw: runs.append(1) or
                        jit_run(self, *a, **kw))
    driver.jit_runs = runs
    return driver


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, which the interpreter replaces")
@pytest.mark.parametrize("s,h,d,layout,tma", [(4096, 4, 128, "bhsd", True), (1000, 3, 128, "bshd", True),
                                              (777, 2, 64, "bshd", False)])
def test_compiled_launch_matches_triton_dispatch(recording_driver, monkeypatch, s, h, d, layout, tma):
    # After Triton's own dispatch launched the tuned tiles once, later calls launch its compiled
    # kernel directly: the CUDA launcher must receive exactly what Triton's dispatch gives it.
    from stepfuse.attention import triton_kernel

    monkeypatch.setattr(triton_kernel, "_tma_views", lambda k, v, layout: [
        t if layout == "bhsd" else t.transpose(1, 2) for t in (k, v)] if tma else None)
    q, k, v = _inputs(1, h, s, s, d, torch.bfloat16, layout)
    out = torch.empty_like(q)
    num, idx = random_blocks(1, h, -(-s // 128), -(-s // 128), 0.5)
    triton_kernel._TUNED[(128, d, False, h, s, s % 128 == 0, torch.bfloat16, tma)] = \
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3)
    for _ in range(3):
        block_sparse_attention_triton(q, k, v, num, idx, block_size=128, layout=layout, check_indices=False, out=out)
    first, second, third = recording_driver.launches
    assert len(recording_driver.jit_runs) == 1 and len(triton_kernel._COMPILED) == 1
    assert _same_launch(first, second) and _same_launch(first, third)
    assert first[:3] == (-(-s // 128), h, 1)


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, which the interpreter replaces")
@pytest.mark.parametrize("s,h,d,layout,choice", [(1000, 3, 128, "bshd", ("overlap", (128, 64, 4, 2))),
                                                 (1024, 2, 64, "bhsd", ("overlap", (64, 64, 4, 2))),
                                                 (777, 2, 128, "bshd", ("pingpong", (128, 2)))])
def test_gluon_compiled_launch_matches_triton_dispatch(recording_driver, s, h, d, layout, choice):
    gluon_kernel = _gluon()
    q, k, v = _inputs(1, h, s, s, d, torch.bfloat16, layout)
    out = torch.empty_like(q)
    num, idx = random_blocks(1, h, -(-s // 128), -(-s // 128), 0.5)
    views = [t if layout == "bhsd" else t.transpose(1, 2) for t in (q, k, v, out)]
    for _ in range(3):
        gluon_kernel.run(choice, *views, num, idx, 0.125, 128)
    first, second, third = recording_driver.launches
    assert len(recording_driver.jit_runs) == 1
    assert _same_launch(first, second) and _same_launch(first, third)
    assert first[:3] == (-(-s // (choice[1][0] if choice[0] == "overlap" else 128)), h, 1)


def _compile_for_sm90(source_cls, fn, signature: dict, constants: dict, unaligned, **options):
    """``fn`` compiled ahead of time for sm_90 with the specialisation contiguous inputs get at run
    time: ``constants`` as constexprs, the other arguments 32-bit integers (``signature`` names the
    rest) divisible by 16, except those in ``unaligned``."""
    from triton.backends.compiler import GPUTarget

    names = fn.arg_names
    signature = {**{name: "i32" for name in names}, **signature, **{name: "constexpr" for name in constants}}
    aligned = [n for n in names if n not in constants and n not in unaligned]
    source = source_cls(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_for_hopper(tiles, tma: bool, even: bool, d: int = 128, dtype: str = "bf16"):
    """The kernel compiled ahead of time for sm_90 (PTX and ptxas' cubin), no GPU needed, with the
    specialisation Triton gives contiguous inputs at run time: unit strides as constants, pointers
    and the other integers marked divisible by 16."""
    from triton.compiler import ASTSource

    from stepfuse.attention.triton_kernel import _kernel

    block_m, block_n, warps, stages = tiles
    signature = dict(Q=f"*{dtype}", O=f"*{dtype}", KV_NUM="*i32", KV_IDX="*i32", qk_scale="fp32")
    signature.update({n: f"tensordesc<{dtype}[1,1,{block_n},{d}]>" if tma else f"*{dtype}" for n in ("K", "V")})
    constants = dict(MASK_BLOCK=128, HEAD_DIM=d, IEEE=False, EVEN_KV=even, EVEN_D=even, TMA=tma, BLOCK_M=block_m,
                     BLOCK_N=block_n, sqd=1, skd=1, svd=1, sod=1, snm=1, sik=1)
    return _compile_for_sm90(ASTSource, _kernel(128, False), signature, constants, ("K", "V", "qk_scale"),
                             num_warps=warps, num_stages=stages)


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, which the interpreter replaces")
@pytest.mark.parametrize("tma,even", [(True, True), (False, False)])
@pytest.mark.parametrize("tiles", _CONFIGS)
def test_every_configuration_compiles_for_hopper(tiles, tma, even):
    # Where no GPU is (CI), each autotune candidate still goes through Triton's whole pipeline to
    # an sm_90 binary: descriptor loads over whole blocks, and pointer loads masked for ragged
    # blocks and a padded head dim; its products run on the tensor cores (warpgroup MMA from 64-row
    # tiles on 4 warps, mma.sync below) and its shared memory fits an H100 block's 227 KiB.
    compiled = compile_for_hopper(tiles, tma, even)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and ("wgmma.mma_async" in ptx if tiles[0] >= 64 else "mma.sync" in ptx)
    assert ("cp.async.bulk.tensor" in ptx) == tma
    assert compiled.metadata.shared <= 227 * 1024


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,block", [(64, 64), (128, 64), (128, 128), (64, 128), (96, 64), (64, 32)])
@pytest.mark.parametrize("s_q,s_kv,density", [(1000, 1000, 0.25), (777, 1290, 0.5), (512, 512, 1.0)])
def test_kernel_on_cuda(layout, dtype, d, block, s_q, s_kv, density):
    _compare(2, 3, s_q, s_kv, d, block, density, dtype, layout, device="cuda")


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, which the interpreter replaces")
@pytest.mark.parametrize("by_mass", [True, False])
@pytest.mark.parametrize("rows,cols", [(8, 256), (1, 4096)])
def test_block_selection_compiles_for_hopper(by_mass, rows, cols):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from stepfuse.attention.triton_kernel import _select_kernel

    fn = _select_kernel()
    signature = {name: "i32" for name in fn.arg_names}
    signature.update(SCORES="*fp32", FORCED_ROW="*i8", FORCED_COL="*i8", NUM="*i32", IDX="*i32", mass="fp32")
    constants = dict(DIAG=True, BY_MASS=by_mass, ROWS=rows, COLS=cols)
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert compiled.asm["cubin"] and compiled.metadata.shared <= 227 * 1024


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_block_selection_on_cuda():
    run_select_cases("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_direct_launch_matches_autotuned_call_on_cuda(layout):
    # the first call autotunes, the next ones launch the chosen tiles directly: same output
    q, k, v = _inputs(1, 4, 1536, 1536, 128, torch.bfloat16, layout, "cuda", seed=3)
    num, idx = random_blocks(1, 4, 12, 12, 0.4, seed=3, device="cuda")
    first = block_sparse_attention_triton(q, k, v, num, idx, block_size=128, layout=layout)
    for _ in range(2):
        assert torch.equal(block_sparse_attention_triton(q, k, v, num, idx, block_size=128, layout=layout), first)
    _compare(1, 4, 1536, 1536, 128, 128, 0.4, torch.bfloat16, layout, device="cuda", seed=3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("tiles", _CONFIGS)
@pytest.mark.parametrize("s,d", [(1000, 128), (1024, 80)])
def test_every_configuration_on_cuda(tiles, tma, s, d):
    # Each autotuner candidate, with descriptor (TMA) and pointer loads, on ragged blocks and on
    # whole blocks with a padded head dim: the autotuner may pick any of them on another GPU.
    _compare(1, 3, s, s, d, 128, 0.5, torch.bfloat16, "bshd", device="cuda", tiles=tiles, tma=tma)


# ------------------------------------------------------------------------------------ Gluon kernel (Hopper)


def _gluon():
    try:
        from stepfuse.attention import gluon_kernel
    except ImportError:  # a Triton without Gluon's Hopper language
        pytest.skip("this Triton has no Gluon for Hopper")
    return gluon_kernel


def _gluon_configs():
    try:
        from stepfuse.attention.gluon_kernel import CONFIGS
    except ImportError:
        return []
    return list(CONFIGS)


def _gluon_choices(mask_block=128):
    """Every (kernel, configuration) the dispatcher may pick for masks of ``mask_block``-token blocks."""
    try:
        from stepfuse.attention.gluon_kernel import candidates
    except ImportError:
        return []
    return candidates(mask_block)


def compile_gluon_for_hopper(config, d=128, even=True, dtype="bf16", mask_block=128, kind="overlap"):
    """A Gluon kernel (``kind``: overlap or pingpong) compiled ahead of time for sm_90, with the
    specialisation contiguous inputs get at run time (unit index strides as constants, the other
    integers divisible by 16)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    gluon_kernel = _gluon()
    if kind == "overlap":
        fn = gluon_kernel.block_sparse_fwd
        block_m, block_n, warps, stages = config
        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages)
    else:  # a program's 128 queries come as two 64-row halves, one per consumer warpgroup
        fn = gluon_kernel.block_sparse_fwd_ws
        (block_n, stages), block_m, warps = config, 64, 4
        tiles = dict(BLOCK_N=block_n, STAGES=stages)

    def descriptor(rows):  # the descriptors gluon_kernel.descriptors builds
        return f"tensordesc<{dtype}[1, 1, {rows}, {d}],{gluon_kernel._tile_layout(rows, d, dtype == 'bf16')!r}>"

    signature = dict(q_desc=descriptor(block_m), k_desc=descriptor(block_n), v_desc=descriptor(block_n),
                     O=f"*{dtype}", KV_NUM="*i32", KV_IDX="*i32", qk_scale="fp32")
    constants = dict(MASK_BLOCK=mask_block, HEAD_DIM=d, EVEN_KV=even, **tiles, snm=1, sik=1)
    return _compile_for_sm90(GluonASTSource, fn, signature, constants, ("q_desc", "k_desc", "v_desc", "qk_scale"),
                             num_warps=warps)


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, which the interpreter replaces")
@pytest.mark.parametrize("d,even", [(128, True), (128, False), (64, True)])
@pytest.mark.parametrize("config", _gluon_configs())
def test_gluon_configuration_compiles_for_hopper(config, d, even):
    # Each Gluon candidate down to an sm_90 binary: the tile copies go through the bulk copy engine,
    # and the scores of one tile are awaited while the previous tile's product is still in flight
    # (a wait leaving one warpgroup MMA group outstanding), in shared memory an H100 block has.
    compiled = compile_gluon_for_hopper(config, d, even)
    ptx = compiled.asm["ptx"]
    assert compiled.asm["cubin"] and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert "wgmma.wait_group.sync.aligned 1;" in ptx
    assert compiled.metadata.shared <= 227 * 1024


def _resource_usage(cubin: bytes) -> dict:
    """Registers and local (spill) memory per thread of a cubin, read by the cuobjdump that ships
    with Triton (empty where there is none)."""
    import re
    import tempfile

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL):(\d+)", text)}


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, which the interpreter replaces")
@pytest.mark.parametrize("d,even", [(128, True), (128, False), (64, True)])
@pytest.mark.parametrize("config", [c for kind, c in _gluon_choices() if kind == "pingpong"])
def test_gluon_pingpong_compiles_for_hopper(config, d, even):
    # The warp-specialised kernel down to an sm_90 binary: the partitions resize their register
    # files (setmaxnreg), the consumers' products overlap their softmax, the copies go through the
    # bulk copy engine, and nothing spills, in shared memory an H100 block has.
    compiled = compile_gluon_for_hopper(config, d, even, kind="pingpong")
    ptx = compiled.asm["ptx"]
    for instruction in ("setmaxnreg.inc", "setmaxnreg.dec", "wgmma.mma_async", "cp.async.bulk.tensor",
                        "wgmma.wait_group.sync.aligned 1;", "mbarrier.arrive.shared"):
        assert instruction in ptx, instruction
    assert compiled.metadata.shared <= 227 * 1024
    usage = _resource_usage(compiled.asm["cubin"])
    assert usage.get("LOCAL", 0) == 0, usage


def _mma_operands(ptx: str):
    """(shape, A from registers or shared memory, scale/transpose flags) of each distinct warpgroup
    MMA in ``ptx``, and the shared-memory matrix descriptor constants (swizzle, strides) it uses."""
    import re

    forms = set()
    for m in re.finditer(r"wgmma\.mma_async\.sync\.aligned\.(\S+)\s+\{[^}]*\},\s*(\{[^}]*\}|%rd\d+),\s*%rd\d+,"
                         r"\s*([^;]*);", ptx):
        forms.add((m.group(1), "registers" if m.group(2).startswith("{") else "shared",
                   re.sub(r"%p\d+", "p", m.group(3))))
    return sorted(forms), sorted(set(re.findall(r"\b(\d{15,})\b", ptx)))


@pytest.mark.skipif(INTERPRETED, reason="compiles the kernel, which the interpreter replaces")
@pytest.mark.parametrize("gluon_config,triton_tiles,d", [((128, 64, 4, 2), (128, 64, 4, 3), 128),
                                                          ((128, 128, 8, 2), (128, 128, 8, 2), 128),
                                                          ((64, 64, 4, 2), (64, 64, 4, 3), 64)])
def test_gluon_operands_match_the_triton_kernel(gluon_config, triton_tiles, d):
    # The Gluon kernel lays out its tiles by hand; the Triton kernel (checked on GPUs) lets the
    # compiler choose.  Their warpgroup MMAs must read the same operands the same way: the same
    # instruction shapes, scores from shared memory and probabilities from registers, the same
    # transposes and the same shared-memory matrix descriptors (swizzle mode and strides).
    if gluon_config not in _gluon_configs():
        pytest.skip("not a Gluon candidate")
    gluon = _mma_operands(compile_gluon_for_hopper(gluon_config, d).asm["ptx"])
    reference = _mma_operands(compile_for_hopper(triton_tiles, True, True, d=d).asm["ptx"])
    assert gluon == reference and gluon[0] and gluon[1]


def test_descriptor_readable():
    from stepfuse.attention.triton_kernel import _descriptor_readable

    x = torch.zeros(2, 3, 40, 64, dtype=torch.bfloat16)
    assert _descriptor_readable(x) and _descriptor_readable(x.transpose(1, 2))  # either layout's view
    assert not _descriptor_readable(torch.zeros(2, 3, 40, 60, dtype=torch.bfloat16))  # rows of 120 bytes
    assert not _descriptor_readable(x[..., 1:33])  # base off the 16-byte grid
    assert not _descriptor_readable(x.transpose(2, 3))  # last dim not contiguous
    assert not _descriptor_readable(x[:, :, :0])  # an empty sequence: descriptor sizes must be positive


class _FakeGluon:
    """Stands in for :mod:`stepfuse.attention.gluon_kernel`: records launches, writes a marker."""

    def __init__(self):
        self.launches = []

    @staticmethod
    def candidates(block):
        return [("overlap", c) for c in ((128, 64, 4, 2), (64, 64, 4, 2)) if max(c[:2]) <= block] + \
            ([("pingpong", (128, 2))] if block >= 128 else [])

    def run(self, choice, q, k, v, out, num, idx, qk_scale, block):
        self.launches.append(choice)
        out.fill_(7.0)


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs fixed tiles")
def test_gluon_dispatch(monkeypatch, recording_driver):
    # Where it is enabled and the call suits it, the Gluon kernel runs only if it was measured
    # faster than the Triton kernel for the key, measured once per key; elsewhere the Triton kernel runs.
    import stepfuse.attention
    from stepfuse.attention import triton_kernel

    fake, timed = _FakeGluon(), []
    monkeypatch.setitem(sys.modules, "stepfuse.attention.gluon_kernel", fake)
    monkeypatch.setattr(stepfuse.attention, "gluon_kernel", fake, raising=False)
    monkeypatch.setattr(triton_kernel, "_GLUON_TUNED", {})
    monkeypatch.setattr(triton_kernel, "_tma_views", lambda k, v, layout: [t if layout == "bhsd" else t.transpose(1, 2)
                                                                            for t in (k, v)])
    monkeypatch.setattr(triton_kernel, "_capability", lambda index: (9, 0))
    triton_calls = []
    monkeypatch.setattr(triton_kernel, "_kernel", lambda block, tuned: _Recorder(triton_calls))

    def fastest(candidates):
        timed.append(sorted(map(str, candidates)))
        return ("overlap", (64, 64, 4, 2)) if len(timed) == 1 else "triton"

    monkeypatch.setattr(triton_kernel, "_fastest", fastest)

    def call(d=64, dtype=torch.float16, block=64, s=128, layout="bshd", tiles=None):
        q, k, v = _inputs(1, 2, s, s, d, dtype, layout)
        num, idx = random_blocks(1, 2, -(-s // block), -(-s // block), 1.0)
        return block_sparse_attention_triton(q, k, v, num, idx, block_size=block, layout=layout, tiles=tiles,
                                             check_indices=False)

    call()
    assert not fake.launches and len(triton_calls) == 1  # not enabled
    monkeypatch.setenv("STEPFUSE_ATTENTION_GLUON", "1")
    assert torch.all(call() == 7) and torch.all(call() == 7)  # tuned once, then the choice is kept
    assert timed == [["('overlap', (64, 64, 4, 2))", "triton"]]  # 128-row tiles do not divide blocks of 64
    assert fake.launches == [("overlap", (64, 64, 4, 2))] * 2
    call(s=256, block=128)  # a new key, where the Triton kernel measured faster; every candidate timed
    assert timed[1] == ["('overlap', (128, 64, 4, 2))", "('overlap', (64, 64, 4, 2))", "('pingpong', (128, 2))",
                        "triton"]
    assert fake.launches == [("overlap", (64, 64, 4, 2))] * 2 and len(triton_calls) == 2
    for case in (dict(d=96), dict(dtype=torch.float32), dict(block=32), dict(tiles=(64, 64, 4, 2))):
        call(**case)  # head dim, dtype, block size or fixed tiles the Gluon kernel does not take
    assert len(timed) == 2 and len(fake.launches) == 2 and len(triton_calls) == 6
    monkeypatch.setattr(triton_kernel, "_capability", lambda index: (10, 0))
    call(s=384)  # not a Hopper GPU
    assert len(timed) == 2 and len(triton_calls) == 7


class _Recorder:
    """Stands in for the Triton kernel: ``kernel[grid](...)`` records the call."""

    def __init__(self, calls):
        self.calls = calls
        self.best_config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)
        self.fn = self

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append(kwargs)


def test_fastest_skips_candidates_that_do_not_fit(monkeypatch):
    import triton.testing
    from triton.runtime.errors import OutOfResources

    from stepfuse.attention.triton_kernel import _fastest

    def too_big():
        raise OutOfResources(300_000, 232_448, "shared memory")

    times = {"a": 2.0, "b": 1.0, "c": 0.5}
    monkeypatch.setattr(triton.testing, "do_bench", lambda run, **kw: run() or times[run.name])
    candidates = {}
    for name in times:
        run = (lambda: None) if name != "c" else too_big
        run.name = name
        candidates[name] = run
    assert _fastest(candidates) == "b"  # c would be fastest but does not fit the GPU


def _gluon_attention(choice, module=None):
    """``attention(...)`` for :func:`_compare` running the Gluon kernel and configuration ``choice``
    (from ``module``, stepfuse.attention.gluon_kernel by default)."""
    def run(q, k, v, num, idx, block, layout):
        gluon_kernel = module or _gluon()
        views = [t if layout == "bhsd" else t.transpose(1, 2) for t in (q, k, v)]
        out = torch.full_like(q, float("nan"))  # an output the kernel does not write stays NaN
        gluon_kernel.run(choice, *views, out if layout == "bhsd" else out.transpose(1, 2), num, idx,
                         q.shape[-1] ** -0.5 * 1.4426950408889634, block)
        return out

    return run


def _emulate(monkeypatch, module, schedule="lazy", seed=0):
    """``module``'s kernel launches run by the CPU emulator of :mod:`stepfuse.testing.gluon`."""
    import functools

    from stepfuse.testing import gluon as emulator

    monkeypatch.setattr(module, "launch_compiled", functools.partial(emulator.launcher, schedule=schedule, seed=seed))
    return emulator


# Warp-specialised partitions are run in several orders: each partition as far as it can (lazy),
# a released partition at once (eager), and random switches.
SCHEDULES = [("lazy", 0), ("eager", 0), ("random", 1), ("random", 2)]


EMULATED_CASES = [
    (torch.float16, 64, "bhsd", 300, 300, 0.5, 128),  # ragged sequences, partial last blocks
    (torch.bfloat16, 128, "bshd", 200, 333, 0.6, 128),  # fewer queries than keys, strided layout
    (torch.float16, 128, "bshd", 512, 512, 1.0, 128),  # whole blocks (no key masking), every block kept
    (torch.bfloat16, 64, "bhsd", 190, 130, 0.4, 64),  # mask blocks of 64
]


@pytest.mark.parametrize("choice,schedule,seed,dtype,d,layout,s_q,s_kv,density,block", [
    (choice, *schedule, *case) for case in EMULATED_CASES for choice in _gluon_choices(case[-1])
    for schedule in (SCHEDULES if choice[0] == "pingpong" else SCHEDULES[:1])])  # one partition: one order
def test_gluon_kernel_emulated(monkeypatch, choice, schedule, seed, dtype, d, layout, s_q, s_kv, density, block):
    # Every kernel and configuration the dispatcher may pick, run on the CPU with its TMA ring,
    # mbarrier phases, asynchronous MMAs and partitions checked for hazards; query blocks with no
    # key block must come out zero.
    _emulate(monkeypatch, _gluon(), schedule, seed)
    _compare(1, 2, s_q, s_kv, d, block, density, dtype, layout, attention=_gluon_attention(choice), empty_rows=True)


def _planted(tmp_path, function: str, old: str, new: str):
    """stepfuse.attention.gluon_kernel as a new module, with ``old`` replaced by ``new`` in the
    source of its function ``function``."""
    import importlib.util
    import inspect

    gluon_kernel = _gluon()
    source = Path(gluon_kernel.__file__).read_text()
    body = inspect.getsource(getattr(gluon_kernel, function).fn)
    assert body.count(old) == 1, f"{function} changed: update the planted bug"
    path = tmp_path / "planted_gluon_kernel.py"
    path.write_text(source.replace(body, body.replace(old, new)))
    spec = importlib.util.spec_from_file_location(f"stepfuse.attention.planted_{tmp_path.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Each bug, planted in a kernel's source, is one the emulator must report:
# (function, what the kernel does, the bug, the report, the kernel and configuration, the schedule)
OVERLAP, PINGPONG = ("overlap", (128, 64, 4, 2)), ("pingpong", (64, 3))
GLUON_BUGS = {
    "copy over a value tile an MMA still reads": (
        "block_sparse_fwd", "\n        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])",
        "\n        _issue_tile(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, b, h, next_start, j - 1 + STAGES, n, "
        "STAGES)\n        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])",
        "MMA still in flight reads", OVERLAP, "lazy"),
    "MMA on a value tile before waiting for its copy": (
        "block_sparse_fwd", "mbarrier.wait(v_bars.index(prev), ((j - 1) // STAGES) & 1)", "pass",
        "before this partition waited on its mbarrier", OVERLAP, "lazy"),
    "output accumulator read with its MMA in flight": (
        "block_sparse_fwd", "\n        acc, p = warpgroup_mma_wait(num_outstanding=0,",
        "\n        acc, p = warpgroup_mma_wait(num_outstanding=1,", "may still be in flight", OVERLAP, "lazy"),
    "wrong mbarrier phase": (
        "block_sparse_fwd", "mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)",
        "mbarrier.wait(k_bars.index(slot), (j // STAGES + 1) & 1)", "never returns", OVERLAP, "lazy"),
    "one row past the end stored": (
        "_store_rows", "mask=(rows < S_Q)[:, None]", "mask=(rows <= S_Q)[:, None]",
        "written twice|outside the tensor", OVERLAP, "lazy"),
    "ping-pong: value slot released before its product is retired": (
        "_ws_consumer", "        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])\n"
        "        mbarrier.arrive(v_empty.index(prev))\n",
        "        mbarrier.arrive(v_empty.index(prev))\n"
        "        acc, p = warpgroup_mma_wait(num_outstanding=0, deps=[acc_tok, p])\n",
        "MMA still in flight reads", PINGPONG, "eager"),
    "ping-pong: producer refills a value slot before its release": (
        "_ws_producer", "        mbarrier.wait(v_empty.index(slot), released, pred=reuse)\n", "",
        "before this partition waited on its mbarrier", PINGPONG, "lazy"),
    "ping-pong: key tile read without waiting for its copy": (
        "_ws_consumer", "        mbarrier.wait(k_full.index(slot), (j // STAGES) & 1)\n", "",
        "before this partition waited on its mbarrier", PINGPONG, "lazy"),
    "ping-pong: a slot freed by one consumer": (
        "block_sparse_fwd_ws", "mbarrier.init(k_empty.index(s), count=2)", "mbarrier.init(k_empty.index(s), count=1)",
        "deadlock", PINGPONG, "lazy"),
    "ping-pong: turn not handed over": (
        "_ws_consumer", "acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)\n"
        "        mbarrier.arrive(turns.index(1 - C))\n",
        "acc_tok = warpgroup_mma(p, v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)\n",
        "deadlock", PINGPONG, "lazy"),
}


@pytest.mark.parametrize("bug", sorted(GLUON_BUGS))
def test_gluon_emulator_finds_planted_bugs(tmp_path, monkeypatch, bug):
    function, old, new, report, choice, schedule = GLUON_BUGS[bug]
    module = _planted(tmp_path, function, old, new)
    emulator = _emulate(monkeypatch, module, schedule)
    # 8 key blocks per row: more tiles than ring slots, so slots are reused
    with pytest.raises(emulator.GluonHazard, match=report):
        _compare(1, 2, 300, 1024, 64, 128, 1.0, torch.float16, "bhsd", attention=_gluon_attention(choice, module))


def test_planted_kernels_pass_without_a_bug(tmp_path, monkeypatch):
    # The control: planting itself changes nothing, so a module planted with no edit passes.
    module = _planted(tmp_path, "_ws_consumer", "busy = n > 0", "busy = n > 0")
    _emulate(monkeypatch, module, "eager")
    for choice in (OVERLAP, PINGPONG):
        _compare(1, 2, 300, 1024, 64, 128, 1.0, torch.float16, "bhsd", attention=_gluon_attention(choice, module))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("s_q,s_kv,density", [(1000, 1000, 0.3), (777, 1290, 0.6), (1024, 1024, 1.0)])
@pytest.mark.parametrize("choice", _gluon_choices(), ids=str)
def test_gluon_kernel_on_cuda(choice, layout, dtype, d, s_q, s_kv, density):
    # ragged and whole blocks, both layouts, query blocks with no key block (zero output)
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("warpgroup MMA: Hopper only")
    _compare(2, 3, s_q, s_kv, d, 128, density, dtype, layout, device="cuda", attention=_gluon_attention(choice),
             empty_rows=True)
    if choice in _gluon_choices(64):
        _compare(1, 2, s_q, s_kv, d, 64, density, dtype, layout, device="cuda", attention=_gluon_attention(choice))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gluon_dispatch_on_cuda(monkeypatch, layout):
    # enabled: whichever kernel the measurement picks, the wrapper's result is right, negative scale included
    monkeypatch.setenv("STEPFUSE_ATTENTION_GLUON", "1")
    _compare(1, 4, 2048, 2048, 128, 128, 0.3, torch.bfloat16, layout, device="cuda", seed=5)
    q, k, v = _inputs(1, 2, 1024, 1024, 64, torch.float16, layout, "cuda", seed=6)
    num, idx = random_blocks(1, 2, 8, 8, 0.5, seed=6, device="cuda")
    got = block_sparse_attention_triton(q, k, v, num, idx, block_size=128, layout=layout, scale=-0.2)
    want = ref.block_sparse_attention(q.double(), k.double(), v.double(), num, idx, 128, layout=layout, scale=-0.2)
    assert (got.double() - want).abs().max() < 2e-2


# --------------------------------------------------------------------------------------------- block scores

from stepfuse.attention import block_scores_triton  # noqa: E402

# The scores are fp32 from the same (exactly representable) inputs in every dtype, so one tolerance.
SCORE_TOL = 1e-5


def _compare_scores(b, h, s_q, s_kv, d, block, dtype, layout, device="cpu", seed=0):
    q, k, _ = _inputs(b, h, s_q, s_kv, d, dtype, layout, device, seed)
    got = block_scores_triton(q, k, block, layout=layout)
    want = ref.block_scores(q, k, block, layout=layout)
    assert got.dtype == torch.float32 and got.shape == (b, h, -(-s_q // block), -(-s_kv // block))
    torch.testing.assert_close(got, want, rtol=SCORE_TOL, atol=SCORE_TOL)


SCORE_CASES = [(layout, dtype, s_q, s_kv, d, block) for layout in ("bhsd", "bshd") for dtype in ("float32", "float16")
               # square, ragged lengths with an odd head dim, and 150 key blocks (two softmax chunks)
               for s_q, s_kv, d, block in ((48, 48, 16, 16), (17, 33, 24, 16), (9, 600, 16, 4))]


def run_interpreted_score_cases():
    for layout, dtype, s_q, s_kv, d, block in SCORE_CASES:
        try:
            _compare_scores(1, 2, s_q, s_kv, d, block, getattr(torch, dtype), layout)
        except AssertionError as e:
            raise AssertionError(f"layout={layout} dtype={dtype} s_q={s_q} s_kv={s_kv} d={d} block={block}: {e}")


@NEEDS_INTERPRETER
def test_interpreted_block_scores_match_reference():
    _interpreted("run_interpreted_score_cases()")


@pytest.mark.parametrize("case,error,match", [
    (dict(layout="sbhd"), ValueError, "layout"),
    (dict(k_dtype=torch.float16), TypeError, "one dtype"),
    (dict(q_dtype=torch.float64), TypeError, "float16"),
    (dict(block=0), ValueError, "block_size"),
    (dict(k_heads=3), ValueError, "differ"),
    (dict(q_dim=3), ValueError, "4-D"),
])
def test_block_scores_bad_input(case, error, match):
    q, k, _ = _inputs(1, 2, 32, 32, 16, case.get("q_dtype", torch.float32), "bhsd")
    k = k.to(case.get("k_dtype", q.dtype))
    if "k_heads" in case:
        k = torch.randn(1, case["k_heads"], 32, 16, dtype=q.dtype)
    if "q_dim" in case:
        q = q[0]
    with pytest.raises(error, match=match):
        block_scores_triton(q, k, case.get("block", 16), layout=case.get("layout", "bhsd"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,block", [(64, 64), (128, 128), (72, 64)])
@pytest.mark.parametrize("s_q,s_kv", [(1000, 1000), (777, 12900), (4096, 4096)])
def test_block_scores_on_cuda(layout, dtype, d, block, s_q, s_kv):
    _compare_scores(2, 3, s_q, s_kv, d, block, dtype, layout, device="cuda")
