"""Feature-cache kernels (``torch.ops.stepfuse.cache_*``) against their PyTorch reference
(stepfuse.ref.cache), on the CPU and, marked ``cuda``, on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

from stepfuse import ops
from stepfuse.ref import cache as ref
from stepfuse.testing.devices import device_params
from stepfuse.testing.tolerances import EPS

DEVICES = device_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Batch 1 and 3; odd, one-element and power-of-two sample sizes.
SHAPES = [(1, 5), (3, 7, 13), (1, 1), (3, 1), (2, 4, 16, 16), (1, 2, 4099)]
STRIDES = [1, 3, 7]


def on_cuda(test):
    """Marks a GPU-only test ``cuda`` and skips it without a GPU (as DEVICES' cuda param)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def randn(shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype).to(device)


def assert_sums_close(got: torch.Tensor, expected: torch.Tensor, count: int) -> None:
    """fp32 accumulation of ``count`` non-negative terms: a few ulps times sqrt(count) of each sum."""
    assert got.dtype == torch.float32 and got.shape == expected.shape
    bound = 4 * EPS[torch.float32] * math.sqrt(count) * expected.double().abs() + 1e-30
    err = (got.double().cpu() - expected.double().cpu()).abs()
    assert (err <= bound.cpu()).all(), float((err / bound.cpu()).max())


# -- cache_distance -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_distance_matches_reference(dtype, shape, stride, device):
    a = randn(shape, dtype, device, seed=1)
    b = randn(shape, dtype, device, seed=2)
    got = ops.cache_distance(a, b, stride)
    assert got.device == a.device and got.shape == (shape[0], 2)
    per_sample = a[0].numel()
    assert_sums_close(got, ref.cache_distance(a, b, stride), -(-per_sample // stride))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride", [1, 3])
def test_cache_distance_non_contiguous_and_offset(device, stride):
    base_a = randn((3, 9, 7), device=device, seed=3)
    base_b = randn((3, 9, 7), device=device, seed=4)
    a, b = base_a.transpose(1, 2), base_b.transpose(1, 2)
    assert not a.is_contiguous()
    assert_sums_close(ops.cache_distance(a, b, stride), ref.cache_distance(a, b, stride), 63)
    # A storage offset of one element: the CUDA kernel's 16-byte vector path does not apply.
    flat_a, flat_b = randn(3 * 64 + 1, device=device, seed=5), randn(3 * 64 + 1, device=device, seed=6)
    a, b = flat_a[1:].view(3, 64), flat_b[1:].view(3, 64)
    assert_sums_close(ops.cache_distance(a, b, stride), ref.cache_distance(a, b, stride), 64)


@pytest.mark.parametrize("device", DEVICES)
def test_cache_distance_accuracy_on_long_samples(device):
    """Blocked fp32 accumulation: ~1e-6 relative on millions of elements (10^7 on the GPU)."""
    numel = 10_000_000 if device == "cuda" else 2_000_000
    a = randn((1, numel), device=device, seed=7)
    b = a + 0.01 * randn((1, numel), device=device, seed=8)
    got = ops.cache_distance(a, b).double().cpu()
    expected = ref.cache_distance(a, b).double().cpu()  # summed in float64
    assert ((got - expected).abs() / expected).max() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_distance_is_deterministic(device, dtype):
    a = randn((2, 3, 40_000), dtype, device, seed=9)
    b = randn((2, 3, 40_000), dtype, device, seed=10)
    first = ops.cache_distance(a, b)
    for _ in range(3):
        assert torch.equal(ops.cache_distance(a, b), first)


def test_cache_distance_same_bits_for_any_thread_count():
    a, b = randn((2, 300_000), seed=11), randn((2, 300_000), seed=12)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.cache_distance(a, b)
        torch.set_num_threads(max(2, threads))
        many = ops.cache_distance(a, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# -- cache_decide ---------------------------------------------------------------------------------
DECIDE_CONFIGS = {
    "first_block": dict(threshold=0.12),
    "first_block_pooled": dict(threshold=0.12, pooled=True),
    "teacache": dict(poly=[4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01],
                     threshold=0.6, accumulate=True),
    "teacache_bounded": dict(poly=[1.5, 0.02], threshold=0.9, accumulate=True, max_consecutive=2, max_cached=5),
    "consecutive": dict(threshold=0.2, max_consecutive=1),
}


def decide_sequence(device, config, sums_seq, force_at=()):
    """(skips, states) of the kernel and of the reference over the same calls."""
    kernel_state = torch.zeros(4, dtype=torch.float64, device=device)
    ref_state = kernel_state.clone()
    got, expected = [], []
    for i, sums in enumerate(sums_seq):
        force = i in force_at
        got.append((ops.cache_decide(sums, kernel_state, force=force, **config), kernel_state.clone()))
        expected.append((ref.cache_decide(sums, ref_state, force=force, **config), ref_state.clone()))
    return got, expected


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(DECIDE_CONFIGS))
def test_cache_decide_state_machine_matches_reference(name, device):
    g = torch.Generator().manual_seed(13)
    # Relative changes between ~0.01 and ~0.3: both decisions happen.
    base = torch.rand(16, 3, generator=g) * 100 + 50
    rel = torch.rand(16, 3, generator=g) ** 2 * 0.3
    sums_seq = [torch.stack([rel[i] * base[i], base[i]], dim=1).to(device) for i in range(16)]
    got, expected = decide_sequence(device, DECIDE_CONFIGS[name], sums_seq, force_at=(5,))
    skips = [bool(s) for s, _ in got]
    assert skips == [bool(s) for s, _ in expected]
    assert any(skips) and not all(skips)
    assert not skips[5]  # forced
    for (skip, state), (_, ref_state) in zip(got, expected):
        assert skip.dtype == torch.bool and skip.shape == () and skip.device == state.device
        torch.testing.assert_close(state, ref_state, rtol=1e-12, atol=0)


def constant_sums(rel: float, device, batch: int = 1) -> torch.Tensor:
    return torch.tensor([[rel * 10.0, 10.0]] * batch, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config, expected", [
    (dict(threshold=0.5, max_consecutive=2), [True, True, False, True, True, False]),
    (dict(threshold=0.5, max_cached=3), [True, True, True, False, False, False]),
    (dict(threshold=0.25, accumulate=True), [True, True, False, True, True, False]),  # 0.1, 0.2, 0.3 >= 0.25
    (dict(threshold=0.5, poly=[10.0, 0.0]), [False] * 6),  # rescaled: 10 * 0.1 = 1.0
    (dict(threshold=0.5), [True] * 6),
], ids=["max_consecutive", "max_cached", "accumulate", "poly", "plain"])
def test_cache_decide_hand_worked_sequences(config, expected, device):
    state = torch.zeros(4, dtype=torch.float64, device=device)
    sums = constant_sums(0.1, device)
    got = [bool(ops.cache_decide(sums, state, **config)) for _ in expected]
    assert got == expected
    assert float(state[3]) == pytest.approx(0.1, rel=1e-6)
    assert float(state[2]) == sum(expected)


@pytest.mark.parametrize("device", DEVICES)
def test_cache_decide_pooled_versus_max_and_force(device):
    sums = torch.tensor([[1.0, 10.0], [5.0, 10.0]], device=device)  # relative 0.1 and 0.5
    state = torch.zeros(4, dtype=torch.float64, device=device)
    assert bool(ops.cache_decide(sums, state, threshold=0.4, pooled=True))
    assert float(state[3]) == pytest.approx(0.3)  # 6 / 20
    assert not bool(ops.cache_decide(sums, state, threshold=0.4))
    assert float(state[3]) == pytest.approx(0.5) and float(state[1]) == 0.0
    assert not bool(ops.cache_decide(sums, state, threshold=10.0, force=True))
    # An all-zero sample: the denominator floor keeps the metric finite.
    zero = torch.zeros(1, 2, device=device)
    assert bool(ops.cache_decide(zero, state, threshold=1e-3)) and float(state[3]) == 0.0


# -- residual store / apply -----------------------------------------------------------------------
RESIDUAL_SHAPES = [(1, 1), (3, 7, 13), (2, 4, 16, 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES)
@pytest.mark.parametrize("residual_fp32", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_store_and_apply_match_reference(dtype, residual_fp32, shape, device):
    res_dtype = torch.float32 if residual_fp32 else dtype
    output, inp = randn(shape, dtype, device, seed=14), randn(shape, dtype, device, seed=15)
    residual = torch.full(shape, 7.0, dtype=res_dtype, device=device)
    expected = residual.clone()
    ops.residual_store(output, inp, residual)
    ref.cache_residual_store(output, inp, expected)
    assert torch.equal(residual, expected)  # one fp32 subtraction, one rounding: bit-exact
    x = randn(shape, dtype, device, seed=16)
    x_ref = x.clone()
    added = ops.residual_add(x, residual)
    ops.residual_apply(x, residual)
    ref.cache_residual_apply(x_ref, residual)
    assert torch.equal(x, x_ref) and torch.equal(added, x_ref) and added.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_residual_ops_non_contiguous(device):
    output = randn((3, 9, 7), device=device, seed=17).transpose(1, 2)
    inp = randn((3, 9, 7), device=device, seed=18).transpose(1, 2)
    residual = torch.zeros(3, 9, 7, device=device).transpose(1, 2)  # written through a scratch copy
    ops.residual_store(output, inp, residual)
    torch.testing.assert_close(residual, output - inp, rtol=0, atol=0)
    x = randn((3, 9, 7), device=device, seed=19).transpose(1, 2)
    expected = x + residual
    ops.residual_apply(x, residual)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_conversions_of_special_values(dtype, device):
    """Rounding ties, overflow, subnormals, infinities and NaN convert as torch converts them."""
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -2.5, info.max, -info.max, 2 * info.max, info.tiny, info.tiny / 2, info.tiny / 3,
              info.smallest_normal * info.eps, info.smallest_normal * info.eps / 2, math.inf, -math.inf, math.nan,
              1 + info.eps / 2, 1 + 3 * info.eps / 2, 65519.0, 65520.0, 1e-8, -3e-7, 3.0e38]
    wide = torch.tensor(values, dtype=torch.float32, device=device).reshape(1, -1)
    narrow = ops.taylor_predict(wide.unsqueeze(0), 1.0, 1, dtype=dtype)  # fp32 -> dtype (0 + 1 * value)
    torch.testing.assert_close(narrow, wide.to(dtype), rtol=0, atol=0, equal_nan=True)
    back = ops.taylor_predict(narrow.unsqueeze(0), 1.0, 1, dtype=torch.float32)  # dtype -> fp32
    torch.testing.assert_close(back, narrow.float(), rtol=0, atol=0, equal_nan=True)


# -- TaylorSeer update / predict ------------------------------------------------------------------
def taylor_tolerance(dtype):
    return dict(rtol=4 * EPS[dtype], atol=4 * EPS[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", [0, 1, 2, 4])
@pytest.mark.parametrize("factors_fp32", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_taylor_update_and_predict_match_reference(dtype, factors_fp32, order, device):
    shape = (3, 7, 13)
    fac_dtype = torch.float32 if factors_fp32 else dtype
    factors = randn((order + 1, *shape), fac_dtype, device, seed=20)
    factors_ref = factors.clone()
    for valid, (dt, seed) in enumerate([(1.0, 21), (2.0, 22), (-1.5, 23)]):
        feature = randn(shape, dtype, device, seed=seed)
        ops.taylor_update(feature, factors, dt, valid)
        ref.cache_taylor_update(feature, factors_ref, dt, valid)
        torch.testing.assert_close(factors, factors_ref, **taylor_tolerance(fac_dtype))
    for out_dtype in DTYPES:
        for terms in range(1, order + 2):
            start = randn(shape, out_dtype, device, seed=24)
            for accumulate in (False, True):
                out, out_ref = start.clone(), start.clone()
                ops.taylor_predict(factors, 0.7, terms, out, accumulate=accumulate)
                ref.cache_taylor_predict(factors, 0.7, terms, out_ref, accumulate=accumulate)
                torch.testing.assert_close(out, out_ref, **taylor_tolerance(out_dtype))
    allocated = ops.taylor_predict(factors, 0.7, order + 1)
    assert allocated.dtype == fac_dtype and allocated.shape == shape
    assert ops.taylor_predict(factors, 0.7, 1, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_taylor_update_leaves_unfilled_slots(device):
    feature = randn((2, 5), device=device, seed=25)
    factors = torch.full((3, 2, 5), 9.0, device=device)
    ops.taylor_update(feature, factors, 1.0, 0)
    assert torch.equal(factors[0], feature) and (factors[1:] == 9.0).all()
    ops.taylor_update(2 * feature, factors, 0.5, 1)
    torch.testing.assert_close(factors[1], (2 * feature - feature) / 0.5)
    assert (factors[2] == 9.0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("order", [1, 2])
def test_taylor_forecast_over_several_full_steps(order, device):
    """Full steps every ``dt`` steps on a polynomial feature, forecasts in between, by hand.

    Order 1 on a linear feature is exact; order 2 on a quadratic is the backward-difference
    Taylor formula written out: f2 + h D1 + h^2 / 2 D2 with D1 = (f2 - f1) / dt and
    D2 = ((f2 - f1) / dt - (f1 - f0) / dt) / dt.
    """
    c = randn((3, 2, 6), device=device, seed=26).double()
    feature_at = (lambda t: c[0] + c[1] * t) if order == 1 else (lambda t: c[0] + c[1] * t + c[2] * t * t)
    dt, times = 3.0, [0.0, 3.0, 6.0]
    factors = torch.zeros((order + 1, 2, 6), device=device)
    for valid, t in enumerate(times):
        ops.taylor_update(feature_at(t).float(), factors, dt, valid)
    f0, f1, f2 = (feature_at(t) for t in times)
    for h in (1.0, 2.0):
        got = ops.taylor_predict(factors, h, order + 1).double()
        d1 = (f2 - f1) / dt
        if order == 1:
            expected = feature_at(6.0 + h)
            torch.testing.assert_close(got, f2 + h * d1, rtol=1e-5, atol=1e-5)
        else:
            d2 = (d1 - (f1 - f0) / dt) / dt
            expected = f2 + h * d1 + h * h / 2 * d2
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- opcheck and torch.compile --------------------------------------------------------------------
def opcheck_cases(device="cpu"):
    x = randn((2, 3, 5), device=device, seed=27)
    y = randn((2, 3, 5), device=device, seed=28)
    sums = ops.cache_distance(x, y)
    state = torch.zeros(4, dtype=torch.float64, device=device)
    factors = randn((3, 2, 3, 5), device=device, seed=29)
    return {
        "cache_distance": (x, y, 2),
        "cache_decide": (sums, state, [1.0, 0.5], 0.3, True, False, 2, -1, False),
        "cache_residual_store": (x, y, torch.empty_like(x)),
        "cache_residual_apply": (x.clone(), y),
        "cache_taylor_update": (x, factors.clone(), 2.0, 1),
        "cache_taylor_predict": (factors, 0.5, 3, torch.zeros_like(x), True),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(opcheck_cases()))
def test_opcheck(name, device):
    args = opcheck_cases(device)[name]
    torch.library.opcheck(getattr(torch.ops.stepfuse, name).default, args)


def cache_step(a, b, state, x, residual, factors):
    """A cached block step as a policy writes it, with no host sync."""
    sums = ops.cache_distance(a, b, stride=2)
    skip = ops.cache_decide(sums, state, threshold=0.5, accumulate=True, max_consecutive=3)
    fresh = x * 2.0
    ops.residual_store(fresh, x, residual)
    ops.taylor_update(fresh, factors, 1.0, 1)
    forecast = ops.taylor_predict(factors, 0.5, 2)
    return torch.where(skip, ops.residual_add(x, residual), forecast), skip


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def inputs():
        return (randn((2, 4, 6), device=device, seed=30), randn((2, 4, 6), device=device, seed=31),
                torch.zeros(4, dtype=torch.float64, device=device), randn((2, 4, 6), device=device, seed=32),
                torch.zeros(2, 4, 6, device=device), torch.zeros(2, 2, 4, 6, device=device))

    eager_args, compiled_args = inputs(), inputs()
    compiled = torch.compile(cache_step, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        expected = cache_step(*eager_args)
        got = compiled(*compiled_args)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)
        for g, e in zip(compiled_args, eager_args):  # in-place updates happen under compile too
            torch.testing.assert_close(g, e)


# -- bad input ------------------------------------------------------------------------------------
def _bad_cases():
    x = torch.randn(2, 3)
    state = torch.zeros(4, dtype=torch.float64)
    sums = torch.ones(2, 2)
    factors = torch.zeros(2, 2, 3)
    return [
        ("stride", ValueError, lambda: ops.cache_distance(x, x, 0)),
        ("stride", TypeError, lambda: ops.cache_distance(x, x, 1.5)),
        ("b", ValueError, lambda: ops.cache_distance(x, torch.randn(2, 4))),
        ("b", TypeError, lambda: ops.cache_distance(x, x.half())),
        ("a", TypeError, lambda: ops.cache_distance(x.double(), x.double())),
        ("a", ValueError, lambda: ops.cache_distance(torch.randn(0, 3), torch.randn(0, 3))),
        ("a", ValueError, lambda: ops.cache_distance(torch.randn(2, 0), torch.randn(2, 0))),
        ("sums", TypeError, lambda: ops.cache_decide(sums.double(), state, threshold=0.1)),
        ("sums", ValueError, lambda: ops.cache_decide(torch.ones(2, 3), state, threshold=0.1)),
        ("state", TypeError, lambda: ops.cache_decide(sums, state.float(), threshold=0.1)),
        ("state", ValueError, lambda: ops.cache_decide(sums, torch.zeros(3, dtype=torch.float64), threshold=0.1)),
        ("threshold", ValueError, lambda: ops.cache_decide(sums, state, threshold=math.nan)),
        ("threshold", ValueError, lambda: ops.cache_decide(sums, state)),
        ("threshold", TypeError, lambda: ops.cache_decide(sums, state, threshold="high")),
        ("poly", ValueError, lambda: ops.cache_decide(sums, state, poly=[1.0, math.inf], threshold=0.1)),
        ("poly", ValueError, lambda: ops.cache_decide(sums, state, poly=[1.0] * 17, threshold=0.1)),
        ("poly", TypeError, lambda: ops.cache_decide(sums, state, poly=torch.ones(2), threshold=0.1)),
        ("max_consecutive", TypeError, lambda: ops.cache_decide(sums, state, threshold=0.1, max_consecutive=1.5)),
        ("input", TypeError, lambda: ops.residual_store(x, x.half(), x.clone())),
        ("input", ValueError, lambda: ops.residual_store(x, torch.randn(3, 2), x.clone())),
        ("residual", TypeError, lambda: ops.residual_store(x.half(), x.half(), x.bfloat16())),
        ("residual", ValueError, lambda: ops.residual_store(x, x, torch.zeros(6))),
        ("output", TypeError, lambda: ops.residual_store(x.double(), x.double(), x.double())),
        ("x", TypeError, lambda: ops.residual_apply(x.long(), x)),
        ("residual", TypeError, lambda: ops.residual_apply(x.bfloat16(), x.half())),
        ("residual", ValueError, lambda: ops.residual_apply(x, torch.zeros(2, 4))),
        ("feature", TypeError, lambda: ops.taylor_update(x.double(), factors, 1.0, 0)),
        ("factors", ValueError, lambda: ops.taylor_update(x, torch.zeros(2, 3, 2), 1.0, 0)),
        ("factors", ValueError, lambda: ops.taylor_update(x, torch.zeros(6, 2, 3), 1.0, 0)),
        ("factors", TypeError, lambda: ops.taylor_update(x.half(), factors.bfloat16(), 1.0, 0)),
        ("dt", ValueError, lambda: ops.taylor_update(x, factors, 0.0, 0)),
        ("dt", ValueError, lambda: ops.taylor_update(x, factors, math.inf, 0)),
        ("valid", ValueError, lambda: ops.taylor_update(x, factors, 1.0, -1)),
        ("terms", ValueError, lambda: ops.taylor_predict(factors, 1.0, 0)),
        ("terms", ValueError, lambda: ops.taylor_predict(factors, 1.0, 3)),
        ("dt", ValueError, lambda: ops.taylor_predict(factors, math.nan, 1)),
        ("out", ValueError, lambda: ops.taylor_predict(factors, 1.0, 1, torch.zeros(3, 2))),
        ("out", TypeError, lambda: ops.taylor_predict(factors, 1.0, 1, torch.zeros(2, 3, dtype=torch.float64))),
        ("out", ValueError, lambda: ops.taylor_predict(factors, 1.0, 1, accumulate=True)),
        ("factors", ValueError, lambda: ops.taylor_predict(torch.zeros(6, 2), 1.0, 1)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_input_names_argument(index):
    name, error, call = _bad_cases()[index]
    with pytest.raises(error, match=rf"\b{name}\b") as info:
        call()
    assert "cache" in str(info.value) or "taylor" in str(info.value)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_under_fake_tensors(device):
    """The fakes raise what the kernels raise, for traced calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, device=device)
        with pytest.raises(ValueError, match="stride"):
            ops.cache_distance(x, x, 0)
        with pytest.raises(ValueError, match="terms"):
            ops.taylor_predict(torch.empty(2, 2, 3, device=device), 1.0, 3)
        assert ops.cache_distance(x, x).shape == (2, 2)


# -- CUDA only ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096, 3072), (1, 32760, 1536), (2, 4, 64, 64)])
@pytest.mark.parametrize("stride", [1, 4])
@on_cuda
def test_cuda_distance_at_model_shapes_matches_cpu_and_repeats(stride, shape, dtype):
    a = randn(shape, dtype, "cuda", seed=33)
    b = a + (0.05 * randn(shape, dtype, "cuda", seed=34))
    first = ops.cache_distance(a, b, stride)
    for _ in range(3):
        assert torch.equal(ops.cache_distance(a, b, stride), first)  # bit for bit: no atomics
    expected = ref.cache_distance(a, b, stride)
    assert ((first.double() - expected.double()).abs() / expected.double()).max() < 1e-5
    assert_sums_close(first.cpu(), ops.cache_distance(a.cpu(), b.cpu(), stride), a[0].numel() // stride)


@on_cuda
def test_cuda_cache_ops_make_no_host_sync():
    a, b = randn((1, 64, 3072), device="cuda", seed=35), randn((1, 64, 3072), device="cuda", seed=36)
    state = torch.zeros(4, dtype=torch.float64, device="cuda")
    residual = torch.empty_like(a)
    factors = torch.zeros((3, *a.shape), device="cuda")
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for valid in range(3):
            skip = ops.cache_decide(ops.cache_distance(a, b, stride=4), state, poly=[2.0, 0.1], threshold=0.5,
                                    accumulate=True, max_consecutive=2)
            ops.residual_store(b, a, residual)
            ops.residual_apply(a, residual)
            ops.taylor_update(b, factors, 1.0, valid)
            ops.taylor_predict(factors, 0.5, 3, residual)
            a = torch.where(skip, a, b)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


@on_cuda
def test_cuda_graph_captures_decision_loop():
    a, b = randn((2, 4096), device="cuda", seed=37), randn((2, 4096), device="cuda", seed=38)
    state = torch.zeros(4, dtype=torch.float64, device="cuda")
    eager_state = state.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        ops.cache_decide(ops.cache_distance(a, b), state.clone(), threshold=10.0, accumulate=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        skip = ops.cache_decide(ops.cache_distance(a, b), state, threshold=10.0, accumulate=True, max_consecutive=2)
    results = []
    for _ in range(4):
        graph.replay()
        results.append(bool(skip))
    expected = [bool(ops.cache_decide(ops.cache_distance(a, b), eager_state, threshold=10.0, accumulate=True,
                                      max_consecutive=2)) for _ in range(4)]
    assert results == expected
    torch.testing.assert_close(state, eager_state)
