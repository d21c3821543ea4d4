"""Fused guidance: the ops against their reference, the variants against diffusers' guiders,
and the guided sampling loop (stepfuse.sample) against a plain diffusers loop."""

from __future__ import annotations

import inspect
import math
import types
from unittest import mock

import diffusers
import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance as DiffusersAPG
from diffusers.guiders import ClassifierFreeGuidance as DiffusersCFG
from diffusers.guiders import ClassifierFreeZeroStarGuidance as DiffusersCFGZeroStar
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

import stepfuse
import stepfuse.ref.guidance as ref_guidance
import stepfuse.schedulers as sf
from stepfuse import ops, ref
from stepfuse.guidance import APG, CFG, CFGZeroStar, DualCFG, RULE_SIZE, Guidance, guided_output, prepare_guided
from stepfuse.ref.guidance import guided_prediction
from stepfuse.solvers.program import OUTPUT, StepProgram
from stepfuse.testing.tolerances import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Batch 1 and 3; per-sample sizes odd, prime-ish and tiny (3 elements).
SHAPES = [(1, 1, 7, 5), (3, 4, 9, 7), (3, 3, 1, 1)]
LARGE = (2, 4, 64, 64)
DENOISED = (1.3, -0.8)  # a data-prediction conversion p * x + q * out with p != 0, q < 0

# (config, conversion) per variant; norm thresholds small enough that clipping happens.
VARIANTS = {
    "cfg": (CFG(7.5), None),
    "cfg_original": (CFG(3.0, use_original_formulation=True), None),
    "cfg_rescale": (CFG(5.0, guidance_rescale=0.7), None),
    "zero_star": (CFGZeroStar(4.0), None),
    "zero_star_original_rescale": (CFGZeroStar(4.0, use_original_formulation=True, guidance_rescale=0.5), None),
    "apg_threshold": (APG(6.0, eta=0.3, norm_threshold=2.0), None),
    "apg_momentum": (APG(6.0, eta=0.5, norm_threshold=3.0, momentum=-0.5), None),
    "apg_original_noclip": (APG(4.0, eta=0.0, norm_threshold=0.0, use_original_formulation=True), None),
    "dual": (DualCFG(7.0, image_guidance_scale=1.5), None),
    "dual_rescale": (DualCFG(5.0, image_guidance_scale=2.0, guidance_rescale=0.4), None),
    "cfg_denoised": (CFG(5.0, target="denoised"), DENOISED),
    "zero_star_denoised": (CFGZeroStar(3.0, target="denoised", guidance_rescale=0.3), DENOISED),
    "apg_momentum_denoised": (APG(5.0, eta=0.7, norm_threshold=2.5, momentum=0.6, target="denoised"), DENOISED),
}


def rule_of(name: str) -> tuple:
    config, conversion = VARIANTS[name]
    return config, config.rule(conversion) if conversion else config.rule()


def _id(value) -> str:
    """Short test ids: a config's class name, a function's name."""
    if isinstance(value, Guidance):
        return type(value).__name__
    return getattr(value, "__name__", None) or str(value)


def dpm2_program() -> StepProgram:
    """Convert to a data prediction into a slot, second-order update, noise."""
    return StepProgram.build(2, [(1, {"x": 1.25, "out": -0.75}),
                                 (OUTPUT, {"x": 0.8, 1: 0.45, 0: -0.12, "noise": 0.05})])


def heun_like_program() -> StepProgram:
    """Saves the sample, re-reads a slot written in the same step."""
    return StepProgram.build(3, [(0, {"x": 1.0}), (1, {"x": 0.3, "out": -0.4}), (2, {1: 2.0, 2: 0.5}),
                                 (OUTPUT, {0: 1.0, 2: -0.25, "out": 0.1})])


def output_only_program() -> StepProgram:
    return StepProgram.build(0, [(OUTPUT, {"out": 1.0})])


PROGRAMS = [dpm2_program, heun_like_program, output_only_program]


