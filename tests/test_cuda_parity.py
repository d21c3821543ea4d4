"""The CUDA kernels: every drop-in scheduler against diffusers' own on the GPU, and fused guidance
(guidance_stats, guided_step) against the CPU kernels and the float64 reference."""

from __future__ import annotations

import diffusers
import pytest
import torch

import stepfuse.schedulers as sf
from stepfuse import ops, ref
from stepfuse.guidance import APG, CFG, CFGZeroStar, DualCFG, prepare_guided
from stepfuse.solvers.program import OUTPUT, StepProgram
from stepfuse.testing.parity import assert_scheduler_parity
from stepfuse.testing.tolerances import assert_close_to_reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [
    ("DPMSolverMultistepScheduler", {}, None),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 7),
    ("UniPCMultistepScheduler", {"solver_order": 3}, None),
    ("EulerDiscreteScheduler", {}, None),
    ("EulerAncestralDiscreteScheduler", {}, 7),
    ("HeunDiscreteScheduler", {}, None),
    ("DDIMScheduler", {}, None),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, None),
    ("DEISMultistepScheduler", {"solver_order": 3}, None),
]


@pytest.mark.parametrize("name, config, seed", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_on_cuda(name, config, seed, dtype):
    assert_scheduler_parity(getattr(sf, name), getattr(diffusers, name), config, 12, shape=(2, 4, 32, 32),
                            dtype=dtype, seed=seed, device="cuda")


# -- fused guidance: the CUDA kernels against the CPU kernels and the float64 reference ----------
GUIDED_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Batch 1 and > 1; per-sample sizes that are odd (scalar kernel), a multiple of 4 (vector
# kernel), and 45 with a total of 180 (vectors would straddle samples: scalar kernel).
# Not tiny: guidance_rescale's std over a handful of elements is too ill-conditioned to compare.
GUIDED_SHAPES = [(3, 5, 7), (3, 4, 9, 9), (1, 4, 16, 16), (4, 3, 5, 3), (2, 3, 11)]
# Data prediction p * x + q * output of the step (target="denoised"), as an eps-prediction step.
CONVERSION = (1.25, -0.75)
GUIDANCES = [
    CFG(guidance_scale=5.0),
    CFG(guidance_scale=4.0, guidance_rescale=0.7),
    CFGZeroStar(guidance_scale=4.0),
    CFGZeroStar(guidance_scale=3.0, use_original_formulation=True),
    APG(guidance_scale=6.0, eta=0.3, norm_threshold=2.0),
    APG(guidance_scale=5.0, norm_threshold=2.0, momentum=-0.5),
    DualCFG(guidance_scale=5.0, image_guidance_scale=1.5),
    CFG(guidance_scale=5.0, guidance_rescale=0.5, target="denoised"),
    APG(guidance_scale=4.0, norm_threshold=3.0, momentum=0.3, guidance_rescale=0.5, target="denoised"),
]
# A second-order step with a history write and explicit noise.
GUIDED_PROGRAM = StepProgram.build(2, [(1, {"x": 1.25, "out": -0.75}),
                                       (OUTPUT, {"x": 0.8, 1: 0.45, 0: -0.12, "noise": 0.05})])
# guidance_stats accumulates in fp32 per thread: its error is a few fp32 ulps of the
# sums of magnitudes, whatever the operands' dtype.
STATS_RTOL = 2.0**-16


def _guided_inputs(guidance, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    branches = [torch.randn(shape, generator=g).to(dtype) for _ in range(guidance.num_branches)]
    momentum = torch.randn(shape, generator=g) if guidance.uses_momentum else None
    history = torch.randn((GUIDED_PROGRAM.num_slots, *shape), generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    return x, branches, momentum, history, noise


def _guided_run(guidance, device, x, branches, momentum, history, noise):
    """guided_step on copies of the inputs on `device`: (next sample, history, momentum)."""
    def to(t):
        return None if t is None else t.clone().to(device)

    x, branches, momentum, history, noise = to(x), [to(b) for b in branches], to(momentum), to(history), to(noise)
    guided = prepare_guided(guidance, x, branches, momentum, CONVERSION)
    out = ops.guided_step(x, guided.branches, guided.stats, guided.momentum, guided.rule, history, GUIDED_PROGRAM,
                          noise)
    return out, history, momentum


@pytest.mark.parametrize("guidance", GUIDANCES, ids=repr)
@pytest.mark.parametrize("dtype", GUIDED_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GUIDED_SHAPES, ids=str)
def test_guided_step_on_cuda(guidance, dtype, shape):
    x, branches, momentum, history, noise = _guided_inputs(guidance, shape, dtype)
    m64 = None if momentum is None else momentum.double()
    h64 = history.double()
    expected = ref.guided_step(x.double(), [b.double() for b in branches], None, m64, guidance.rule(CONVERSION), h64,
                               GUIDED_PROGRAM.coeffs_list, GUIDED_PROGRAM.targets_list, noise.double())
    got, got_hist, got_m = _guided_run(guidance, "cuda", x, branches, momentum, history, noise)
    cpu, cpu_hist, cpu_m = _guided_run(guidance, "cpu", x, branches, momentum, history, noise)
    # The CPU kernel, in the same dtype, is the yardstick of the error the dtype allows.
    assert got.dtype == dtype and got.shape == x.shape
    assert_close_to_reference(got.cpu(), expected, cpu)
    for s in range(GUIDED_PROGRAM.num_slots):
        assert_close_to_reference(got_hist[s].cpu(), h64[s], cpu_hist[s])
    if momentum is not None:
        assert got_m.dtype == torch.float32
        assert_close_to_reference(got_m.cpu(), m64, cpu_m)


def test_guided_step_misaligned_operands_on_cuda():
    """Branches and momentum at odd element offsets take the scalar kernel."""
    guidance = APG(guidance_scale=5.0, norm_threshold=2.0, momentum=-0.5)
    shape = (2, 4, 8, 8)
    x, branches, momentum, history, noise = _guided_inputs(guidance, shape, torch.float16, seed=1)
    n = x.numel()

    def shifted(t):
        buf = torch.empty(n + 1, dtype=t.dtype, device="cuda")
        view = buf[1:].view(shape)
        view.copy_(t)
        return view

    cb, cm = [shifted(b) for b in branches], shifted(momentum)
    ch = history.cuda()
    guided = prepare_guided(guidance, x.cuda(), cb, cm, CONVERSION)
    got = ops.guided_step(x.cuda(), guided.branches, guided.stats, guided.momentum, guided.rule, ch, GUIDED_PROGRAM,
                          noise.cuda())
    cpu, cpu_hist, cpu_m = _guided_run(guidance, "cpu", x, branches, momentum, history, noise)
    torch.testing.assert_close(got.cpu(), cpu, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ch.cpu(), cpu_hist, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(cm.cpu(), cpu_m, rtol=1e-5, atol=1e-5)


STATS_CASES = [(dtype, float_last) for dtype in GUIDED_DTYPES
               for float_last in ((False,) if dtype == torch.float32 else (False, True))]


@pytest.mark.parametrize("dtype, float_last", STATS_CASES, ids=str)
@pytest.mark.parametrize("shape", GUIDED_SHAPES + [(2, 70001)], ids=str)  # the last: many blocks per sample
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_guidance_stats_on_cuda(dtype, float_last, shape, n):
    g = torch.Generator().manual_seed(n)
    operands = [torch.randn(shape, generator=g).to(dtype) + 0.5 for _ in range(n)]
    if float_last:  # the APG momentum buffer, float32 beside 16-bit branches
        operands[-1] = operands[-1].float()
    expected = ref.guidance_stats(operands)
    magnitude = ref.guidance_stats([t.abs() for t in operands])
    got = ops.guidance_stats([t.cuda() for t in operands])
    cpu = ops.guidance_stats(operands)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    assert ((got.cpu() - expected).abs() <= STATS_RTOL * magnitude).all(), (got.cpu() - expected).abs().max()
    assert ((cpu - expected).abs() <= STATS_RTOL * magnitude).all()


def test_guided_step_replays_under_cuda_graph():
    """Statistics, weights and step all run on the device: a captured step replays with new data."""
    guidance = APG(guidance_scale=5.0, norm_threshold=2.0, momentum=-0.5, guidance_rescale=0.5, target="denoised")
    shape = (3, 4, 9, 9)
    x, branches, momentum, history, noise = (
        t.cuda() if isinstance(t, torch.Tensor) else [b.cuda() for b in t]
        for t in _guided_inputs(guidance, shape, torch.float32, seed=2))

    def step(m, h):
        guided = prepare_guided(guidance, x, branches, m, CONVERSION)
        return ops.guided_step(x, guided.branches, guided.stats, guided.momentum, guided.rule, h, GUIDED_PROGRAM,
                               noise)

    step(momentum.clone(), history.clone())  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(momentum, history)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        for b in branches:
            b.copy_(torch.randn(shape, generator=g))
        # Eager from the current state; the replay then advances momentum and history in place.
        m_eager, h_eager = momentum.clone(), history.clone()
        expected = step(m_eager, h_eager)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(momentum, m_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(history, h_eager, rtol=1e-5, atol=1e-5)
