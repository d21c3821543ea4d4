"""stepfuse.cache: policy validation and step masks, apply/remove on every supported model family,
each policy on the bundled DiT, per-CFG-branch state, batch decisions, memory, calibration,
``stepfuse.accelerate(cache=...)`` and bad input.

The transformers are tiny random configs called in a hand-written loop whose inputs drift slowly
from step to step (so the data-dependent caches fire); the bundled digit models give end-to-end
quality (PSNR against the uncached run).
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import stepfuse
import stepfuse.cache as sc
from stepfuse import metrics, models
from stepfuse.testing import pipelines as tiny
from stepfuse.testing.parity import relative_error
from stepfuse.testing.transformers import drift, run_steps, tiny_flux, tiny_sd3, tiny_wan

STEPS = 8  # denoising steps of every run here: enough for warm-up, skips and a forced last step
LABELS = [1, 7]
PSNR_FLOOR = 15.0  # dB against the uncached run; the cached runs here reach 20-35 dB, a broken cache < 10
DRIFT_ERROR = 0.15  # relative error of a cached step's output in the drifting loops (observed <= 0.09)
_HOOK = "stepfuse_cache_context"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: on a shared 2-core machine a 2-thread intra-op pool spends ~100x the
    # compute waiting for the other core.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- models and step loops ---------------------------------------------------------------------------

_drift = drift


def _digits(name):
    pipe = models.load(name)
    hidden, labels = _drift((2, *pipe.sample_shape)), torch.tensor(LABELS)
    key = "sample" if pipe.unet is not None else "hidden_states"  # UNet2DModel's name for it
    return pipe.denoiser, lambda i: {key: hidden(i), "timestep": torch.full((2,), 900 - 5 * i),
                                     "class_labels": labels}


def _tiny_unet():
    unet = tiny.tiny_stable_diffusion()[0].unet
    text = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(2))
    sample = _drift((2, 4, 16, 16))
    return unet, lambda i: dict(sample=sample(i), timestep=900 - 10 * i, encoder_hidden_states=text)


TRANSFORMERS = {"digits-dit": lambda: _digits("digits-dit"), "flux": tiny_flux, "wan": tiny_wan, "sd3": tiny_sd3}
UNETS = {"digits-unet": lambda: _digits("digits-unet"), "sd-unet": _tiny_unet}


def _run(model, inputs, steps=STEPS, branch=None):
    return run_steps(model, inputs, steps, branch)


@pytest.fixture(scope="module")
def built():
    """name -> (model, inputs, uncached outputs), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs = {**TRANSFORMERS, **UNETS}[name]()
            model.eval()
            cache[name] = (model, inputs, _run(model, inputs))
        return cache[name]

    return get


def _forward_overrides(model):
    return {name for name, m in model.named_modules() if "forward" in m.__dict__}


def _assert_removed(model, overrides_before):
    assert not hasattr(model, "_stepfuse_cache")
    assert _forward_overrides(model) == overrides_before  # the class forwards are back
    registry = getattr(model, "_diffusers_hook", None)
    assert registry is None or _HOOK not in registry.hooks


# -- 1. policies -------------------------------------------------------------------------------------