def make_inputs(config, shape, dtype, slots, history_dtype=None, seed=0):
    """Sample, branches (cond correlated with uncond, as real models give), momentum, history, noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    uncond = torch.randn(shape, generator=g)
    branches = [uncond + 0.4 * torch.randn(shape, generator=g), uncond]
    if config.num_branches == 3:
        branches.append(uncond + 0.2 * torch.randn(shape, generator=g))
    momentum = torch.randn(shape, generator=g) if config.uses_momentum else None
    history = torch.randn((slots, *shape), generator=g)
    noise = torch.randn(shape, generator=g)
    return (x.to(dtype), [b.to(dtype) for b in branches], momentum, history.to(history_dtype or dtype),
            noise.to(dtype))


def reference_step(rule, x, branches, momentum, history, program, noise, dtype):
    """The guided step with every formula evaluated in ``dtype`` (float64: the exact reference)."""
    # The reference writes its formulas in float64; evaluating them in the working dtype
    # measures that dtype's own error (DESIGN.md, "Tests and benchmarks").
    in_dtype = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    in_dtype.float64 = dtype
    with mock.patch.object(ref_guidance, "torch", in_dtype):
        g = guided_prediction(rule, x.to(dtype), [b.to(dtype) for b in branches], momentum)
    out = ((g - rule[4] * x.to(dtype)) / rule[5]).to(dtype)
    return ref.solver_step(x.to(dtype), out, history, program.coeffs_list, program.targets_list, noise.to(dtype),
                           compute_dtype=dtype)


def check_guided_step(name, shape, dtype, program, history_dtype=None):
    config, rule = rule_of(name)
    x, branches, momentum, history, noise = make_inputs(config, shape, dtype, program.num_slots, history_dtype)
    # Exact: float64 operands; low: the reference's own computation in the working dtype.
    hist64, hist_low = history.double(), history.clone()
    mom64 = momentum.double() if momentum is not None else None
    mom_low = momentum.clone() if momentum is not None else None
    expected = reference_step(rule, x.double(), [b.double() for b in branches], mom64, hist64, program,
                              noise.double(), torch.float64)
    low = reference_step(rule, x, branches, mom_low, hist_low, program, noise, dtype)
    guided = prepare_guided(config, x, branches, momentum, VARIANTS[name][1] or (0.0, 1.0))
    assert guided.rule == rule
    got = ops.guided_step(x, guided.branches, guided.stats, guided.momentum, guided.rule, history, program, noise)
    assert got.dtype == dtype and got.shape == x.shape
    assert_close_to_reference(got, expected, low)
    for s in range(program.num_slots):
        assert_close_to_reference(history[s], hist64[s], hist_low[s])
    if momentum is not None:
        # The buffer advances in place to the unclipped update d = (v_c - v_u) + beta m.
        assert momentum.dtype == torch.float32
        assert_close_to_reference(momentum, mom64, mom64.float())


# -- the ops against the reference ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", SHAPES + [LARGE])
def test_guidance_stats_matches_reference(dtype, count, shape):
    g = torch.Generator().manual_seed(count)
    operands = [torch.randn(shape, generator=g).to(dtype) for _ in range(count)]
    if count >= 3:  # the APG momentum buffer stays float32 whatever the branches' dtype
        operands[-1] = operands[-1].float()
    got = ops.guidance_stats(operands)
    expected = ref.guidance_stats(operands)
    assert got.dtype == torch.float64 and got.shape == (shape[0], count + count * (count + 1) // 2)
    # Bound: fp32 accumulation over the sample, relative to the sum of |a_i b_j| (or |a_i|).
    flat = [t.reshape(shape[0], -1).double().abs() for t in operands]
    scale = torch.stack([f.sum(1) for f in flat] + [(flat[i] * flat[j]).sum(1) for i in range(count)
                                                    for j in range(i, count)], dim=1)
    numel = flat[0].shape[1]
    assert ((got - expected).abs() <= 4 * 2.0**-24 * math.sqrt(numel) * scale + 1e-12).all(), \
        float(((got - expected).abs() / (scale + 1e-30)).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_guided_step_matches_reference(name, shape, dtype):
    program = PROGRAMS[(list(VARIANTS).index(name) + SHAPES.index(shape)) % len(PROGRAMS)]()
    check_guided_step(name, shape, dtype, program)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["cfg_rescale", "zero_star", "apg_momentum", "dual", "apg_momentum_denoised"])
def test_guided_step_large_shape(name, dtype):
    check_guided_step(name, LARGE, dtype, dpm2_program())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["cfg", "apg_momentum", "zero_star_denoised"])
def test_guided_step_float32_history(name, dtype):
    check_guided_step(name, (3, 4, 9, 7), dtype, heun_like_program(), history_dtype=torch.float32)


def test_guided_step_without_stats_for_plain_cfg():
    """Linear CFG needs no statistics pass: prepare_guided makes none and the op runs without."""
    config, rule = rule_of("cfg")
    x, branches, _, history, noise = make_inputs(config, (3, 4, 9, 7), torch.float32, 2)
    assert prepare_guided(config, x, branches).stats is None
    program = dpm2_program()
    hist_ref = history.clone()
    got = ops.guided_step(x, branches, None, None, rule, history, program, noise)
    expected = ref.guided_step(x, branches, None, None, rule, hist_ref, program.coeffs_list, program.targets_list,
                               noise)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(history, hist_ref, rtol=1e-5, atol=1e-5)


def test_guided_step_non_contiguous_branches():
    config, rule = rule_of("apg_threshold")
    x = torch.randn(3, 9, 7).transpose(1, 2)
    branches = [torch.randn(3, 9, 7).transpose(1, 2), torch.randn(3, 9, 7).transpose(1, 2)]
    assert not branches[0].is_contiguous()
    program = output_only_program()
    empty = x.new_empty((0, *x.shape))
    guided = prepare_guided(config, x, branches)
    got = ops.guided_step(x, branches, guided.stats, None, rule, empty, program)
    expected = guided_prediction(rule, x, branches)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_opcheck():
    program = heun_like_program()
    for name in ["cfg", "zero_star_original_rescale", "apg_momentum", "dual", "apg_momentum_denoised"]:
        config, rule = rule_of(name)
        for dtype in DTYPES:
            x, branches, momentum, history, noise = make_inputs(config, (2, 3, 5), dtype, program.num_slots)
            guided = prepare_guided(config, x, branches, momentum, VARIANTS[name][1] or (0.0, 1.0))
            operands = [x] * int(rule[2]) + branches + ([momentum] if momentum is not None else [])
            torch.library.opcheck(torch.ops.stepfuse.guidance_stats.default, (operands,))
            args = (x, branches, guided.stats, momentum, rule, history, program.coeffs_list, program.targets_list,
                    noise, 0, 0)
            torch.library.opcheck(torch.ops.stepfuse.guided_step.default, args)
    config, rule = rule_of("cfg_rescale")
    x, branches, _, history, _ = make_inputs(config, (5, 7), torch.float32, 1)
    noisy = StepProgram.build(1, [(0, {"out": 1.0}), (OUTPUT, {"x": 0.5, 0: 0.5, "noise": 0.1})])
    stats = ops.guidance_stats(branches)
    torch.library.opcheck(torch.ops.stepfuse.guided_step.default,
                          (x, branches, stats, None, rule, history, noisy.coeffs_list, noisy.targets_list, None, 3, 9))


def test_compile_fullgraph_guided_loop():
    """A few guided steps (statistics pass + fused step) trace into one graph."""
    config, rule = rule_of("apg_momentum")
    programs = [StepProgram.build(1, [(0, {"x": 1.0 + 0.1 * i, "out": -0.3}), (OUTPUT, {"x": 0.9, 0: 0.2})])
                for i in range(3)]

    def loop(x, label, momentum, history):
        for p in programs:
            cond, uncond = torch.tanh(x + label), torch.tanh(x)
            stats = torch.ops.stepfuse.guidance_stats([cond, uncond, momentum])
            x = torch.ops.stepfuse.guided_step(x, [cond, uncond], stats, momentum, rule, history, p.coeffs_list,
                                               p.targets_list, None, 0, 0)
        return x

    x0, label = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 1, 1)
    m_eager, m_comp = torch.zeros_like(x0), torch.zeros_like(x0)
    h_eager, h_comp = torch.zeros(1, *x0.shape), torch.zeros(1, *x0.shape)
    expected = loop(x0, label, m_eager, h_eager)
    torch._dynamo.reset()
    got = torch.compile(loop, fullgraph=True, backend="aot_eager")(x0, label, m_comp, h_comp)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(m_comp, m_eager)
    torch.testing.assert_close(h_comp, h_eager)


def _saturated(g, shape):
    """A saturated region, as late in sampling: the branches' mean far above their spread."""
    return 0.7 + 1e-3 * torch.randn(shape, generator=g), 0.35 + 3e-2 * torch.randn(shape, generator=g)


