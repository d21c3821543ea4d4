"""Sparse attention inside diffusers transformers: the processors on the bundled DiT and tiny random
Flux / Wan / SD3 models, the schedule (dense steps and layers, mask reuse, CFG branches), fallbacks
with their reasons, ``stepfuse.accelerate(pipe, attention=...)`` and bad configs."""

from __future__ import annotations

import logging

import pytest
import torch

import stepfuse
import stepfuse.attention as sa
import stepfuse.cache as sc
from stepfuse import metrics, models
from stepfuse.testing.parity import relative_error
from stepfuse.testing.transformers import drift, run_steps, tiny_flux, tiny_sd3, tiny_wan

STEPS = 6
KEEP_ALL = dict(top_k=10 ** 6, dense_steps=0, dense_layers=0, block_size=16)  # every block: equals dense
SPARSE = dict(top_k=2, dense_steps=0, dense_layers=0, block_size=16)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits
    yield
    torch.set_num_threads(previous)


def _digits_dit():
    pipe = models.load("digits-dit")
    hidden, labels = drift((2, *pipe.sample_shape)), torch.tensor([1, 7])
    return pipe.transformer, lambda i: dict(hidden_states=hidden(i), timestep=torch.full((2,), 900 - 5 * i),
                                            class_labels=labels)


# Head dims the kernels take (16) and sequences of at least 4 blocks of 16 tokens.
MODELS = {
    "digits-dit": _digits_dit,  # 8 x 8 tokens, head dim 32
    "flux": lambda: tiny_flux(head_dim=16, side=8, rope=(4, 6, 6)),  # 6 prompt + 64 image tokens
    "wan": lambda: tiny_wan(head_dim=16, frames=4, side=8),  # 4 x 4 x 4 video tokens
    "sd3": lambda: tiny_sd3(head_dim=16, side=16),  # 64 image + 6 prompt tokens (prompt last)
}
LONGER = {"wan-frames": lambda: tiny_wan(head_dim=16, frames=4, side=16)}  # 4 x 8 x 8 video tokens


def _run(model, inputs, steps=STEPS, branch=None):
    return run_steps(model, inputs, steps, branch)


@pytest.fixture(scope="module")
def built():
    made = {}

    def get(name):
        if name not in made:
            model, inputs = {**MODELS, **LONGER}[name]()
            model.eval()
            made[name] = (model, inputs, _run(model, inputs))
        return made[name]

    return get


def _with(model, config, fn):
    sa.apply(model, config, num_inference_steps=STEPS)
    try:
        return fn(), sa.stats(model)
    finally:
        sa.remove(model)


@pytest.mark.parametrize("name", list(MODELS))
def test_keeping_every_block_matches_dense(built, name):
    model, inputs, dense = built(name)
    out, stats = _with(model, sa.SparseAttention(**KEEP_ALL), lambda: _run(model, inputs))
    assert stats.sparse > 0 and not stats.fallbacks and stats.density == pytest.approx(1.0)
    for a, b in zip(out, dense):
        assert relative_error(a, b) < 1e-4


# Radial and per-head patterns are about time: they leave nothing out of a single frame, nor of
# frames no larger than a block, so they run on a longer video (4 frames of 8 x 8 tokens).
PATTERN_CASES = [(p, name) for p in ("adaptive", "sliding_tile") for name in MODELS] + \
    [(p, "wan-frames") for p in ("adaptive", "sliding_tile", "radial", "per_head")]


@pytest.mark.parametrize("pattern, name", PATTERN_CASES)
def test_sparse_patterns_skip_blocks_and_stay_close(built, name, pattern):
    model, inputs, dense = built(name)
    # Windows of single tiles: these grids hold only a few tiles.
    config = sa.SparseAttention(pattern=pattern, window=(1, 1, 1), **SPARSE)
    out, stats = _with(model, config, lambda: _run(model, inputs))
    assert stats.sparse == stats.calls > 0 and not stats.fallbacks
    assert stats.density < 1.0
    # Random weights attend broadly, so dropping blocks changes the output; it must stay the same field.
    for a, b in zip(out, dense):
        assert torch.isfinite(a).all() and relative_error(a, b) < 0.5