_RATIOS = (1.0, 0.95)
BAD_POLICIES = [
    (lambda: sc.FirstBlockCache(threshold=-0.1), ValueError, "threshold"),
    (lambda: sc.FirstBlockCache(threshold=11.0), ValueError, "threshold"),
    (lambda: sc.FirstBlockCache(threshold=float("nan")), ValueError, "threshold"),
    (lambda: sc.FirstBlockCache(threshold=True), TypeError, "threshold"),
    (lambda: sc.FirstBlockCache(threshold="0.1"), TypeError, "threshold"),
    (lambda: sc.FirstBlockCache(front_blocks=2), ValueError, "front_blocks"),
    (lambda: sc.DualBlockCache(front_blocks=0), ValueError, "front_blocks"),
    (lambda: sc.DualBlockCache(back_blocks=-1), ValueError, "back_blocks"),
    (lambda: sc.DualBlockCache(max_consecutive_cached=-2), ValueError, "max_consecutive_cached"),
    (lambda: sc.DualBlockCache(max_cached_steps=1.5), TypeError, "max_cached_steps"),
    (lambda: sc.DualBlockCache(batch_decision="max"), ValueError, "batch_decision"),
    (lambda: sc.DualBlockCache(stride=0), ValueError, "stride"),
    (lambda: sc.DualBlockCache(taylorseer=2), TypeError, "taylorseer"),
    (lambda: sc.DualBlockCache(warmup_steps=-1), ValueError, "warmup_steps"),
    (lambda: sc.DualBlockCache(decision="gpu"), ValueError, "decision"),
    (lambda: sc.DualBlockCache(per_branch=1), TypeError, "per_branch"),
    (lambda: sc.DualBlockCache(offload="yes"), TypeError, "offload"),
    (lambda: sc.DualBlockCache(distributed=None), TypeError, "distributed"),
    (lambda: sc.TeaCache(threshold=-1.0), ValueError, "threshold"),
    (lambda: sc.TeaCache(threshold=float("inf")), ValueError, "threshold"),
    (lambda: sc.TeaCache(threshold=False), TypeError, "threshold"),
    (lambda: sc.TeaCache(coefficients=(1.0, float("nan"))), ValueError, "coefficients"),
    (lambda: sc.TeaCache(coefficients="1,2"), TypeError, "coefficients"),
    (lambda: sc.TeaCache(batch_decision="median"), ValueError, "batch_decision"),
    (lambda: sc.TeaCache(stride=0), ValueError, "stride"),
    (lambda: sc.TeaCache(taylorseer=sc.FirstBlockCache()), TypeError, "taylorseer"),
    (lambda: sc.MagCache(), ValueError, "mag_ratios"),
    (lambda: sc.MagCache(mag_ratios=(1.0,)), ValueError, "mag_ratios"),
    (lambda: sc.MagCache(mag_ratios=(1.0, 0.0)), ValueError, "mag_ratios"),
    (lambda: sc.MagCache(mag_ratios=(1.0, -0.9)), ValueError, "mag_ratios"),
    (lambda: sc.MagCache(mag_ratios=(1.0, float("nan"))), ValueError, "mag_ratios"),
    (lambda: sc.MagCache(mag_ratios=_RATIOS, threshold=-0.1), ValueError, "threshold"),
    (lambda: sc.MagCache(mag_ratios=_RATIOS, max_skip_steps=0), ValueError, "max_skip_steps"),
    (lambda: sc.MagCache(mag_ratios=_RATIOS, retention_ratio=1.5), ValueError, "retention_ratio"),
    (lambda: sc.MagCache(mag_ratios=_RATIOS, front_blocks=-1), ValueError, "front_blocks"),
    (lambda: sc.MagCache(mag_ratios=_RATIOS, taylorseer="x"), TypeError, "taylorseer"),
    (lambda: sc.TaylorSeer(order=3), ValueError, "order"),
    (lambda: sc.TaylorSeer(order=-1), ValueError, "order"),
    (lambda: sc.TaylorSeer(order=1.0), TypeError, "order"),
    (lambda: sc.TaylorSeer(interval=0), ValueError, "interval"),
    (lambda: sc.TaylorSeer(back_blocks=-1), ValueError, "back_blocks"),
    (lambda: sc.StaticCache(interval=0), ValueError, "interval"),
    (lambda: sc.StaticCache(preset="fora-5"), ValueError, "preset"),
    (lambda: sc.StaticCache(mask="TF"), TypeError, "mask"),
    (lambda: sc.StaticCache(mask=(1, 0)), TypeError, "mask"),
    (lambda: sc.StaticCache(mask=5), TypeError, "mask"),
    (lambda: sc.StaticCache(cooldown_steps=-1), ValueError, "cooldown_steps"),
    (lambda: sc.StaticCache(taylorseer="x"), TypeError, "taylorseer"),
    (lambda: sc.DeepCache(interval=0), ValueError, "interval"),
    (lambda: sc.DeepCache(branch=-1), ValueError, "branch"),
    (lambda: sc.DeepCache(cooldown_steps=-1), ValueError, "cooldown_steps"),
]


@pytest.mark.parametrize("make,error,name", BAD_POLICIES, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_POLICIES)])
def test_policy_rejects_bad_argument(make, error, name):
    with pytest.raises(error, match=re.escape(name)):
        make()


def test_policy_defaults_and_aliases():
    fbc = sc.FirstBlockCache(threshold=0.1)
    assert isinstance(fbc, sc.DualBlockCache) and (fbc.front_blocks, fbc.back_blocks) == (1, 0)
    assert sc.MagCache(mag_ratios=[1, 0.9]).mag_ratios == (1.0, 0.9)
    assert sc.TeaCache(coefficients=[1, 2]).coefficients == (1.0, 2.0)
    assert sc.StaticCache(mask=[True, False]).mask == (True, False)
    assert sc.DeepCache().family == "unet" and sc.FirstBlockCache().family == "blocks"
    with pytest.raises(dataclasses.FrozenInstanceError):
        fbc.threshold = 0.2


T, F = True, False


@pytest.mark.parametrize("policy,num_steps,expected", [
    (sc.StaticCache(interval=2), 6, (T, F, T, F, T, T)),
    (sc.StaticCache(interval=3, warmup_steps=1, cooldown_steps=2), 8, (T, T, F, F, T, F, T, T)),
    (sc.StaticCache(preset="fora-2"), 10, (T, T, F, T, F, T, F, T, F, T)),
    (sc.StaticCache(preset="slow"), 10, (T, T, T, F, T, F, T, F, T, T)),
    (sc.StaticCache(mask=(T, F, F, T)), 4, (T, F, F, T)),
    (sc.DeepCache(interval=3), 7, (T, F, F, T, F, F, T)),
    (sc.DeepCache(interval=2, warmup_steps=1, cooldown_steps=2), 7, (T, T, F, T, F, T, T)),
    (sc.DeepCache(interval=1), 3, (T, T, T)),
])
def test_step_mask(policy, num_steps, expected):
    assert policy.step_mask(num_steps) == expected


@pytest.mark.parametrize("preset", sorted(sc.STATIC_PRESETS))
def test_static_presets_compute_first_and_last(preset):
    mask = sc.StaticCache(preset=preset).step_mask(20)
    assert len(mask) == 20 and mask[0] and mask[-1] and not all(mask)


def test_static_mask_length_mismatch():
    with pytest.raises(ValueError, match="mask"):
        sc.StaticCache(mask=(T, F, T)).step_mask(4)


# -- 2. apply / remove on each model family ----------------------------------------------------------

