"""The fused solver-step op against its PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import stepfuse  # noqa: F401
from stepfuse import ops, ref
from stepfuse.ref.philox import philox_blocks, philox_normal
from stepfuse.solvers.program import OUTPUT, StepProgram
from stepfuse.testing.devices import device_params
from stepfuse.testing.tolerances import assert_close_to_reference

DEVICES = device_params()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Awkward sizes: odd, prime, not a multiple of any vector width, batch 1 and > 1.
SHAPES = [(1,), (7,), (2, 3, 5), (1, 4, 17, 13), (3, 4, 64, 64), (2, 4099)]


def dpm2_program(order_slots: int = 2) -> StepProgram:
    """A realistic program: convert eps to x0 into a ring slot, then a 2nd-order update plus noise."""
    return StepProgram.build(
        order_slots,
        [
            (1, {"x": 1.25, "out": -0.75}),
            (OUTPUT, {"x": 0.8, 1: 0.45, 0: -0.12, "noise": 0.05}),
        ],
    )


def heun_like_program() -> StepProgram:
    """Reads a slot after it was written earlier in the same step, and saves the sample."""
    return StepProgram.build(
        3,
        [
            (0, {"x": 1.0}),
            (1, {"x": 0.3, "out": -0.4}),
            (2, {1: 2.0, 2: 0.5}),
            (OUTPUT, {0: 1.0, 2: -0.25, "out": 0.1}),
        ],
    )


def wide_program() -> StepProgram:
    """More than four slots (the wide kernel variant), a re-read slot and noise."""
    return StepProgram.build(
        6,
        [
            (5, {"x": 0.7, "out": 0.2, 4: 0.1}),
            (2, {5: 0.5, 0: 0.25, 3: -0.125}),
            (OUTPUT, {"x": 0.5, 1: 0.1, 2: 0.2, 4: -0.3, 5: 0.05, "noise": 0.01}),
        ],
    )


def make_operands(shape, dtype, device, slots, history_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    out = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    history = torch.randn((slots, *shape), generator=g).to(device=device, dtype=history_dtype or dtype)
    noise = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    return x, out, history, noise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("program_fn", [dpm2_program, heun_like_program, wide_program])
def test_solver_step_matches_reference(device, dtype, shape, program_fn):
    program = program_fn()
    x, out, history, noise = make_operands(shape, dtype, device, program.num_slots)
    hist64, hist_low = history.double(), history.clone()
    expected = ref.solver_step(x.double(), out.double(), hist64, program.coeffs_list, program.targets_list,
                               noise.double(), compute_dtype=torch.float64)
    got = ops.solver_step(x, out, history, program, noise)
    # The reference run in the working dtype measures that dtype's own error.
    low = ref.solver_step(x, out, hist_low, program.coeffs_list, program.targets_list, noise, compute_dtype=dtype)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close_to_reference(got, expected, low)
    for s in range(program.num_slots):
        assert_close_to_reference(history[s], hist64[s], hist_low[s])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_history_slots_written_like_reference(device, dtype):
    program = heun_like_program()
    x, out, history, noise = make_operands((2, 3, 9, 7), dtype, device, program.num_slots, seed=3)
    expected_hist = history.clone()
    ref.solver_step(x, out, expected_hist, program.coeffs_list, program.targets_list, noise)
    ops.solver_step(x, out, history, program, noise)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(history.float(), expected_hist.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_history_with_low_precision_sample(device, dtype):
    program = dpm2_program()
    x, out, history, noise = make_operands((3, 5, 11), dtype, device, program.num_slots, history_dtype=torch.float32)
    expected_hist = history.clone()
    expected = ref.solver_step(x, out, expected_hist, program.coeffs_list, program.targets_list, noise)
    got = ops.solver_step(x, out, history, program, noise)
    assert history.dtype == torch.float32
    torch.testing.assert_close(history, expected_hist, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    program = heun_like_program()
    base = torch.randn(4, 6, 10, device=device)
    x = base.transpose(1, 2)  # non-contiguous view
    out = torch.randn(4, 10, 6, device=device)[:, :, :]
    out = out.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    history = torch.randn(10, 6, 3, 4, device=device).permute(2, 3, 0, 1)  # [3, 4, 10, 6], non-contiguous
    assert not x.is_contiguous() and not history.is_contiguous()
    noise = torch.randn(4, 10, 6, device=device)
    expected_hist = history.clone()
    expected = ref.solver_step(x, out, expected_hist, program.coeffs_list, program.targets_list, noise)
    got = ops.solver_step(x, out, history, program, noise)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(history, expected_hist, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("numel", [1, 3, 4, 5, 8, 1001, 4096])
@pytest.mark.parametrize("offset", [0, 7, 2**33 + 5])
def test_philox_noise_matches_reference(device, numel, offset):
    program = StepProgram.build(0, [(OUTPUT, {"noise": 1.0})])
    x = torch.zeros(numel, device=device)
    empty = x.new_empty((0, numel))
    got = ops.solver_step(x, x, empty, program, None, seed=1234567891234, offset=offset)
    expected = philox_normal(numel, 1234567891234, offset).float()
    torch.testing.assert_close(got.cpu(), expected, rtol=2e-5, atol=2e-5)


def test_philox_noise_statistics_and_offsets():
    z = philox_normal(200_000, seed=7, offset=0)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    # Consecutive draws advanced by philox_blocks never overlap.
    a = philox_normal(10, seed=7, offset=0)
    b = philox_normal(10, seed=7, offset=philox_blocks(10))
    assert not torch.allclose(a, b)
    torch.testing.assert_close(philox_normal(12, 7, 3)[:4], philox_normal(4, 7, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensor(device):
    program = dpm2_program()
    x = torch.empty(0, 4, device=device)
    history = torch.empty(2, 0, 4, device=device)
    assert ops.solver_step(x, x, history, program, x).shape == (0, 4)


def test_opcheck():
    program = heun_like_program()
    for dtype in DTYPES:
        x, out, history, noise = make_operands((2, 3, 8), dtype, "cpu", program.num_slots)
        args = (x, out, history, program.coeffs_list, program.targets_list, noise, 0, 0)
        torch.library.opcheck(torch.ops.stepfuse.solver_step.default, args)
    noisy = StepProgram.build(1, [(0, {"out": 1.0}), (OUTPUT, {"x": 0.5, 0: 0.5, "noise": 0.1})])
    x, out, history, _ = make_operands((5, 7), torch.float32, "cpu", 1)
    torch.library.opcheck(
        torch.ops.stepfuse.solver_step.default, (x, out, history, noisy.coeffs_list, noisy.targets_list, None, 3, 9)
    )


def test_compile_fullgraph_sampling_loop():
    """A whole multistep loop on the op traces into one graph."""
    programs = [
        StepProgram.build(2, [(i % 2, {"x": 1.0 / (1 + 0.1 * i), "out": -0.2}), (OUTPUT, {"x": 0.9, i % 2: 0.3, (i + 1) % 2: -0.05})])
        for i in range(6)
    ]

    def denoiser(x):
        return torch.tanh(x) * 0.5

    def loop(x, history):
        for p in programs:
            x = torch.ops.stepfuse.solver_step(x, denoiser(x), history, p.coeffs_list, p.targets_list, None, 0, 0)
        return x

    x0 = torch.randn(2, 4, 8, 8)
    h_eager, h_comp = torch.zeros(2, *x0.shape), torch.zeros(2, *x0.shape)
    expected = loop(x0, h_eager)
    torch._dynamo.reset()
    compiled = torch.compile(loop, fullgraph=True, backend="aot_eager")
    got = compiled(x0, h_comp)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(h_comp, h_eager)


# -- bad input ---------------------------------------------------------------------------------
def _call(x, out, history, coeffs, targets, noise=None, seed=0, offset=0):
    return torch.ops.stepfuse.solver_step(x, out, history, coeffs, targets, noise, seed, offset)


GOOD = dpm2_program()


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(out=torch.randn(2, 6)), ValueError, "model_output must have shape"),
        (lambda a: a.update(out=torch.randn(2, 5, dtype=torch.float64)), TypeError, "model_output must have dtype"),
        (lambda a: a.update(out=torch.randn(2, 5, device="meta")), ValueError, "model_output must be on"),
        (lambda a: a.update(history=torch.zeros(2, 2, 6)), ValueError, "history must have shape"),
        (lambda a: a.update(history=torch.zeros(2, 2, 5, dtype=torch.float64)), TypeError, "history dtype"),
        (lambda a: a.update(noise=torch.randn(3, 5)), ValueError, "noise must have shape"),
        (lambda a: a.update(coeffs=a["coeffs"][:-1]), ValueError, "coeffs must have"),
        (lambda a: a.update(coeffs=[float("nan")] + a["coeffs"][1:]), ValueError, "coeffs must be finite"),
        (lambda a: a.update(targets=[1, 0]), ValueError, "targets"),
        (lambda a: a.update(targets=[5, -1]), ValueError, "targets"),
        (lambda a: a.update(offset=-1), ValueError, "offset"),
        (lambda a: a.update(x=torch.randn(2, 5).int(), out=torch.randn(2, 5).int(), noise=None,
                            history=torch.zeros(2, 2, 5).int()), TypeError, "dtype"),
    ],
)
def test_bad_input(mutate, exc, match):
    args = dict(x=torch.randn(2, 5), out=torch.randn(2, 5), history=torch.zeros(2, 2, 5),
                coeffs=list(GOOD.coeffs_list), targets=list(GOOD.targets_list), noise=torch.randn(2, 5), offset=0)
    mutate(args)
    with pytest.raises(exc, match=match):
        _call(args["x"], args["out"], args["history"], args["coeffs"], args["targets"], args["noise"], 0, args["offset"])


def test_program_validation():
    with pytest.raises(ValueError, match="targets must end"):
        StepProgram(1, (0,), (0.0,) * 4)
    with pytest.raises(ValueError, match="finite"):
        StepProgram.build(0, [(OUTPUT, {"x": float("inf")})])
    with pytest.raises(ValueError, match="operand key"):
        StepProgram.build(1, [(OUTPUT, {3: 1.0})])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_captures_whole_sampling_loop():
    """A multistep loop with in-kernel Philox noise replays as one CUDA graph, equal to eager."""
    programs = [
        StepProgram.build(2, [(i % 2, {"x": 1.0 + 0.01 * i, "out": -0.2}),
                              (OUTPUT, {"x": 0.9, i % 2: 0.3, (i + 1) % 2: -0.05, "noise": 0.02})])
        for i in range(8)
    ]

    def loop(x, history):
        for i, p in enumerate(programs):
            x = ops.solver_step(x, torch.tanh(x), history, p, None, seed=11, offset=i * philox_blocks(x.numel()))
        return x

    x0 = torch.randn(2, 4, 32, 32, device="cuda")
    h_eager = torch.zeros(2, *x0.shape, device="cuda")
    expected = loop(x0.clone(), h_eager)
    static_x, h_graph = x0.clone(), torch.zeros_like(h_eager)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        loop(static_x.clone(), h_graph.clone())  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_x, h_graph)
    h_graph.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, expected)
    torch.testing.assert_close(h_graph, h_eager)
