"""CPU sparse block attention kernels (``torch.ops.stepfuse.block_sparse_attention`` and
``attention_block_scores``) against their float64 references (stepfuse.ref.attention)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stepfuse import ops
from stepfuse.ref import attention as ref
from stepfuse.testing.tolerances import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
F32_ATOL = 2e-5
SCORES_ATOL = 1e-5
# (head dim, block size, S_q, S_kv): equal and unequal lengths, multiples of the block and not.
GEOMETRIES = [(64, 64, 192, 192), (128, 64, 150, 97), (64, 32, 70, 130), (128, 128, 130, 300), (16, 16, 33, 47),
              (32, 128, 100, 64), (48, 32, 90, 70), (80, 64, 130, 150), (96, 16, 40, 50), (112, 64, 64, 129)]


def randn(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def qkv(b, h, s_q, s_kv, d, dtype=torch.float32, layout="bhsd", seed=0):
    """q, k, v in ``layout`` (each a contiguous tensor of that layout)."""
    q, k, v = (randn((b, h, s, d), dtype, seed + i) for i, s in enumerate((s_q, s_kv, s_kv)))
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return q, k, v


def random_mask(b, h, q_blocks, kv_blocks, seed=0, max_blocks=None, empty_rows=True):
    """Distinct random key blocks per row; unused slots hold junk (negative and out of range)."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max_blocks or kv_blocks
    counts = torch.randint(0 if empty_rows else 1, min(max_blocks, kv_blocks) + 1, (b, h, q_blocks), generator=g)
    indices = torch.randint(-5, kv_blocks + 1000, (b, h, q_blocks, max_blocks), generator=g)
    for row, n in zip(indices.view(-1, max_blocks), counts.view(-1)):
        row[:n] = torch.randperm(kv_blocks, generator=g)[:n]
    return counts.int(), indices.int()


def full_mask(b, h, q_blocks, kv_blocks):
    indices = torch.arange(kv_blocks, dtype=torch.int32).expand(b, h, q_blocks, kv_blocks).contiguous()
    return torch.full((b, h, q_blocks), kv_blocks, dtype=torch.int32), indices


def blocks(s, block_size):
    return -(-s // block_size)


def dense_sdpa(q, k, v, counts, indices, block_size, layout):
    """SDPA with the boolean mask the block description stands for (rows seeing nothing -> 0)."""
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = ref.block_mask_to_dense(counts, indices, block_size, q.shape[2], k.shape[2])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).nan_to_num(0.0)
    out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.transpose(1, 2) if layout == "bshd" else out


# -- block_sparse_attention -----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "d{}-bs{}-q{}-kv{}".format(*g))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_sparse_attention_matches_reference(dtype, geometry, layout):
    d, bs, s_q, s_kv = geometry
    q, k, v = qkv(2, 3, s_q, s_kv, d, dtype, layout, seed=d + bs)
    counts, indices = random_mask(2, 3, blocks(s_q, bs), blocks(s_kv, bs), seed=s_q)
    got = ops.block_sparse_attention(q, k, v, counts, indices, bs, layout=layout)
    assert got.dtype == dtype and got.shape == q.shape and got.is_contiguous()
    expected = ref.block_sparse_attention(q.double(), k.double(), v.double(), counts, indices, bs, 1 / math.sqrt(d),
                                          layout)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, atol=F32_ATOL, rtol=0)
    else:  # at most twice the error of dense SDPA in the same dtype
        assert_close_to_reference(got, expected, dense_sdpa(q, k, v, counts, indices, bs, layout))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_block_sparse_attention_non_contiguous(layout):
    d, bs, s_q, s_kv = 64, 32, 90, 75
    base = randn((2, 3, s_q, d + 32), seed=1)[..., 5:5 + d]  # head dim contiguous, sequence stride d + 32
    q = base if layout == "bhsd" else base.transpose(1, 2)
    k = randn((2, 3, d, s_kv), seed=2).transpose(-1, -2)  # head dim strided: the op makes it contiguous
    v = randn((s_kv, 2, 3, d), seed=3).permute(1, 2, 0, 3)
    if layout == "bshd":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    counts, indices = random_mask(2, 3, blocks(s_q, bs), blocks(s_kv, bs), seed=4)
    # Non-contiguous masks are read through their strides too.
    counts = counts.transpose(0, 1).contiguous().transpose(0, 1)
    indices = torch.cat([indices, torch.full_like(indices, -3)], -1)[..., :indices.shape[-1]]
    assert not (counts.is_contiguous() or indices.is_contiguous())
    got = ops.block_sparse_attention(q, k, v, counts, indices, bs, scale=0.3, layout=layout)
    expected = ref.block_sparse_attention(q.double(), k.double(), v.double(), counts, indices, bs, 0.3, layout)
    torch.testing.assert_close(got.double(), expected, atol=F32_ATOL, rtol=0)
    assert got.is_contiguous() and got.shape == q.shape