NEVER = {"transformer": [sc.FirstBlockCache(threshold=0.0), sc.TeaCache(threshold=0.0),
                         sc.StaticCache(mask=(T,) * STEPS, front_blocks=1)],
         "unet": [sc.DeepCache(interval=1)]}
LOOSE = {"transformer": [sc.FirstBlockCache(threshold=0.3), sc.DualBlockCache(front_blocks=1, back_blocks=1,
                                                                               threshold=0.3),
                         sc.TeaCache(threshold=0.5), sc.StaticCache(interval=2, front_blocks=1)],
         "unet": [sc.DeepCache(interval=3), sc.DeepCache(interval=2, cooldown_steps=2)]}


def _cases(table):
    return [pytest.param(name, policy, id=f"{name}-{type(policy).__name__}{i}")
            for family, names in (("transformer", TRANSFORMERS), ("unet", UNETS))
            for name in names for i, policy in enumerate(table[family])]


def _cached_run(model, inputs, policy):
    """The loop's outputs and stats with ``policy`` installed for the run (removed afterwards)."""
    sc.apply(model, policy, num_inference_steps=STEPS)
    try:
        outputs = _run(model, inputs)
        return outputs, dataclasses.replace(sc.stats(model))  # a snapshot: remove() releases the live stats
    finally:
        sc.remove(model)


@pytest.mark.parametrize("name,policy", _cases(NEVER))
def test_never_caching_is_bitwise_uncached(built, name, policy):
    model, inputs, reference = built(name)
    outputs, stats = _cached_run(model, inputs, policy)
    assert stats.calls == STEPS and stats.steps_cached == 0 and stats.blocks_skipped == 0
    assert stats.blocks_evaluated > 0
    for got, expected in zip(outputs, reference):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("name,policy", _cases(LOOSE))
def test_loose_cache_skips_and_stays_close(built, name, policy):
    model, inputs, reference = built(name)
    outputs, stats = _cached_run(model, inputs, policy)
    assert stats.steps_cached > 0 and stats.blocks_skipped > 0, stats
    assert 0.0 < stats.skipped_fraction < 1.0
    assert [d[2] for d in stats.decisions].count(True) == stats.steps_cached
    assert not stats.decisions[0][2]  # nothing to reuse at the first step
    errors = [relative_error(got, expected) for got, expected in zip(outputs, reference)]
    assert max(errors) < DRIFT_ERROR, errors


@pytest.mark.parametrize("name", [*TRANSFORMERS, *UNETS])
def test_remove_restores_original_model(built, name):
    model, inputs, reference = built(name)
    before = _forward_overrides(model)
    policy = sc.DeepCache(interval=2) if name in UNETS else sc.FirstBlockCache(threshold=0.3)
    sc.apply(model, policy, num_inference_steps=STEPS)
    assert _forward_overrides(model) != before  # the model and its blocks are wrapped
    _run(model, inputs, steps=3)
    sc.remove(model)
    _assert_removed(model, before)
    for got, expected in zip(_run(model, inputs), reference):
        assert torch.equal(got, expected)
    sc.apply(model, policy)  # and it can be installed again
    sc.remove(model)
    _assert_removed(model, before)


def test_second_run_resets_at_step_count(built):
    """A branch's cache starts over when its step count is reached: two runs give the same outputs."""
    model, inputs, _ = built("flux")
    sc.apply(model, sc.FirstBlockCache(threshold=0.3), num_inference_steps=STEPS)
    try:
        first, second = _run(model, inputs), _run(model, inputs)
        decisions = sc.stats(model).decisions
    finally:
        sc.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert decisions[:STEPS] == decisions[STEPS:]


# -- 3. every policy on the bundled DiT pipeline -----------------------------------------------------