def _correlated(g, shape):
    """cond within 2 % of uncond, as a real model's branches mostly are."""
    uncond = torch.randn(shape, generator=g)
    return uncond + 0.02 * torch.randn(shape, generator=g), uncond


@pytest.mark.parametrize(
    "config, make_branches",
    [
        (CFG(5.0, guidance_rescale=0.5), _saturated),
        (CFG(7.5, guidance_rescale=0.7), _correlated),
        (APG(7.5, eta=0.0, norm_threshold=0.0), _correlated),
        (APG(7.5, eta=0.0, norm_threshold=0.5), _correlated),
        (CFGZeroStar(7.5), _correlated),
    ],
    ids=["rescale_saturated", "rescale_correlated", "apg_correlated", "apg_threshold_correlated",
         "zero_star_correlated"],
)
def test_data_dependent_weights_accurate_on_ill_conditioned_branches(config, make_branches):
    """The weights of rescale / APG / CFG-Zero* come from inner products such as ||c - u||^2 and
    std(c); where those cancel (correlated or saturated branches, the usual case in sampling)
    the fused result must still be as accurate as the formula evaluated in float32 (what
    diffusers' guiders compute), per DESIGN.md's factor-of-two rule."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 16, 16)
    cond, uncond = make_branches(g, shape)
    x = torch.randn(shape, generator=g)
    rule = config.rule()
    exact = guided_prediction(rule, x.double(), [cond.double(), uncond.double()])
    in_float32 = reference_step(rule, x, [cond, uncond], None, x.new_empty((0, *shape)), output_only_program(), x,
                                torch.float32)
    assert_close_to_reference(guided_output(config, x, [cond, uncond]), exact, in_float32)


# -- the variants against diffusers' guiders --------------------------------------------------
NUM_STEPS = 10


def diffusers_guider(config: Guidance):
    """diffusers' guider with the same options, and its momentum buffer (created as its
    prepare_inputs does at step 0)."""
    common = dict(guidance_scale=config.guidance_scale, guidance_rescale=config.guidance_rescale,
                  use_original_formulation=config.use_original_formulation, start=config.start, stop=config.stop)
    if isinstance(config, APG):
        guider = DiffusersAPG(adaptive_projected_guidance_momentum=config.momentum,
                              adaptive_projected_guidance_rescale=config.norm_threshold, eta=config.eta, **common)
        if config.momentum is not None:
            guider.momentum_buffer = MomentumBuffer(config.momentum)
        return guider, guider._is_apg_enabled
    if isinstance(config, CFGZeroStar):
        guider = DiffusersCFGZeroStar(zero_init_steps=config.zero_init_steps, **common)
        return guider, guider._is_cfg_enabled
    guider = DiffusersCFG(**common)
    return guider, guider._is_cfg_enabled


GUIDER_CASES = {
    "cfg": CFG(7.5),
    "cfg_original_rescale": CFG(3.0, use_original_formulation=True, guidance_rescale=0.7),
    "cfg_interval": CFG(6.0, start=0.2, stop=0.75),
    "zero_star": CFGZeroStar(5.0, zero_init_steps=2),
    "zero_star_original_interval": CFGZeroStar(4.0, use_original_formulation=True, start=0.3, stop=0.9,
                                               zero_init_steps=0),
    "apg": APG(7.0, eta=0.0, norm_threshold=2.0),
    "apg_momentum": APG(6.0, eta=0.4, norm_threshold=3.0, momentum=-0.5),
    "apg_momentum_interval_rescale": APG(6.0, eta=1.0, norm_threshold=4.0, momentum=0.7, guidance_rescale=0.5,
                                         start=0.1, stop=0.8),
    "apg_original_noclip": APG(4.0, norm_threshold=0.0, use_original_formulation=True),
}


@pytest.mark.parametrize("shape", [(1, 1, 7, 5), (3, 4, 9, 7)])
@pytest.mark.parametrize("name", list(GUIDER_CASES))
def test_guided_output_matches_diffusers_guider(name, shape):
    config = GUIDER_CASES[name]
    guider, is_enabled = diffusers_guider(config)
    g = torch.Generator().manual_seed(1)
    momentum = torch.zeros(shape) if config.uses_momentum else None
    for i in range(NUM_STEPS):
        x, uncond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        cond = uncond + 0.5 * torch.randn(shape, generator=g)
        guider.set_state(step=i, num_inference_steps=NUM_STEPS, timestep=torch.tensor(999 - 100 * i))
        assert config.active(i, NUM_STEPS) == is_enabled(), i
        expected = guider.forward(cond, uncond).pred
        if config.zero_step(i):
            assert not expected.abs().max() > 0
            continue
        # Outside the interval: the conditional branch alone (diffusers' rescale of cond
        # against itself is the identity up to rounding).
        got = guided_output(config, x, [cond, uncond], momentum) if config.active(i, NUM_STEPS) else cond
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5, msg=f"step {i}")
        if momentum is not None and config.active(i, NUM_STEPS):
            torch.testing.assert_close(momentum, guider.momentum_buffer.running_average, rtol=2e-5, atol=2e-5)


def test_active_steps_match_diffusers_over_run_lengths():
    for config in (CFG(5.0, start=0.15, stop=0.65), CFG(5.0, start=0.0, stop=0.3), APG(5.0, start=0.5, stop=1.0),
                   CFGZeroStar(5.0, start=0.25, stop=0.75)):
        guider, is_enabled = diffusers_guider(config)
        for n in (1, 3, 7, 20, 33):
            for i in range(n):
                guider.set_state(step=i, num_inference_steps=n, timestep=torch.tensor(0))
                assert config.active(i, n) == is_enabled(), (config, n, i)


def test_sigma_interval_active_steps():
    config = CFG(5.0, sigma_interval=(0.5, 2.0))
    assert [config.active(0, 4, s) for s in (3.0, 2.0, 1.0, 0.5)] == [False, True, True, False]
    with pytest.raises(ValueError, match="sigma"):
        config.active(0, 4)


# -- the guided sampling loop -------------------------------------------------------------------
def label_model(x, t, label):
    """A cheap smooth denoiser whose output depends on the branch's label and on t."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) / 1000.0
    return 0.8 * torch.tanh(0.6 * x + label * (1.0 + t)) - 0.1 * x * t