@pytest.mark.parametrize("pattern", ["adaptive", "sliding_tile", "radial", "per_head"])
def test_prompt_tokens_without_dense_prompt(built, pattern):
    model, inputs, dense = built("flux")  # 6 prompt tokens before 64 image tokens
    config = sa.SparseAttention(pattern=pattern, dense_prompt=False, window=(1, 1, 1), **SPARSE)
    out, stats = _with(model, config, lambda: _run(model, inputs, steps=2))
    assert stats.sparse == stats.calls > 0 and not stats.fallbacks
    # radial and per-head patterns leave a single frame whole (see PATTERN_CASES)
    assert stats.density < 1.0 if pattern in ("adaptive", "sliding_tile") else stats.density == 1.0
    assert all(torch.isfinite(a).all() for a in out)


@pytest.mark.parametrize("name", list(MODELS))
def test_remove_restores_processors_and_forward(built, name):
    model, inputs, dense = built(name)
    layers = sa.attention_layers(model)
    before = [m.processor for _, m in layers]
    sa.apply(model, sa.SparseAttention(**SPARSE))
    assert all(type(m.processor).__name__.startswith("BlockSparse") for _, m in layers)
    sa.remove(model)
    assert [m.processor for _, m in layers] == before and "forward" not in model.__dict__
    assert torch.equal(_run(model, inputs, steps=1)[0], dense[0])


def test_layers_are_self_and_joint_attention_only(built):
    names = [n for n, _ in sa.attention_layers(built("wan")[0])]
    assert names == [f"blocks.{i}.attn1" for i in range(3)]  # attn2 is cross-attention
    flux = [n for n, _ in sa.attention_layers(built("flux")[0])]
    assert flux == ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn",
                    "single_transformer_blocks.1.attn"]


# -- schedule ---------------------------------------------------------------------------------------------

def test_dense_steps_and_layers(built):
    model, inputs, _ = built("digits-dit")
    layers = len(sa.attention_layers(model))
    _, stats = _with(model, sa.SparseAttention(**{**SPARSE, "dense_steps": 2, "dense_layers": 2}),
                     lambda: _run(model, inputs))
    assert stats.calls == STEPS * layers
    assert stats.dense_scheduled == 2 * layers + (STEPS - 2) * 2
    assert stats.sparse == (STEPS - 2) * (layers - 2)
    _, stats = _with(model, sa.SparseAttention(**{**SPARSE, "dense_steps": 0.5}), lambda: _run(model, inputs))
    assert stats.dense_scheduled == 3 * layers  # ceil(0.5 * 6) steps


def test_fractional_dense_steps_need_the_step_count(built):
    model, inputs, _ = built("digits-dit")
    sa.apply(model, sa.SparseAttention(dense_steps=0.25))
    try:
        with pytest.raises(ValueError, match="dense_steps"):
            _run(model, inputs, steps=1)
        sa.set_num_inference_steps(model, 4)
        _run(model, inputs, steps=1)
    finally:
        sa.remove(model)


@pytest.mark.parametrize("every, builds", [(1, STEPS), (2, 3), (4, 2), (100, 1)])
def test_masks_rebuilt_every_k_steps(built, every, builds):
    model, inputs, _ = built("digits-dit")
    layers = len(sa.attention_layers(model))
    _, stats = _with(model, sa.SparseAttention(**SPARSE, rebuild_every=every), lambda: _run(model, inputs))
    assert stats.masks_built == builds * layers


def test_shape_only_patterns_build_once(built):
    model, inputs, _ = built("wan")
    _, stats = _with(model, sa.SparseAttention(pattern="sliding_tile", **SPARSE), lambda: _run(model, inputs))
    assert stats.masks_built == 1 and stats.sparse == STEPS * 3