@pytest.fixture(scope="module")
def dit_pipe():
    pipe = models.load("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps=STEPS, labels=LABELS, seed=0):
    return pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


@pytest.fixture(scope="module")
def dit_reference(dit_pipe):
    return _sample(dit_pipe)


@pytest.fixture(scope="module")
def calibration(dit_pipe):
    return sc.calibrate(dit_pipe.transformer, [lambda: _sample(dit_pipe), lambda: _sample(dit_pipe, labels=[3], seed=1)],
                        degree=2)


def _cached_sample(pipe, policy, **kwargs):
    sc.apply(pipe.transformer, policy, num_inference_steps=kwargs.get("steps", STEPS))
    try:
        images = _sample(pipe, **kwargs)
        return images, sc.stats(pipe.transformer)
    finally:
        sc.remove(pipe.transformer)


DIT_POLICIES = {
    "first-block": sc.FirstBlockCache(threshold=0.2),
    "first-block-stride3": sc.FirstBlockCache(threshold=0.2, stride=3),
    "first-block-mean": sc.FirstBlockCache(threshold=0.2, batch_decision="mean"),
    "dual-block-F2B1": sc.DualBlockCache(front_blocks=2, back_blocks=1, threshold=0.2),
    "dual-block-F1B2": sc.DualBlockCache(front_blocks=1, back_blocks=2, threshold=0.3),
    "first-block-taylor1": sc.FirstBlockCache(threshold=0.2, taylorseer=sc.TaylorSeer(order=1)),
    "first-block-taylor2": sc.FirstBlockCache(threshold=0.2, taylorseer=sc.TaylorSeer(order=2)),
    "dual-block-taylor2": sc.DualBlockCache(front_blocks=1, back_blocks=1, threshold=0.3,
                                            taylorseer=sc.TaylorSeer(order=2)),
    "teacache-raw": sc.TeaCache(threshold=0.3),
    "teacache-taylor1": sc.TeaCache(threshold=0.3, taylorseer=sc.TaylorSeer(order=1)),
    "taylorseer1": sc.TaylorSeer(order=1),
    "taylorseer2": sc.TaylorSeer(order=2, front_blocks=1, back_blocks=1),
    "static-interval2": sc.StaticCache(interval=2, front_blocks=1),
    "static-taylor1": sc.StaticCache(interval=2, taylorseer=sc.TaylorSeer(order=1)),
    **{f"static-{p}": sc.StaticCache(preset=p) for p in sorted(sc.STATIC_PRESETS)},
    "offload": sc.FirstBlockCache(threshold=0.2, offload=True),
}


def _assert_skips_and_quality(images, stats, reference):
    assert stats.calls == STEPS  # one batched CFG call per step
    assert stats.steps_cached > 0 and stats.blocks_skipped > 0, stats.decisions
    assert metrics.psnr(images, reference) > PSNR_FLOOR


@pytest.mark.parametrize("key", list(DIT_POLICIES))
def test_policy_on_dit_pipeline(dit_pipe, dit_reference, key):
    images, stats = _cached_sample(dit_pipe, DIT_POLICIES[key])
    _assert_skips_and_quality(images, stats, dit_reference)


@pytest.mark.parametrize("kind", ["teacache", "magcache"])
def test_calibrated_policy_on_dit_pipeline(dit_pipe, dit_reference, calibration, kind):
    if kind == "teacache":
        policy = calibration.teacache(0.3)
        assert policy.coefficients == calibration.teacache_coefficients
    else:
        policy = calibration.magcache(0.3)
        assert policy.mag_ratios == calibration.mag_ratios
    images, stats = _cached_sample(dit_pipe, policy)
    _assert_skips_and_quality(images, stats, dit_reference)


def test_magcache_resamples_ratios_to_another_step_count(dit_pipe, calibration):
    reference = _sample(dit_pipe, steps=12)
    images, stats = _cached_sample(dit_pipe, calibration.magcache(0.3), steps=12)
    assert stats.calls == 12 and stats.steps_cached > 0
    assert metrics.psnr(images, reference) > PSNR_FLOOR


def _flags(stats):
    return [reused for _, _, reused in stats.decisions]


def test_static_mask_decides_exactly(dit_pipe):
    mask = (T, T, F, F, T, F, T, T)
    _, stats = _cached_sample(dit_pipe, sc.StaticCache(mask=mask, front_blocks=1))
    assert _flags(stats) == [not m for m in mask]
    assert stats.blocks_skipped == 3 * (6 - 1)  # three reused steps, the five non-front blocks each


def test_taylorseer_alone_interval(dit_pipe):
    _, stats = _cached_sample(dit_pipe, sc.TaylorSeer(order=1, interval=3, warmup_steps=2))
    # full: warm-up (0, 1), every 3rd step after it (2, 5) and the last (7)
    assert _flags(stats) == [F, F, F, T, T, F, T, F]


@pytest.mark.parametrize("options,check", [
    (dict(warmup_steps=3), lambda f: not any(f[:3]) and any(f[3:])),
    (dict(max_consecutive_cached=1), lambda f: any(f) and not any(a and b for a, b in zip(f, f[1:]))),
    (dict(max_cached_steps=2), lambda f: sum(f) == 2),
    (dict(), lambda f: f[0] is False and f[-1] is False and sum(f) >= 4),  # the last step always computes
])
def test_block_cache_limits(dit_pipe, options, check):
    # threshold 10 would reuse at every step; only the limits stop it
    for policy in (sc.FirstBlockCache(threshold=10.0, **options), sc.TeaCache(threshold=100.0, **options)):
        _, stats = _cached_sample(dit_pipe, policy)
        assert check(_flags(stats)), (type(policy).__name__, _flags(stats))


def test_magcache_max_skip_steps_and_retention(dit_pipe):
    ratios = (1.0,) * STEPS  # no magnitude change: only the caps stop skipping
    _, stats = _cached_sample(dit_pipe, sc.MagCache(mag_ratios=ratios, threshold=1.0, max_skip_steps=2,
                                                   retention_ratio=0.25))
    flags = _flags(stats)
    assert flags[:2] == [F, F] and flags[-1] is False  # retention: round(0.25 * 8) = 2 steps
    assert not any(a and b and c for a, b, c in zip(flags, flags[1:], flags[2:]))
    assert sum(flags) >= 3


# -- 4. CFG branches and batch decisions ---------------------------------------------------------------

class _Residual(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        torch.nn.init.normal_(self.proj.weight, std=0.3 / dim ** 0.5)

    def forward(self, hidden_states):
        return hidden_states + self.proj(hidden_states)  # the residual is linear in the input


class _Stack(torch.nn.Module):
    """A block stack stepfuse does not know (``layers``), cached through ``blocks=["layers"]``."""

    def __init__(self, dim=8, depth=4):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(_Residual(dim) for _ in range(depth))

    def forward(self, hidden_states):
        for block in self.layers:
            hidden_states = block(hidden_states)
        return hidden_states


def _stack_run(model, xs, names, steps=True):
    outs = {name: [] for name in set(names)}
    with torch.no_grad():
        for i, (x, name) in enumerate(zip(xs, names)):
            with sc.branch(name, step=i // len(set(names)) if steps else None):
                outs[name].append(model(x))
    return outs


def _cond_uncond_inputs(steps=6):
    cond = _drift((2, 5, 8), seed=3)
    # the unconditional input has nothing in common with the conditional one
    return [cond(i) for i in range(steps)], [-3.0 * cond(i).flip(-1) + 2.0 for i in range(steps)]


def test_branches_keep_separate_caches():
    cond, uncond = _cond_uncond_inputs()
    model = _Stack()
    sc.apply(model, sc.FirstBlockCache(threshold=5.0), blocks=["layers"])
    interleaved = _stack_run(model, [x for pair in zip(cond, uncond) for x in pair], ["cond", "uncond"] * len(cond))
    stats = sc.stats(model)
    sc.remove(model)
    assert {d[0] for d in stats.decisions} == {"cond", "uncond"}
    for name in ("cond", "uncond"):
        mine = [(step, reused) for branch, step, reused in stats.decisions if branch == name]
        assert [s for s, _ in mine] == list(range(len(cond)))
        assert [r for _, r in mine] == [False] + [True] * (len(cond) - 1)
    # each branch alone, fresh cache: the same outputs bit for bit (nothing crosses over)
    for name, xs in (("cond", cond), ("uncond", uncond)):
        sc.apply(model, sc.FirstBlockCache(threshold=5.0), blocks=["layers"])
        alone = _stack_run(model, xs, [name] * len(xs))
        sc.remove(model)
        assert all(torch.equal(a, b) for a, b in zip(interleaved[name], alone[name]))


def test_shared_cache_without_per_branch_crosses_over():
    """Sanity check of the test above: with per_branch=False the uncond call does reuse cond's residual."""
    cond, uncond = _cond_uncond_inputs(steps=2)
    model = _Stack()
    sc.apply(model, sc.FirstBlockCache(threshold=5.0, per_branch=False), blocks=["layers"])
    shared = _stack_run(model, [cond[0], uncond[0]], ["cond", "uncond"], steps=False)
    stats = sc.stats(model)
    sc.remove(model)
    assert [d[0] for d in stats.decisions] == ["default", "default"]
    with torch.no_grad():
        assert not torch.allclose(shared["uncond"][0], model(uncond[0]), atol=1e-3)


def test_diffusers_cache_context_names_branches(built):
    model, inputs, _ = built("flux")

    def uncond_inputs(i):
        kw = inputs(i)
        return {**kw, "hidden_states": -2.0 * kw["hidden_states"] + 1.0,
                "encoder_hidden_states": kw["encoder_hidden_states"].flip(1) * 3.0}

    def run(names):
        outs = {n: [] for n in names}
        with torch.no_grad():
            for i in range(4):
                for name in names:
                    with model.cache_context(name, step_index=i):
                        outs[name].append(model(**(inputs(i) if name == "cond" else uncond_inputs(i))).sample)
        return outs

    policy = sc.FirstBlockCache(threshold=10.0)
    sc.apply(model, policy, num_inference_steps=4)
    try:
        both = run(["cond", "uncond"])
        stats = sc.stats(model)
    finally:
        sc.remove(model)
    assert [(b, s) for b, s, _ in stats.decisions] == [(n, i) for i in range(4) for n in ("cond", "uncond")]
    assert sum(_flags(stats)) > 0
    sc.apply(model, policy, num_inference_steps=4)
    try:
        alone = run(["uncond"])
    finally:
        sc.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(both["uncond"], alone["uncond"]))


def test_branch_context_overrides_and_validates():
    with pytest.raises(TypeError, match="name"):
        with sc.branch(""):
            pass
    with pytest.raises(ValueError, match="step"):
        with sc.branch("cond", step=-1):
            pass


@pytest.mark.parametrize("batch_branches,names", [(False, {"cond", "uncond"}), (True, {"batch2"})])
def test_sampler_names_branches(dit_pipe, batch_branches, names):
    stepfuse.accelerate(dit_pipe, solver="ddim", batch_branches=batch_branches, cache=sc.FirstBlockCache(threshold=0.2))
    try:
        _sample(dit_pipe)
        stats = sc.stats(dit_pipe.transformer)
    finally:
        stepfuse.restore(dit_pipe)
    assert {d[0] for d in stats.decisions} == names
    for name in names:
        assert [s for b, s, _ in stats.decisions if b == name] == list(range(STEPS))
    assert stats.steps_cached > 0


def _batch_decision(batch_decision):
    """Step 0 computes; at step 1 sample 0's input (hence its linear first-block residual) grows by 40%
    while the other three are unchanged: per sample 0.4 > 0.25, pooled about 0.1 < 0.25."""
    x = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(4))
    moved = x.clone()
    moved[0] *= 1.4
    model = _Stack()
    with torch.no_grad():
        expected = model(moved)
        sc.apply(model, sc.FirstBlockCache(threshold=0.25, batch_decision=batch_decision), blocks="layers")
        model(x)
        got = model(moved)
    stats = sc.stats(model)
    sc.remove(model)
    return stats.decisions[1][2], got, expected


def test_batch_decision_all_computes_when_one_sample_moves():
    reused, got, expected = _batch_decision("all")
    assert not reused
    assert torch.equal(got, expected)


def test_batch_decision_mean_pools_the_batch():
    reused, got, expected = _batch_decision("mean")
    assert reused
    assert torch.allclose(got[1:], expected[1:], atol=1e-5)  # unchanged samples: their own residual
    assert not torch.allclose(got[0], expected[0], atol=1e-3)  # the moved sample got a stale residual


def test_batch_change_under_one_branch_recomputes():
    model = _Stack()
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(5))
    sc.apply(model, sc.FirstBlockCache(threshold=10.0), blocks="layers")
    with torch.no_grad():
        model(x)
        got = model(x[:2])
    sc.remove(model)
    with torch.no_grad():
        assert torch.equal(got, model(x[:2]))