def test_block_sparse_attention_empty_rows_give_zero():
    q, k, v = qkv(1, 2, 100, 80, 64, seed=5)
    counts, indices = random_mask(1, 2, 4, 3, seed=6, max_blocks=5)
    counts[0, 0, 1] = 0
    counts[0, 1, 3] = 0  # the partial last query block
    got = ops.block_sparse_attention(q, k, v, counts, indices, 32)
    assert (got[0, 0, 32:64] == 0).all() and (got[0, 1, 96:] == 0).all()
    none = ops.block_sparse_attention(q, k, v, torch.zeros_like(counts), indices, 32)
    assert (none == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,bs,s_q,s_kv", [(64, 64, 256, 200), (128, 32, 100, 300)])
def test_block_sparse_attention_full_density_equals_sdpa(dtype, d, bs, s_q, s_kv):
    q, k, v = qkv(1, 2, s_q, s_kv, d, dtype, seed=7)
    counts, indices = full_mask(1, 2, blocks(s_q, bs), blocks(s_kv, bs))
    got = ops.block_sparse_attention(q, k, v, counts, indices, bs)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    if dtype == torch.float32:
        torch.testing.assert_close(got, sdpa, atol=F32_ATOL, rtol=0)
    else:
        expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert_close_to_reference(got, expected, sdpa)


def test_block_sparse_attention_deterministic_across_threads():
    q, k, v = qkv(2, 4, 300, 260, 64, seed=8)
    counts, indices = random_mask(2, 4, blocks(300, 64), blocks(260, 64), seed=9)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            runs.append(ops.block_sparse_attention(q, k, v, counts, indices, 64))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0], r) for r in runs[1:])


# -- block_scores ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "d{}-bs{}-q{}-kv{}".format(*g))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_scores_matches_reference(dtype, geometry, layout):
    d, bs, s_q, s_kv = geometry
    q, k, _ = qkv(2, 3, s_q, s_kv, d, dtype, layout, seed=d)
    got = ops.block_scores(q, k, bs, layout=layout)
    expected = ref.block_scores(q, k, bs, None, layout)  # float64 inside, from the same inputs
    assert got.dtype == torch.float32 and got.shape == (2, 3, blocks(s_q, bs), blocks(s_kv, bs))
    torch.testing.assert_close(got, expected, atol=SCORES_ATOL, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), atol=1e-5, rtol=0)


def test_block_scores_non_contiguous():
    q = randn((2, 3, 64, 100), seed=10).transpose(-1, -2)  # head dim strided
    k = randn((2, 3, 90, 96), seed=11)[..., 16:80]  # sequence stride 96
    got = ops.block_scores(q, k, 16, scale=0.2)
    torch.testing.assert_close(got, ref.block_scores(q, k, 16, 0.2), atol=SCORES_ATOL, rtol=0)


# -- opcheck and torch.compile --------------------------------------------------------------------
def opcheck_cases():
    q, k, v = qkv(1, 2, 40, 50, 16, seed=12)
    counts, indices = random_mask(1, 2, blocks(40, 16), blocks(50, 16), seed=13)
    qs, ks, vs = qkv(1, 2, 40, 50, 32, torch.bfloat16, "bshd", seed=14)
    return {
        "attention-bhsd": (torch.ops.stepfuse.block_sparse_attention, (q, k, v, counts, indices, 16, 0.25, False)),
        "attention-bshd": (torch.ops.stepfuse.block_sparse_attention,
                           (qs, ks, vs, counts, indices, 16, 0.25, True)),
        "scores-bhsd": (torch.ops.stepfuse.attention_block_scores, (q, k, 16, 0.25, False)),
        "scores-bshd": (torch.ops.stepfuse.attention_block_scores, (qs, ks, 16, 0.25, True)),
    }


@pytest.mark.parametrize("name", list(opcheck_cases()))
def test_opcheck(name):
    op, args = opcheck_cases()[name]
    torch.library.opcheck(op.default, args)


def sparse_layer(q, k, v, counts, indices):
    """Scores, then attention over a fixed mask, then a dense epilogue: one graph."""
    scores = ops.block_scores(q, k, block_size=32)
    out = ops.block_sparse_attention(q, k, v, counts, indices, block_size=32)
    return out * 2.0 + scores.sum(), scores