def test_cfg_branches_keep_separate_masks(built):
    model, inputs, _ = built("digits-dit")
    layers = len(sa.attention_layers(model))

    def two_branches():
        with torch.no_grad():
            for i in range(STEPS):
                for name in ("cond", "uncond"):
                    with sc.branch(name, step=i):
                        model(**inputs(i))

    _, per_branch = _with(model, sa.SparseAttention(**SPARSE, rebuild_every=STEPS), two_branches)
    assert per_branch.masks_built == 2 * layers
    _, shared = _with(model, sa.SparseAttention(**SPARSE, rebuild_every=STEPS, per_branch=False), two_branches)
    assert shared.masks_built == layers


def test_new_run_rebuilds_masks(built):
    model, inputs, _ = built("digits-dit")
    layers = len(sa.attention_layers(model))
    _, stats = _with(model, sa.SparseAttention(**SPARSE, rebuild_every=100),
                     lambda: (_run(model, inputs), _run(model, inputs)))
    assert stats.masks_built == 2 * layers  # the step count restarts at STEPS


# -- fallbacks --------------------------------------------------------------------------------------------

def test_unsupported_head_dim_falls_back_with_reason(caplog):
    model, inputs = tiny_flux(head_dim=8, side=8)  # head dim 8: not a kernel size
    model.eval()
    dense = _run(model, inputs, steps=2)
    with caplog.at_level(logging.DEBUG, logger="stepfuse.attention"):
        out, stats = _with(model, sa.SparseAttention(**SPARSE), lambda: _run(model, inputs, steps=2))
    assert stats.sparse == 0 and stats.fallbacks == {"head dim 8 (supported: multiples of 16 up to 128)": stats.calls}
    assert all(torch.equal(a, b) for a, b in zip(out, dense))
    assert "head dim 8" in caplog.text
    info = stepfuse.build_info()
    assert "head dim 8" in info["sparse_attention_fallbacks"] and "cpu: C++ kernel" in info["sparse_attention"]


def test_short_sequence_falls_back(built):
    model, inputs, dense = built("digits-dit")
    out, stats = _with(model, sa.SparseAttention(**{**SPARSE, "block_size": 32}), lambda: _run(model, inputs, 1))
    assert stats.sparse == 0 and any("shorter than 4 blocks" in r for r in stats.fallbacks)
    assert torch.equal(out[0], dense[0])


def test_layer_called_outside_forward_falls_back(built):
    model, _, _ = built("digits-dit")
    name, layer = sa.attention_layers(model)[0]
    x = torch.randn(1, 64, 96)
    expected = layer(x)
    _, stats = _with(model, sa.SparseAttention(**SPARSE), lambda: torch.testing.assert_close(layer(x), expected))
    assert list(stats.fallbacks) == ["layer called outside the model's forward"]