def test_deepcache_batch_change_under_one_branch_recomputes(built):
    model, inputs, _ = built("sd-unet")
    sc.apply(model, sc.DeepCache(interval=3))
    try:
        with torch.no_grad():
            model(**inputs(0))
            kw = {k: v[:1] if torch.is_tensor(v) else v for k, v in inputs(1).items()}
            got = model(**kw).sample
    finally:
        sc.remove(model)
    with torch.no_grad():
        assert torch.equal(got, model(**kw).sample)


# -- 5. memory -----------------------------------------------------------------------------------------

def test_memory_held_while_cached_and_released(built):
    model, inputs, _ = built("wan")
    sc.apply(model, sc.FirstBlockCache(threshold=0.3, taylorseer=sc.TaylorSeer(order=2)))
    try:
        _run(model, inputs, steps=3)
        held = sc.stats(model)
        assert held.memory_bytes > 0 and held.peak_memory_bytes >= held.memory_bytes
        sc.reset(model)
        assert sc.stats(model).memory_bytes == 0
        _run(model, inputs, steps=3)
        assert sc.stats(model).memory_bytes > 0
        sc.release(model)
        after = sc.stats(model)
        assert after.memory_bytes == 0 and after.peak_memory_bytes >= held.peak_memory_bytes
        previous = sc.stats(model, reset=True)
        assert previous.calls == 6 and sc.stats(model).calls == 0
    finally:
        sc.remove(model)