SHAPE = (2, 3, 6, 5)
COND = {"label": torch.tensor([0.9, -0.6]).reshape(2, 1, 1, 1)}
UNCOND = {"label": torch.zeros(2, 1, 1, 1)}
EXTRA = {"label": torch.tensor([0.4, -0.2]).reshape(2, 1, 1, 1)}
STEPS = 8

SCHEDULERS = {
    "DPMSolverMultistepScheduler": {},
    "UniPCMultistepScheduler": {},
    "EulerDiscreteScheduler": {},
    "FlowMatchEulerDiscreteScheduler": {"shift": 3.0},
}

LOOP_GUIDANCE = {
    "cfg_rescale": CFG(5.0, guidance_rescale=0.3),
    "cfg_original": CFG(2.0, use_original_formulation=True),
    "cfg_interval": CFG(5.0, start=0.25, stop=0.75),
    "zero_star": CFGZeroStar(4.0, zero_init_steps=1),
    "apg_momentum": APG(5.0, eta=0.5, norm_threshold=2.0, momentum=-0.5),
}


def make_scheduler(name, library, steps=STEPS, **config):
    scheduler = getattr(library, name)(**{**SCHEDULERS.get(name, {}), **config})
    scheduler.set_timesteps(steps)
    return scheduler


def start_latents(scheduler, seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma


def plain_loop(scheduler, guide, latents, branch_inputs=(COND, UNCOND)):
    """The loop a diffusers pipeline writes: every branch evaluated, ``guide(i, x, outputs)``
    the step's model output."""
    x = latents
    scale_input = getattr(scheduler, "scale_model_input", lambda x, t: x)  # flow matching has none
    for i, t in enumerate(scheduler.timesteps):
        x_in = scale_input(x, t)
        outputs = [label_model(x_in, t.expand(x.shape[0]), **kw) for kw in branch_inputs]
        x = scheduler.step(guide(i, x, t, outputs), t, x, return_dict=False)[0]
    return x


def guider_fn(config):
    guider, _ = diffusers_guider(config)

    def guide(i, x, t, outputs):
        guider.set_state(step=i, num_inference_steps=STEPS, timestep=t)
        return guider.forward(*outputs).pred

    return guide


@pytest.mark.parametrize("guidance_name", list(LOOP_GUIDANCE))
@pytest.mark.parametrize("scheduler_name", list(SCHEDULERS))
def test_sample_matches_diffusers_loop(scheduler_name, guidance_name):
    config = LOOP_GUIDANCE[guidance_name]
    ours = make_scheduler(scheduler_name, sf)
    theirs = make_scheduler(scheduler_name, diffusers)
    latents = start_latents(ours)
    got = stepfuse.sample(label_model, latents, ours, COND, UNCOND, config)
    expected = plain_loop(theirs, guider_fn(config), latents)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def formula_fn(config, conversion_of):
    """The guided output from the reference formulas; ``conversion_of(scheduler_step, t)`` the
    data-prediction conversion of ``target='denoised'``."""

    def guide(i, x, t, outputs):
        conversion = conversion_of(i) if config.target == "denoised" else (0.0, 1.0)
        rule = config.rule(conversion)
        g = guided_prediction(rule, x, outputs)
        return ((g - rule[4] * x.double()) / rule[5]).float()

    return guide


def vp_conversion(scheduler):
    def conversion(i):
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[i].double())
        return 1.0 / float(alpha_t), -float(sigma_t) / float(alpha_t)  # x0 = (x - sigma_t eps) / alpha_t

    return conversion