# -- accelerate -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dit_pipe():
    pipe = models.load("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps=8):
    return pipe(class_labels=[1, 7], num_inference_steps=steps, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_accelerate_installs_and_restores_sparse_attention(dit_pipe):
    stepfuse.accelerate(dit_pipe, solver="dpmpp_2m")
    try:
        dense = _sample(dit_pipe)
        stepfuse.accelerate(dit_pipe, solver="dpmpp_2m", attention=sa.SparseAttention(block_size=16))
        sparse = _sample(dit_pipe)
        stats = sa.stats(dit_pipe.transformer)
        # The default schedule: dense for the first 20% of steps (2 of 8) and the first layer.
        assert stats.calls == 8 * 6 and stats.dense_scheduled == 2 * 6 + 6 * 1 and stats.sparse == 6 * 5
        assert metrics.psnr(sparse, dense) > 25.0
        stepfuse.accelerate(dit_pipe, solver="dpmpp_2m", attention=sa.SparseAttention(block_size=16),
                            cache=sc.FirstBlockCache(threshold=0.05))
        both = _sample(dit_pipe)
        assert metrics.psnr(both, dense) > 20.0 and sa.stats(dit_pipe.transformer).calls > 0
    finally:
        stepfuse.restore(dit_pipe)
    assert not hasattr(dit_pipe.transformer, "_stepfuse_attention")
    assert not hasattr(dit_pipe.transformer, "_stepfuse_cache")
    assert all(not type(m.processor).__name__.startswith("BlockSparse")
               for _, m in sa.attention_layers(dit_pipe.transformer))


def test_accelerate_rejects_bad_attention(dit_pipe):
    with pytest.raises(TypeError, match="attention"):
        stepfuse.accelerate(dit_pipe, attention="sparse")
    unet_pipe = models.load("digits-unet")
    with pytest.raises(ValueError, match="attention"):
        stepfuse.accelerate(unet_pipe, attention=sa.SparseAttention())


# -- bad input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, name", [
    (dict(pattern="dense"), ValueError, "pattern"),
    (dict(block_size=48), ValueError, "block_size"),
    (dict(block_size=True), ValueError, "block_size"),
    (dict(mass=0.0), ValueError, "mass"),
    (dict(mass=1.5), ValueError, "mass"),
    (dict(mass=None), ValueError, "mass or top_k"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(min_blocks=0), ValueError, "min_blocks"),
    (dict(sinks=-1), ValueError, "sinks"),
    (dict(window=(3, 2, 3)), ValueError, "window"),
    (dict(window=(3, 3)), ValueError, "window"),
    (dict(tile=(4, 0, 4)), ValueError, "tile"),
    (dict(decay=0), ValueError, "decay"),
    (dict(dense_steps=1.0), ValueError, "dense_steps"),
    (dict(dense_steps=-1), ValueError, "dense_steps"),
    (dict(dense_steps="2"), TypeError, "dense_steps"),
    (dict(dense_layers=-1), ValueError, "dense_layers"),
    (dict(rebuild_every=0), ValueError, "rebuild_every"),
    (dict(per_branch=1), TypeError, "per_branch"),
    (dict(profile_rows=0), ValueError, "profile_rows"),
])
def test_config_rejects_bad_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        sa.SparseAttention(**kwargs)


def test_default_block_size_follows_the_device():
    # 128-token blocks on a GPU (the Triton kernel's 128-row tiles), 64 on the CPU, smaller when
    # the sequence would not make min_blocks_per_side blocks; an explicit size always wins.
    cfg = sa.SparseAttention()
    assert cfg.pick_block_size(8192) == 64 and cfg.pick_block_size(8192, on_gpu=True) == 128
    assert cfg.pick_block_size(256, on_gpu=True) == 64 and cfg.pick_block_size(100) == 32
    assert sa.SparseAttention(block_size=32).pick_block_size(8192, on_gpu=True) == 32


def test_apply_rejects_bad_input(built):
    model, _, _ = built("digits-dit")
    with pytest.raises(TypeError, match="model"):
        sa.apply("model")
    with pytest.raises(TypeError, match="config"):
        sa.apply(model, {"pattern": "adaptive"})
    with pytest.raises(ValueError, match="num_inference_steps"):
        sa.apply(model, num_inference_steps=0)
    with pytest.raises(ValueError, match="not supported"):
        sa.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no sparse attention"):
        sa.stats(model)
    sa.apply(model)
    try:
        with pytest.raises(ValueError, match="already"):
            sa.apply(model)
    finally:
        sa.remove(model)
    with pytest.raises(ValueError, match="no sparse attention"):
        sa.remove(model)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_attention_on_cuda(dtype):
    model, inputs = tiny_wan(head_dim=16, frames=4, side=16)
    model = model.to("cuda", dtype).eval()
    on_gpu = lambda i: {k: v.to("cuda", dtype) if v.is_floating_point() else v.cuda()  # noqa: E731
                        for k, v in inputs(i).items()}
    dense = _run(model, on_gpu, steps=2)
    out, stats = _with(model, sa.SparseAttention(**KEEP_ALL), lambda: _run(model, on_gpu, steps=2))
    assert stats.sparse == stats.calls > 0 and not stats.fallbacks
    for a, b in zip(out, dense):
        assert relative_error(a.float(), b.float()) < (1e-4 if dtype == torch.float32 else 2e-2)
    for pattern in ("adaptive", "sliding_tile", "radial", "per_head"):
        _, stats = _with(model, sa.SparseAttention(pattern=pattern, window=(1, 1, 1), **SPARSE),
                         lambda: _run(model, on_gpu, steps=2))
        assert stats.sparse == stats.calls > 0 and stats.density < 1.0 and not stats.fallbacks