def _offload_policy(name, offload):
    return sc.DeepCache(interval=2, offload=offload) if name in UNETS else \
        sc.FirstBlockCache(threshold=0.3, offload=offload)


@pytest.mark.parametrize("name", ["flux", "sd-unet"])
def test_offload_matches_device_cache(built, name):
    model, inputs, _ = built(name)
    plain, plain_stats = _cached_run(model, inputs, _offload_policy(name, False))
    offloaded, offloaded_stats = _cached_run(model, inputs, _offload_policy(name, True))
    assert offloaded_stats.steps_cached == plain_stats.steps_cached > 0
    assert offloaded_stats.decisions == plain_stats.decisions
    assert all(torch.equal(a, b) for a, b in zip(plain, offloaded))
    sc.apply(model, _offload_policy(name, True))
    try:
        _run(model, inputs, steps=2)
        # the parked tensors live on the host (trivially so on a CPU run)
        state = next(iter(model._stepfuse_cache.branches.values()))
        parked = [p for p in (*state.residual, *state.factors, state.deep) if p is not None]
        assert parked and all(p.tensor.device.type == "cpu" for p in parked)
    finally:
        sc.remove(model)


def test_accelerate_releases_cache_memory_after_each_call(dit_pipe):
    stepfuse.accelerate(dit_pipe, solver="ddim", cache=sc.FirstBlockCache(threshold=0.2))
    try:
        for _ in range(2):
            _sample(dit_pipe)
            stats = sc.stats(dit_pipe.transformer)
            assert stats.memory_bytes == 0 and stats.peak_memory_bytes > 0
        assert stats.calls == 2 * STEPS
        # each call starts a new run: the second call's decisions repeat the first's
        assert stats.decisions[:STEPS] == stats.decisions[STEPS:]
    finally:
        stepfuse.restore(dit_pipe)


# -- 6. calibration ------------------------------------------------------------------------------------

def test_calibration_shapes(calibration):
    assert calibration.model == "DiTTransformer2DModel"
    assert calibration.num_inference_steps == STEPS
    assert len(calibration.teacache_coefficients) == 3  # degree 2
    assert len(calibration.mag_ratios) == STEPS
    assert all(r > 0 for r in calibration.mag_ratios)
    assert all(abs(c) < 1e6 for c in calibration.teacache_coefficients)
    # two runs, one batched call per step: STEPS - 1 step pairs each
    assert len(calibration.samples["x"]) == len(calibration.samples["y"]) == 2 * (STEPS - 1)


def test_calibration_leaves_model_untouched(dit_pipe, calibration):
    model = dit_pipe.transformer
    assert not hasattr(model, "_stepfuse_cache") and "forward" not in model.__dict__
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.transformer_blocks)


def test_calibration_json_round_trip(calibration, tmp_path):
    path = tmp_path / "cal.json"
    calibration.save(path)
    assert sc.Calibration.load(path) == calibration
    assert sc.Calibration.load(str(path)).magcache(0.1).mag_ratios == calibration.mag_ratios


@pytest.mark.parametrize("content", [
    "not json {", "[1, 2]", json.dumps({"model": "x"}),
    json.dumps({"format": "stepfuse.cache.calibration/1", "model": "x"}),
    json.dumps({"format": "stepfuse.cache.calibration/1", "model": "x", "num_inference_steps": 4,
                "teacache_coefficients": ["a"], "mag_ratios": [1.0]}),
])
def test_calibration_load_rejects_bad_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        sc.Calibration.load(path)