def ve_conversion(scheduler):
    return lambda i: (1.0, -float(scheduler.sigmas[i].double()))  # x0 = x - sigma eps (flow: x - sigma v)


@pytest.mark.parametrize(
    "scheduler_name, config, conversion",
    [
        ("DPMSolverMultistepScheduler", DualCFG(5.0, image_guidance_scale=1.8), None),
        ("EulerDiscreteScheduler", DualCFG(4.0, image_guidance_scale=1.2, guidance_rescale=0.5), None),
        ("DPMSolverMultistepScheduler", CFG(5.0, guidance_rescale=0.6, target="denoised"), vp_conversion),
        ("UniPCMultistepScheduler", APG(5.0, norm_threshold=1.5, eta=0.0, target="denoised"), vp_conversion),
        ("EulerDiscreteScheduler", CFGZeroStar(4.0, zero_init_steps=0, target="denoised"), ve_conversion),
        ("FlowMatchEulerDiscreteScheduler", APG(4.0, norm_threshold=1.0, target="denoised"), ve_conversion),
    ],
    ids=_id,
)
def test_sample_matches_reference_formulas(scheduler_name, config, conversion):
    ours = make_scheduler(scheduler_name, sf)
    theirs = make_scheduler(scheduler_name, diffusers)
    latents = start_latents(ours, seed=2)
    branches = (COND, UNCOND, EXTRA) if config.num_branches == 3 else (COND, UNCOND)
    got = stepfuse.sample(label_model, latents, ours, COND, UNCOND, config,
                          extra=EXTRA if config.num_branches == 3 else None)
    guide = formula_fn(config, conversion(theirs) if conversion else None)
    expected = plain_loop(theirs, guide, latents, branches)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("guidance_name", ["cfg_rescale", "zero_star", "apg_momentum"])
def test_fused_and_unfused_paths_agree(guidance_name):
    """The fused guided step equals guided output + the scheduler's own step."""
    config = LOOP_GUIDANCE[guidance_name]
    fused = make_scheduler("DPMSolverMultistepScheduler", sf)
    unfused = make_scheduler("DPMSolverMultistepScheduler", sf)
    unfused.fuses_guidance = lambda: False
    latents = start_latents(fused)
    calls = []
    original = fused.guided_step

    def counting_guided_step(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    fused.guided_step = counting_guided_step
    got = stepfuse.sample(label_model, latents, fused, COND, UNCOND, config)
    assert calls, "the stepfuse scheduler did not take the fused path"
    expected = stepfuse.sample(label_model, latents, unfused, COND, UNCOND, config)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [CFG(5.0, guidance_rescale=0.5), APG(5.0, norm_threshold=2.0, momentum=0.5)],
                         ids=_id)
def test_thresholding_ddim_takes_unfused_path(config):
    """A DDIM with dynamic thresholding cannot fuse guidance: stepfuse guides the output, then
    steps, like diffusers' DDIM with the same thresholding after diffusers' guider."""
    options = dict(thresholding=True, clip_sample=False, sample_max_value=1.5, dynamic_thresholding_ratio=0.9)
    ours = make_scheduler("DDIMScheduler", sf, **options)
    theirs = make_scheduler("DDIMScheduler", diffusers, **options)
    assert not ours.fuses_guidance()
    latents = start_latents(ours, seed=3)
    got = stepfuse.sample(label_model, latents, ours, COND, UNCOND, config)
    expected = plain_loop(theirs, guider_fn(config), latents)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