def test_compile_fullgraph():
    q, k, v = qkv(1, 2, 70, 60, 32, seed=15)
    counts, indices = random_mask(1, 2, blocks(70, 32), blocks(60, 32), seed=16)
    compiled = torch.compile(sparse_layer, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(q, k, v, counts, indices), sparse_layer(q, k, v, counts, indices)):
        torch.testing.assert_close(got, expected)


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name", list(opcheck_cases()))
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA)])
def test_opcheck_on_cuda(name, device):
    # the Triton kernels registered as the ops' CUDA kernels: strides and values as the fakes say
    op, args = opcheck_cases()[name]
    torch.library.opcheck(op.default, tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("backend", [pytest.param("aot_eager", marks=CUDA), pytest.param("inductor", marks=CUDA)])
def test_compile_fullgraph_on_cuda(backend):
    # traced, the CUDA path is the op with its fake (no graph break), with the mask checked on the device
    q, k, v = (t.cuda() for t in qkv(1, 2, 70, 60, 32, seed=15))
    counts, indices = (t.cuda() for t in random_mask(1, 2, blocks(70, 32), blocks(60, 32), seed=16))
    compiled = torch.compile(sparse_layer, fullgraph=True, backend=backend)
    for got, expected in zip(compiled(q, k, v, counts, indices), sparse_layer(q, k, v, counts, indices)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# -- bad input ------------------------------------------------------------------------------------
def _bad_cases():
    q, k, v = qkv(1, 2, 40, 50, 16, seed=17)
    counts, indices = random_mask(1, 2, 3, 4, seed=18, empty_rows=False)

    def attention(**kw):
        args = dict(q=q, k=k, v=v, kv_num_blocks=counts, kv_indices=indices, block_size=16)
        args.update(kw)
        return lambda: ops.block_sparse_attention(**args)

    def with_value(t, pos, value):
        t = t.clone()
        t[pos] = value
        return t

    q5 = randn((1, 2, 40, 24), seed=19)
    return {
        "index out of range": (attention(kv_indices=with_value(indices, (0, 1, 2, 0), 4)), ValueError, "kv_indices"),
        "negative index": (attention(kv_indices=with_value(indices, (0, 0, 0, 0), -1)), ValueError, "kv_indices"),
        "repeated index": (attention(kv_num_blocks=with_value(counts, (0, 0, 0), 2),
                                     kv_indices=with_value(with_value(indices, (0, 0, 0, 0), 1), (0, 0, 0, 1), 1)),
                           ValueError, "distinct"),
        "negative count": (attention(kv_num_blocks=with_value(counts, (0, 0, 1), -1)), ValueError, "kv_num_blocks"),
        "count above max_blocks": (attention(kv_num_blocks=with_value(counts, (0, 1, 0), 5)), ValueError,
                                   "kv_num_blocks"),
        "kv_num_blocks shape": (attention(kv_num_blocks=counts[..., :2]), ValueError, "kv_num_blocks"),
        "kv_num_blocks dtype": (attention(kv_num_blocks=counts.long()), TypeError, "kv_num_blocks"),
        "kv_indices dtype": (attention(kv_indices=indices.long()), TypeError, "kv_indices"),
        "kv_indices shape": (attention(kv_indices=indices[0]), ValueError, "kv_indices"),
        "q/k head mismatch": (attention(q=randn((1, 3, 40, 16))), ValueError, "k must match q"),
        "k/v shape mismatch": (attention(v=v[:, :, :30]), ValueError, "v must have the shape of k"),
        "3-D q": (attention(q=q[0]), ValueError, "q must be 4-D"),
        "head dim": (attention(q=q5, k=q5, v=q5, kv_num_blocks=counts, kv_indices=indices % 3), ValueError,
                     "head dim"),
        "block size": (attention(block_size=24), ValueError, "block_size"),
        "block size bool": (attention(block_size=True), TypeError, "block_size"),
        "block size float": (attention(block_size=16.0), TypeError, "block_size"),
        "scale tensor": (attention(scale=torch.tensor(0.5)), TypeError, "scale"),
        "scale nan": (attention(scale=float("nan")), ValueError, "scale"),
        "mixed dtypes": (attention(k=k.half()), TypeError, "k must have dtype"),
        "integer q": (attention(q=q.int()), TypeError, "q must be float32"),
        "layout": (attention(layout="bsdh"), ValueError, "layout"),
        "layout type": (attention(layout=1), TypeError, "layout"),
        "scores layout": (lambda: ops.block_scores(q, k, 16, layout="BHSD"), ValueError, "layout"),
        "scores head dim": (lambda: ops.block_scores(q5, q5, 16), ValueError, "head dim"),
        "scores block size": (lambda: ops.block_scores(q, k, 8), ValueError, "block_size"),
        "scores mixed dtypes": (lambda: ops.block_scores(q, k.bfloat16()), TypeError, "k must have dtype"),
        "scores k shape": (lambda: ops.block_scores(q, k[:, :1]), ValueError, "k must match q"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_bad_input(name):
    call, error, message = _bad_cases()[name]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("name", ["kv_num_blocks shape", "kv_indices dtype", "head dim", "k/v shape mismatch",
                                  "mixed dtypes", "block size"])
def test_bad_input_fake(name):
    """The fakes raise what the kernel raises, so traced code fails the same way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    call, error, message = _bad_cases()[name]
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(error, match=message):
        call()