def test_calibrate_bad_input(dit_pipe):
    model = dit_pipe.transformer
    with pytest.raises(TypeError, match="runs"):
        sc.calibrate(model, [])
    with pytest.raises(ValueError, match="degree"):
        sc.calibrate(model, lambda: None, degree=0)
    with pytest.raises(ValueError, match="same number"):
        sc.calibrate(model, [lambda: _sample(dit_pipe, steps=3), lambda: _sample(dit_pipe, steps=4)], degree=1)
    sc.apply(model, sc.FirstBlockCache())
    try:
        with pytest.raises(ValueError, match="cache"):
            sc.calibrate(model, lambda: _sample(dit_pipe, steps=3), degree=1)
    finally:
        sc.remove(model)


# -- 7. stepfuse.accelerate(cache=...) -------------------------------------------------------------------

def test_accelerate_cache_on_dit_pipeline(dit_pipe, dit_reference):
    before = _forward_overrides(dit_pipe.transformer)
    stepfuse.accelerate(dit_pipe, solver="ddim", cache=sc.FirstBlockCache(threshold=0.2))
    try:
        images = _sample(dit_pipe)
        stats = sc.stats(dit_pipe.transformer)
        assert stats.steps_cached > 0
        assert metrics.psnr(images, dit_reference) > PSNR_FLOOR
        # accelerate again: the policy is replaced, then removed
        stepfuse.accelerate(dit_pipe, solver="ddim", cache=sc.StaticCache(preset="fast"))
        assert isinstance(dit_pipe.transformer._stepfuse_cache.policy, sc.StaticCache)
        stepfuse.accelerate(dit_pipe, solver="ddim")
        assert not hasattr(dit_pipe.transformer, "_stepfuse_cache")
        stepfuse.accelerate(dit_pipe, solver="ddim", cache=sc.TeaCache(threshold=0.3))
    finally:
        stepfuse.restore(dit_pipe)
    _assert_removed(dit_pipe.transformer, before)


def test_accelerate_deepcache_on_unet_pipeline():
    pipe = models.load("digits-unet")
    pipe.set_progress_bar_config(disable=True)
    reference = _sample(pipe)
    before = _forward_overrides(pipe.unet)
    stepfuse.accelerate(pipe, solver="ddim", cache=sc.DeepCache(interval=2))
    try:
        images = _sample(pipe)
        stats = sc.stats(pipe.unet)
    finally:
        stepfuse.restore(pipe)
    assert stats.steps_cached > 0 and stats.memory_bytes == 0 and stats.peak_memory_bytes > 0
    assert metrics.psnr(images, reference) > PSNR_FLOOR
    _assert_removed(pipe.unet, before)


def test_accelerate_cache_on_tiny_flux_pipeline():
    pipe, kwargs = tiny.tiny_flux(guidance_embeds=False)
    kwargs = {**kwargs, "true_cfg_scale": 3.0, "num_inference_steps": 6, "output_type": "pt"}
    before = _forward_overrides(pipe.transformer)
    stepfuse.accelerate(pipe, solver="euler", cache=sc.FirstBlockCache(threshold=0.5))
    try:
        images = pipe(**kwargs).images
        stats = sc.stats(pipe.transformer)
    finally:
        stepfuse.restore(pipe)
    assert torch.isfinite(images).all()
    assert stats.calls == 6 and stats.steps_cached > 0 and stats.memory_bytes == 0
    _assert_removed(pipe.transformer, before)


def test_diffusers_pipeline_end_of_call_with_cache():
    """diffusers pipelines reset their denoiser's stateful hooks at the end of every call
    (maybe_free_model_hooks): the cache's context relay must survive it."""
    pipe, _ = tiny.tiny_flux()
    sc.apply(pipe.transformer, sc.FirstBlockCache())
    try:
        pipe.maybe_free_model_hooks()
    finally:
        sc.remove(pipe.transformer)


def test_accelerate_rejects_non_policy(dit_pipe):
    with pytest.raises(TypeError, match="cache"):
        stepfuse.accelerate(dit_pipe, cache="x")
    with pytest.raises(TypeError, match="cache"):
        stepfuse.accelerate(dit_pipe, cache=sc.TaylorSeer)  # the class, not an instance
    assert not hasattr(dit_pipe, "_stepfuse_state") and not hasattr(dit_pipe.transformer, "_stepfuse_cache")


# -- 8. bad input ----------------------------------------------------------------------------------------

class _NoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)


class _UnknownBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])


def test_apply_needs_block_lists():
    with pytest.raises(ValueError, match="block lists"):
        sc.apply(torch.nn.Linear(4, 4), sc.FirstBlockCache())
    with pytest.raises(ValueError, match="block lists"):
        sc.apply(_NoBlocks(), sc.TeaCache())
    with pytest.raises(ValueError, match=r"blocks=\[") as info:
        sc.apply(_UnknownBlocks(), sc.FirstBlockCache())
    assert "'blocks'" in str(info.value)
    with pytest.raises(ValueError, match="missing"):
        sc.apply(_UnknownBlocks(), sc.FirstBlockCache(), blocks=["missing"])
    with pytest.raises(ValueError, match="proj"):
        sc.apply(_NoBlocks(), sc.FirstBlockCache(), blocks="proj")  # not a ModuleList
    for model in (torch.nn.Linear(4, 4), _NoBlocks(), _UnknownBlocks()):
        assert not hasattr(model, "_stepfuse_cache") and "forward" not in model.__dict__