class CountingModel:
    """Records the batch size of every model call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, label):
        self.batches.append(x.shape[0])
        return label_model(x, t, label)


@pytest.mark.parametrize(
    "config, per_step",
    [
        # branches evaluated at each of the 8 steps (0: no model call)
        (CFG(5.0), [2] * 8),
        (CFG(5.0, start=0.25, stop=0.75), [1, 1, 2, 2, 2, 2, 1, 1]),
        (CFGZeroStar(4.0, zero_init_steps=2), [0, 0] + [2] * 6),
        (APG(5.0, momentum=0.5, norm_threshold=2.0, start=0.5), [1] * 4 + [2] * 4),
        (DualCFG(4.0, image_guidance_scale=1.5, stop=0.5), [3] * 4 + [1] * 4),
        (CFG(1.0), [1] * 8),  # guidance_scale 1: the conditional branch alone
    ],
    ids=_id,
)
def test_batch_branches_and_model_calls(config, per_step):
    results = {}
    for batch_branches in (True, False):
        model = CountingModel()
        scheduler = make_scheduler("DPMSolverMultistepScheduler", sf)
        results[batch_branches] = stepfuse.sample(model, start_latents(scheduler), scheduler, COND, UNCOND, config,
                                                  extra=EXTRA, batch_branches=batch_branches)
        b = SHAPE[0]
        if batch_branches:
            expected = [n * b for n in per_step if n]
        else:
            expected = [b for n in per_step for _ in range(n)]
        assert model.batches == expected
    torch.testing.assert_close(results[True], results[False], rtol=1e-5, atol=1e-5)


def test_sigma_interval_skips_unconditional_calls():
    scheduler = make_scheduler("EulerDiscreteScheduler", sf)
    sigmas = scheduler.sigmas[:STEPS].double()
    lo, hi = float(sigmas[5]), float(sigmas[2])  # steps 2, 3, 4 have lo < sigma <= hi
    model = CountingModel()
    config = CFG(5.0, sigma_interval=(lo, hi))
    got = stepfuse.sample(model, start_latents(scheduler), scheduler, COND, UNCOND, config)
    b = SHAPE[0]
    assert model.batches == [b, b, 2 * b, 2 * b, 2 * b, b, b, b]
    theirs = make_scheduler("EulerDiscreteScheduler", diffusers)
    cfg = guider_fn(CFG(5.0))
    expected = plain_loop(theirs, lambda i, x, t, out: cfg(i, x, t, out) if 2 <= i <= 4 else out[0],
                          start_latents(scheduler))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_callback_every_step_and_replacement():
    scheduler = make_scheduler("UniPCMultistepScheduler", sf)
    latents = start_latents(scheduler)
    seen = []

    def record(i, t, x):
        seen.append((i, t, x.clone()))

    plain = stepfuse.sample(label_model, latents, scheduler, COND, UNCOND, CFG(5.0), callback=record)
    assert [s[0] for s in seen] == list(range(STEPS))
    assert [float(s[1]) for s in seen] == [float(t) for t in scheduler.timesteps]
    torch.testing.assert_close(seen[-1][2], plain)

    halved = []

    def halve_at_3(i, t, x):
        halved.append(x.clone())
        return x * 0.5 if i == 3 else None

    replaced = stepfuse.sample(label_model, latents, make_scheduler("UniPCMultistepScheduler", sf), COND, UNCOND,
                               CFG(5.0), callback=halve_at_3)
    # Up to the replacement the runs agree; after it the loop continues from the new latents.
    torch.testing.assert_close(halved[3], seen[3][2])
    assert not torch.allclose(halved[4], seen[4][2]) and not torch.allclose(replaced, plain)
    last = stepfuse.sample(label_model, latents, make_scheduler("UniPCMultistepScheduler", sf), COND, UNCOND,
                           CFG(5.0), callback=lambda i, t, x: torch.zeros_like(x) if i == STEPS - 1 else None)
    assert not last.abs().max() > 0


@pytest.mark.parametrize("config", [CFG(5.0, guidance_rescale=0.5), APG(5.0, momentum=0.5, norm_threshold=2.0),
                                    CFGZeroStar(4.0)], ids=_id)
def test_sampling_loop_makes_no_host_sync(config):
    from test_no_sync import NoSyncMode

    scheduler = make_scheduler("DPMSolverMultistepScheduler", sf)
    scheduler.set_begin_index(0)
    sampler = stepfuse.solvers.sampler.Sampler(scheduler, config)
    latents = start_latents(scheduler)
    sampler._host_sigmas(scheduler.timesteps)  # the per-schedule host read happens once, before the run
    with NoSyncMode() as mode:
        sampler(label_model, latents, COND, UNCOND)
    assert "guided_step" in mode.ops


@pytest.mark.parametrize("progress", [True, {"desc": "run", "leave": False}, {"disable": True}], ids=str)
def test_progress_bar_runs(progress, capsys):
    scheduler = make_scheduler("FlowMatchEulerDiscreteScheduler", sf)
    latents = start_latents(scheduler)
    got = stepfuse.sample(label_model, latents, scheduler, COND, UNCOND, CFG(4.0), progress=progress)
    expected = stepfuse.sample(label_model, latents, make_scheduler("FlowMatchEulerDiscreteScheduler", sf), COND,
                               UNCOND, CFG(4.0))
    torch.testing.assert_close(got, expected)
    shown = capsys.readouterr().err
    assert ("run" in shown) == (progress == {"desc": "run", "leave": False})
    assert (shown == "") == (progress == {"disable": True})


def test_progress_must_be_bool_or_options():
    with pytest.raises(TypeError, match="progress"):
        stepfuse.Sampler(make_scheduler("FlowMatchEulerDiscreteScheduler", sf), progress="yes")


# -- bad input ---------------------------------------------------------------------------------
def _guided_args(name="cfg_rescale", shape=(2, 3, 5)):
    config, rule = rule_of(name)
    x, branches, momentum, history, noise = make_inputs(config, shape, torch.float32, 1)
    guided = prepare_guided(config, x, branches, momentum, VARIANTS[name][1] or (0.0, 1.0))
    program = StepProgram.build(1, [(0, {"out": 1.0}), (OUTPUT, {"x": 0.5, 0: 0.5})])
    return dict(x=x, branches=branches, stats=guided.stats, momentum=momentum, rule=rule, history=history,
                program=program, noise=noise)


def _run_guided(a):
    return ops.guided_step(a["x"], a["branches"], a["stats"], a["momentum"], a["rule"], a["history"], a["program"],
                           a["noise"])


@pytest.mark.parametrize(
    "name, mutate, exc, match",
    [
        ("cfg_rescale", lambda a: a["branches"].__setitem__(1, torch.randn(2, 3, 6)), ValueError, "branches\\[1\\]"),
        ("cfg_rescale", lambda a: a["branches"].__setitem__(0, torch.randn(2, 3, 5).half()), TypeError,
         "branches\\[0\\]"),
        ("cfg_rescale", lambda a: a["branches"].__setitem__(0, torch.randn(2, 3, 5, device="meta")), ValueError,
         "branches\\[0\\]"),
        ("cfg_rescale", lambda a: a.update(branches=a["branches"][:1]), ValueError, "branches"),
        ("dual", lambda a: a.update(branches=a["branches"][:2]), ValueError, "branches"),
        ("cfg_rescale", lambda a: a.update(stats=None), ValueError, "stats"),
        ("cfg_rescale", lambda a: a.update(stats=a["stats"][:, :-1].contiguous()), ValueError, "stats"),
        ("cfg_rescale", lambda a: a.update(stats=a["stats"][:1].contiguous()), ValueError, "stats"),
        ("cfg_rescale", lambda a: a.update(stats=a["stats"].float()), ValueError, "stats"),
        ("apg_momentum", lambda a: a.update(momentum=None), ValueError, "momentum"),
        ("apg_momentum", lambda a: a.update(momentum=a["momentum"].half()), TypeError, "momentum"),
        ("apg_momentum", lambda a: a.update(momentum=torch.zeros(2, 3, 4)), ValueError, "momentum"),
        ("apg_momentum", lambda a: a.update(momentum=torch.zeros(2, 5, 3).transpose(1, 2)), ValueError, "momentum"),
        ("cfg_rescale", lambda a: a.update(rule=a["rule"][:-1]), ValueError, "rule"),
        ("cfg_rescale", lambda a: a.update(rule=a["rule"] + [0.0]), ValueError, "rule"),
        ("cfg_rescale", lambda a: a["rule"].__setitem__(6, float("nan")), ValueError, "rule"),
        ("cfg_rescale", lambda a: a["rule"].__setitem__(11, float("inf")), ValueError, "rule"),
        ("cfg_rescale", lambda a: a["rule"].__setitem__(0, 3.0), ValueError, "rule"),
        ("cfg_rescale", lambda a: a["rule"].__setitem__(5, 0.0), ValueError, "q"),
        ("cfg_rescale", lambda a: a.update(history=torch.zeros(1, 2, 3, 6)), ValueError, "history"),
        ("cfg_rescale", lambda a: a.update(noise=torch.randn(3, 3, 5)), ValueError, "noise"),
    ],
)
def test_guided_step_bad_input(name, mutate, exc, match):
    args = _guided_args(name)
    args["rule"] = list(args["rule"])
    mutate(args)
    with pytest.raises(exc, match=match):
        _run_guided(args)


@pytest.mark.parametrize(
    "operands, exc, match",
    [
        ([], ValueError, "operands"),
        ([torch.randn(2, 5)] * 6, ValueError, "operands"),
        ([torch.randn(2, 5), torch.randn(2, 6)], ValueError, "operands\\[1\\]"),
        ([torch.randn(2, 5), torch.randn(3, 5)], ValueError, "operands\\[1\\]"),
        ([torch.randn(2, 5).half(), torch.randn(2, 5).bfloat16()], TypeError, "operands\\[1\\]"),
        ([torch.randn(2, 5), torch.randn(2, 5, device="meta")], ValueError, "operands\\[1\\]"),
        ([torch.randn(2, 5).double()], TypeError, "operands"),
        ([torch.tensor(1.0)], ValueError, "operands"),
    ],
)
def test_guidance_stats_bad_input(operands, exc, match):
    with pytest.raises(exc, match=match):
        ops.guidance_stats(operands)


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: CFG(float("nan")), ValueError, "guidance_scale"),
        (lambda: CFG(float("inf")), ValueError, "guidance_scale"),
        (lambda: CFG("7"), TypeError, "guidance_scale"),
        (lambda: CFG(5.0, guidance_rescale=1.5), ValueError, "guidance_rescale"),
        (lambda: CFG(5.0, guidance_rescale=-0.1), ValueError, "guidance_rescale"),
        (lambda: CFG(5.0, start=0.8, stop=0.2), ValueError, "start"),
        (lambda: CFG(5.0, stop=1.5), ValueError, "stop"),
        (lambda: CFG(5.0, sigma_interval=(1.0,)), ValueError, "sigma_interval"),
        (lambda: CFG(5.0, sigma_interval=(2.0, 1.0)), ValueError, "sigma_interval"),
        (lambda: CFG(5.0, sigma_interval=(0.0, float("nan"))), ValueError, "sigma_interval"),
        (lambda: CFG(5.0, sigma_interval=3.0), ValueError, "sigma_interval"),
        (lambda: CFG(5.0, target="x0"), ValueError, "target"),
        (lambda: CFGZeroStar(5.0, zero_init_steps=-1), ValueError, "zero_init_steps"),
        (lambda: APG(5.0, norm_threshold=-1.0), ValueError, "norm_threshold"),
        (lambda: APG(5.0, eta=float("nan")), ValueError, "eta"),
        (lambda: APG(5.0, momentum=float("inf")), ValueError, "momentum"),
        (lambda: DualCFG(5.0, image_guidance_scale=float("nan")), ValueError, "image_guidance_scale"),
        (lambda: CFG(5.0, target="denoised").rule((0.5, 0.0)), ValueError, "conversion"),
    ],
)
def test_guidance_config_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_prepare_guided_bad_input():
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="branches"):
        prepare_guided(CFG(5.0), x, [x])
    with pytest.raises(ValueError, match="branches"):
        prepare_guided(DualCFG(5.0), x, [x, x])
    with pytest.raises(ValueError, match="momentum"):
        prepare_guided(APG(5.0, momentum=0.5), x, [x, x], None)


@pytest.mark.parametrize(
    "scheduler_name, library, config, kwargs, exc, match",
    [
        ("EulerDiscreteScheduler", sf, CFG(5.0), dict(uncond=None), ValueError, "uncond"),
        ("EulerDiscreteScheduler", sf, DualCFG(5.0), dict(uncond=UNCOND), ValueError, "extra"),
        ("EulerDiscreteScheduler", sf, CFG(5.0, sigma_interval=(1e4, 2e4)), dict(uncond=UNCOND), ValueError,
         "sigma_interval"),
        ("EulerDiscreteScheduler", sf, CFG(5.0, sigma_interval=(0.0, 1e-6)), dict(uncond=UNCOND), ValueError,
         "sigma_interval"),
        ("EulerDiscreteScheduler", diffusers, CFG(5.0, target="denoised"), dict(uncond=UNCOND), ValueError,
         "target"),
        ("EulerDiscreteScheduler", sf, CFG(5.0), dict(uncond=[1.0]), TypeError, "uncond"),
        ("EulerDiscreteScheduler", sf, CFG(5.0), dict(uncond=UNCOND, latents=[1.0]), TypeError, "latents"),
        ("EulerDiscreteScheduler", sf, CFG(5.0), dict(uncond=UNCOND, latents=None), TypeError, "latents"),
    ],
    ids=["missing_uncond", "missing_extra", "sigma_interval_above", "sigma_interval_below",
         "denoised_with_diffusers_scheduler", "uncond_not_dict", "latents_list", "latents_none"],
)
def test_sampler_bad_input(scheduler_name, library, config, kwargs, exc, match):
    scheduler = make_scheduler(scheduler_name, library)
    kwargs = dict(kwargs)
    latents = kwargs.pop("latents", start_latents(scheduler))
    with pytest.raises(exc, match=match):
        stepfuse.sample(label_model, latents, scheduler, COND, guidance=config, **kwargs)


@pytest.mark.parametrize("name", sorted(sf.__all__))
def test_denoised_target_runs_or_names_target(name):
    """target='denoised' on any drop-in scheduler either samples or says up front, naming the
    argument, that the scheduler has no data-prediction conversion."""
    scheduler = getattr(sf, name)()
    scheduler.set_timesteps(4)
    stochastic = "generator" in inspect.signature(scheduler.step).parameters
    try:
        got = stepfuse.sample(label_model, start_latents(scheduler), scheduler, COND, UNCOND,
                              CFG(3.0, target="denoised"), generator=torch.Generator() if stochastic else None)
    except ValueError as error:
        assert "target" in str(error), str(error)
    else:
        assert torch.isfinite(got).all()


def test_sampler_rejects_non_guidance():
    scheduler = make_scheduler("EulerDiscreteScheduler", sf)
    for bad in (7.5, {"guidance_scale": 7.5}, DiffusersCFG(7.5)):
        with pytest.raises(TypeError, match="guidance"):
            stepfuse.sample(label_model, start_latents(scheduler), scheduler, COND, UNCOND, bad)


def test_rule_layout():
    assert all(len(VARIANTS[name][0].rule(VARIANTS[name][1] or (0.0, 1.0))) == RULE_SIZE for name in VARIANTS)