def test_apply_bad_arguments():
    model = _Stack()
    with pytest.raises(TypeError, match="model"):
        sc.apply("model", sc.FirstBlockCache())
    with pytest.raises(TypeError, match="policy"):
        sc.apply(model, "first-block", blocks="layers")
    with pytest.raises(TypeError, match="policy"):
        sc.apply(model, sc.FirstBlockCache, blocks="layers")
    for steps in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sc.apply(model, sc.FirstBlockCache(), num_inference_steps=steps, blocks="layers")
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("policy", [sc.DualBlockCache(front_blocks=3, back_blocks=1),
                                    sc.DualBlockCache(front_blocks=4), sc.StaticCache(front_blocks=2, back_blocks=2),
                                    sc.TaylorSeer(front_blocks=4), sc.MagCache(mag_ratios=_RATIOS, back_blocks=4)])
def test_front_and_back_blocks_cover_the_stack(policy):
    model = _Stack(depth=4)
    with pytest.raises(ValueError, match="front_blocks"):
        sc.apply(model, policy, blocks="layers")
    assert not hasattr(model, "_stepfuse_cache") and _forward_overrides(model) == set()


def test_wrong_family(built):
    dit, _, _ = built("digits-dit")
    unet, _, _ = built("digits-unet")
    with pytest.raises(ValueError, match="down_blocks"):
        sc.apply(dit, sc.DeepCache())
    with pytest.raises(ValueError, match="DeepCache"):
        sc.apply(unet, sc.FirstBlockCache())
    with pytest.raises(ValueError, match="branch"):
        sc.apply(unet, sc.DeepCache(branch=2))  # 3 up blocks: branch 0 or 1
    sc.remove(sc.apply(unet, sc.DeepCache(branch=1)))
    for model in (dit, unet):
        assert not hasattr(model, "_stepfuse_cache")


def test_apply_twice_and_remove_without_cache():
    model = _Stack()
    for what in (sc.remove, sc.stats, sc.reset, sc.release):
        with pytest.raises(ValueError, match="no stepfuse cache"):
            what(model)
    with pytest.raises(ValueError, match="no stepfuse cache"):
        sc.set_num_inference_steps(model, 4)
    sc.apply(model, sc.FirstBlockCache(), blocks="layers")
    with pytest.raises(ValueError, match="already has a cache"):
        sc.apply(model, sc.TeaCache(), blocks="layers")
    assert isinstance(model._stepfuse_cache.policy, sc.FirstBlockCache)
    sc.remove(model)
    with pytest.raises(ValueError, match="no stepfuse cache"):
        sc.remove(model)


@pytest.mark.parametrize("policy,message", [
    (sc.StaticCache(mask=(T, F, T, F)), "mask"),
    (sc.StaticCache(interval=2), "num_inference_steps"),
    (sc.MagCache(mag_ratios=_RATIOS), "num_inference_steps"),
    (sc.DeepCache(interval=2, cooldown_steps=1), "num_inference_steps"),
])
def test_step_count_errors_at_run_time(built, policy, message):
    if isinstance(policy, sc.DeepCache):
        model, inputs, _ = built("sd-unet")
        steps = None
    else:
        model, inputs = _Stack(), lambda i: dict(hidden_states=torch.full((1, 2, 8), 1.0 + 0.01 * i))
        steps = 6 if isinstance(policy, sc.StaticCache) and policy.mask is not None else None
    sc.apply(model, policy, num_inference_steps=steps, **({} if isinstance(policy, sc.DeepCache)
                                                          else {"blocks": "layers"}))
    try:
        with torch.no_grad():
            call = (lambda kw: model(**kw).sample) if isinstance(policy, sc.DeepCache) else (lambda kw: model(**kw))
            call(inputs(0))  # the first step computes
            with pytest.raises(ValueError, match=message):
                call(inputs(1))
            assert model._stepfuse_cache.call is None  # the failed call left no half-open state
    finally:
        sc.remove(model)


# -- torch.compile and device-side decisions ------------------------------------------------------------

def _drifting_calls(model, steps=6):
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        return [model(x + 0.01 * i) for i in range(steps)]


@pytest.mark.parametrize("decision", ["auto", "device"])
def test_device_decision_matches_host_decision(decision):
    # decision="device" branches with torch.cond on the flag; the outputs and decisions are the host's.
    results = []
    for mode in ("host", decision):
        model = _Stack()
        sc.apply(model, sc.FirstBlockCache(threshold=0.05, decision=mode), blocks=["layers"], num_inference_steps=6)
        results.append((_drifting_calls(model), [d[2] for d in sc.stats(model).decisions]))
        sc.remove(model)
    (host, host_flags), (other, other_flags) = results
    assert any(host_flags) and other_flags == host_flags
    for a, b in zip(host, other):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("decision", ["auto", "device"])
def test_cache_under_torch_compile_matches_eager(decision):
    model = _Stack()
    sc.apply(model, sc.FirstBlockCache(threshold=0.05, decision=decision), blocks=["layers"], num_inference_steps=6)
    eager, eager_flags = _drifting_calls(model), [d[2] for d in sc.stats(model, reset=True).decisions]
    sc.reset(model)
    compiled = torch.compile(model.forward, backend="aot_eager")
    outs = _drifting_calls(compiled)
    assert [d[2] for d in sc.stats(model).decisions] == eager_flags and any(eager_flags)
    for a, b in zip(eager, outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    sc.remove(model)
