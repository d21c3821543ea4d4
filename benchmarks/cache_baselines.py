"""Competitor feature caches for the cache benchmark: diffusers' cache hooks and cache-dit.

``bench_cache.py`` runs these next to stepfuse's own caches on the same models, seeds and
schedulers.  Three things live here:

* :func:`count_block_evaluations` counts how often each denoiser block really computes.  Cache
  hooks replace a block's ``forward`` and return early, so counting ``__call__`` would count
  skipped blocks too; instead a forward pre-hook sits on one *probe* submodule that the block's
  own computation always runs (see :func:`block_probe` for the rule).
* :func:`diffusers_cache` installs diffusers' First-Block Cache, TaylorSeer or MagCache with
  diffusers' own parameter names and removes it on exit.
* :func:`cache_dit_cache` installs cache-dit's DBCache (optionally with its TaylorSeer
  calibrator) on a pipeline and removes it on exit.

Versions this was written and checked against: diffusers 0.42.1, cache-dit 1.5.3 (installed
with ``pip install --no-deps cache-dit==1.5.3``; its remaining requirements, packaging and
PyYAML, were already present), torch 2.14.1.

Adaptations, all through the libraries' public extension points:

* ``DiTTransformer2DModel`` does not inherit diffusers' ``CacheMixin`` (no ``enable_cache``), so
  the hooks are installed with ``diffusers.hooks.apply_*`` and removed by name, exactly as
  ``CacheMixin.disable_cache`` removes them.  Its ``BasicTransformerBlock`` is already in
  diffusers' ``TransformerBlockRegistry``, so nothing had to be registered.
* diffusers' block hooks keep their state per *cache context*, which diffusers' own pipelines set
  with ``transformer.cache_context("cond")``.  Pipelines that do not (such as stepfuse's
  ``ClassConditionalPipeline``) get the context set around each denoiser call by a forward
  pre/post hook; it stays out of the way when the caller already set one.  The state is reset at
  the end of every pipeline call through the ``_reset_stateful_cache`` method that diffusers'
  ``DiffusionPipeline.maybe_free_model_hooks`` looks for, which ``CacheMixin`` models already have
  and which is attached to other models for the duration of the context.
* diffusers' TaylorSeer default identifiers (``^transformer_blocks.*attn`` under ``re.fullmatch``)
  match Flux's ``attn`` but not DiT's ``attn1``; rather than silently caching nothing,
  :func:`diffusers_cache` raises and asks for ``cache_identifiers``
  (e.g. ``[r"transformer_blocks\\.\\d+\\.attn1"]`` or whole blocks ``[r"transformer_blocks\\.\\d+"]``).
* MagCache's calibration mode prints the measured ratios; :func:`diffusers_cache` captures that
  output and returns the ratios on the handle (``handle.mag_ratios``).
* cache-dit has a predefined adapter for ``DiTPipeline`` (``ForwardPattern.Pattern_3``: the block
  takes and returns ``hidden_states`` only, plus ``DiTPatchFunctor``, which stops the transformer
  forward from reading ``transformer_blocks[0].norm1`` once the block list is wrapped).  The same
  ``BlockAdapter`` is built here for any pipeline whose ``transformer`` is a
  ``DiTTransformer2DModel``; pipelines cache-dit registers (e.g. ``FluxPipeline``) use its own
  adapter.  cache-dit patches the pipeline *class*'s ``__call__`` while active and leaves the
  patched transformer ``forward`` and a registered ``_norm1_emb`` submodule behind after
  ``cache_dit.disable_cache``; both are undone on exit here so that a later run is the
  never-cached model, state-dict keys included.

Run as a script for a smoke comparison on the bundled ``digits-dit`` model:

    python benchmarks/cache_baselines.py [--steps 50] [--scheduler ddim|dpmpp2m]
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import logging
import re
import sys
from typing import Callable, Iterable, Iterator, List, Optional

import torch

DIFFUSERS_KINDS = ("first_block", "taylorseer", "magcache")
CACHE_DIT_KINDS = ("dbcache", "dbcache_taylorseer")

# Names of the ModuleLists that hold transformer blocks in diffusers' models, in forward order
# (diffusers.hooks._common uses the same names to find blocks).
_BLOCK_LIST_NAMES = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")
_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


# -- counting block evaluations -------------------------------------------------------------------
def denoiser_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The blocks of a diffusers denoiser in forward order: the transformer block lists of
    DiT/Flux/SD3/Wan-style models, or ``down_blocks + mid_block + up_blocks`` of a UNet."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        mid = [model.mid_block] if getattr(model, "mid_block", None) is not None else []
        return [*model.down_blocks, *mid, *model.up_blocks]
    blocks = [b for name in _BLOCK_LIST_NAMES if isinstance(getattr(model, name, None), torch.nn.ModuleList)
              for b in getattr(model, name)]
    if not blocks:
        raise ValueError(f"model ({type(model).__name__}) has none of the block lists {_BLOCK_LIST_NAMES}")
    return blocks


def block_probe(block: torch.nn.Module) -> torch.nn.Module:
    """The submodule whose calls count the evaluations of ``block``.

    Rule: ``resnets[0]`` for UNet blocks (every UNet block's forward starts with its first resnet;
    attention UNet blocks register ``attentions`` before ``resnets``, so registration order would
    pick an attention), otherwise the block's first registered child, descending through
    containers (``ModuleList``, ``ModuleDict``, ``Sequential``) to their first entry.  Transformer
    blocks register first the norm their ``forward`` starts with, which runs unconditionally and
    once per evaluation: ``norm1`` of ``BasicTransformerBlock`` (DiT), ``FluxTransformerBlock``,
    ``JointTransformerBlock`` (SD3) and ``WanTransformerBlock``; ``norm`` of
    ``FluxSingleTransformerBlock``.  The probe need not own parameters (Wan's ``norm1`` has none);
    what matters is that it is not something a cache hook skips on its own (attention,
    feed-forward), so a block whose attention alone is cached still counts as evaluated.
    """
    if not isinstance(block, torch.nn.Module):
        raise TypeError(f"blocks must hold torch.nn.Module instances, got {type(block).__name__}")
    resnets = getattr(block, "resnets", None)
    if isinstance(resnets, torch.nn.ModuleList) and len(resnets) > 0:
        return resnets[0]
    module = block
    while True:
        child = next((c for c in module.children()), None)
        if child is None:
            if module is block:
                raise ValueError(f"block {type(block).__name__} has no submodule to probe; pass probe=")
            return module
        module = child
        if not isinstance(module, _CONTAINERS):
            return module


@dataclasses.dataclass
class BlockEvaluations:
    """Counts filled in by :func:`count_block_evaluations`."""

    per_block: List[int]

    @property
    def evaluated(self) -> int:
        """Block evaluations that really computed, summed over blocks."""
        return sum(self.per_block)

    def reset(self) -> None:
        self.per_block = [0] * len(self.per_block)


@contextlib.contextmanager
def count_block_evaluations(
    blocks: Iterable[torch.nn.Module],
    probe: Optional[Callable[[torch.nn.Module], torch.nn.Module]] = None,
) -> Iterator[BlockEvaluations]:
    """Count how many times each block in ``blocks`` actually computes while the context is open.

    Args:
        blocks: the denoiser's blocks (e.g. :func:`denoiser_blocks`), or any modules.
        probe: ``block -> submodule`` whose calls are counted; :func:`block_probe` by default.
    """
    if isinstance(blocks, torch.nn.Module) and not isinstance(blocks, torch.nn.ModuleList):
        raise TypeError("blocks must be an iterable of modules (a list or ModuleList), not a single module")
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks must not be empty")
    if probe is not None and not callable(probe):
        raise TypeError(f"probe must be callable (block -> submodule), got {type(probe).__name__}")
    probes = [(probe or block_probe)(b) for b in blocks]
    counts = BlockEvaluations([0] * len(blocks))

    def counter(index: int):
        def hook(module, args):
            counts.per_block[index] += 1
        return hook

    handles = [p.register_forward_pre_hook(counter(i)) for i, p in enumerate(probes)]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


# -- shared plumbing -------------------------------------------------------------------------------
def _require(module_name: str, install: str):
    try:
        return __import__(module_name, fromlist=["_"])
    except ImportError as e:
        raise ImportError(f"{module_name} is needed for this baseline; install it with `{install}`") from e


def _check_kind(kind, kinds: tuple) -> None:
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")


def _build_config(config_cls, params: dict, what: str):
    """``config_cls(**params)`` with unknown names reported as a TypeError naming them."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise TypeError(f"{what} does not take {unknown}; its parameters are {sorted(names)}")
    return config_cls(**params)


@contextlib.contextmanager
def _forward_hooks(model: torch.nn.Module, before, after) -> Iterator[None]:
    """``before(args, kwargs)`` / ``after()`` around every call of ``model`` (``after`` also on errors)."""
    handles = [
        model.register_forward_pre_hook(lambda m, args, kwargs: before(args, kwargs), with_kwargs=True),
        model.register_forward_hook(lambda m, args, output: after(), always_call=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- diffusers' cache hooks --------------------------------------------------------------------------
_MAG_RATIOS_MARKER = "[MagCache] Calibration Complete"


@dataclasses.dataclass
class DiffusersCacheHandle:
    """What :func:`diffusers_cache` yields: the diffusers config, a state reset, and (after a run
    with ``calibrate=True``) the MagCache ratios diffusers measured."""

    config: object
    reset: Callable[[], None]
    mag_ratios: Optional[List[float]] = None


def _diffusers_cache_spec(hooks, kind: str):
    """(config class, apply function, hook names to remove) of one diffusers cache."""
    from diffusers.hooks import first_block_cache, mag_cache, taylorseer_cache

    return {
        "first_block": (hooks.FirstBlockCacheConfig, hooks.apply_first_block_cache,
                        (first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK)),
        "taylorseer": (hooks.TaylorSeerCacheConfig, hooks.apply_taylorseer_cache,
                       (taylorseer_cache._TAYLORSEER_CACHE_HOOK,)),
        "magcache": (hooks.MagCacheConfig, hooks.apply_mag_cache,
                     (mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK)),
    }[kind]


def _check_diffusers_target(model: torch.nn.Module, kind: str, config) -> None:
    """Refuse configurations diffusers would apply to nothing or crash on."""
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    from diffusers.hooks._helpers import TransformerBlockRegistry

    if kind == "taylorseer":
        from diffusers.hooks import taylorseer_cache as ts

        if config.use_lite_mode:
            patterns = ts._PROJ_OUT_IDENTIFIERS
        else:
            patterns = [*(config.cache_identifiers or ts._TRANSFORMER_BLOCK_IDENTIFIERS),
                        *(config.skip_predict_identifiers or [])]
        if not any(re.fullmatch(p, name) for name, _ in model.named_modules() for p in patterns):
            raise ValueError(f"TaylorSeer identifiers {list(patterns)} match no submodule of {type(model).__name__}; "
                             r"pass cache_identifiers, e.g. [r'transformer_blocks\.\d+\.attn1']")
        return
    blocks = [b for name, child in model.named_children()
              if name in _ALL_TRANSFORMER_BLOCK_IDENTIFIERS and isinstance(child, torch.nn.ModuleList) for b in child]
    if len(blocks) < (2 if kind == "first_block" else 1):
        raise ValueError(f"{kind} needs transformer block lists named {sorted(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)} "
                         f"on {type(model).__name__}")
    for cls in {type(b) for b in blocks}:
        try:
            TransformerBlockRegistry.get(cls)
        except ValueError as e:
            raise ValueError(f"{cls.__name__} is not in diffusers' TransformerBlockRegistry; register its "
                             "TransformerBlockMetadata with TransformerBlockRegistry.register first") from e


def _state_managers(model: torch.nn.Module) -> list:
    from diffusers.hooks.hooks import StateManager

    return [attr for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None
            for hook in m._diffusers_hook.hooks.values() for attr in vars(hook).values()
            if isinstance(attr, StateManager)]


@contextlib.contextmanager
def diffusers_cache(model: torch.nn.Module, kind: str, **params) -> Iterator[DiffusersCacheHandle]:
    """Install one of diffusers' training-free caches on ``model`` while the context is open.

    Args:
        model: a diffusers transformer (the bundled DiT, ``FluxTransformer2DModel``, ...).
        kind: ``"first_block"`` (``FirstBlockCacheConfig``: ``threshold``), ``"taylorseer"``
            (``TaylorSeerCacheConfig``: ``cache_interval``, ``disable_cache_before_step``,
            ``disable_cache_after_step``, ``max_order``, ``taylor_factors_dtype``,
            ``cache_identifiers``, ``skip_predict_identifiers``, ``use_lite_mode``) or
            ``"magcache"`` (``MagCacheConfig``: ``threshold``, ``max_skip_steps``,
            ``retention_ratio``, ``num_inference_steps``, ``mag_ratios``, ``calibrate``).
        params: the config's fields, with diffusers' names and defaults.

    With ``calibrate=True`` (MagCache) nothing is skipped; after a full run of
    ``num_inference_steps`` denoiser calls ``handle.mag_ratios`` holds the ratios diffusers measured,
    ready for ``mag_ratios=`` of a later run.
    """
    hooks = _require("diffusers.hooks", "pip install diffusers")
    from diffusers.hooks.hooks import CacheContext, HookRegistry

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_kind(kind, DIFFUSERS_KINDS)
    config_cls, apply, hook_names = _diffusers_cache_spec(hooks, kind)
    config = _build_config(config_cls, params, config_cls.__name__)
    _check_diffusers_target(model, kind, config)

    had_registry = {id(m) for m in model.modules() if hasattr(m, "_diffusers_hook")}
    uses_mixin = callable(getattr(model, "enable_cache", None))
    if uses_mixin:
        model.enable_cache(config)
    else:
        apply(model, config)
    root = HookRegistry.check_if_exists_or_initialize(model)
    managers = _state_managers(model)

    def reset() -> None:
        root.reset_stateful_hooks(recurse=True)

    handle = DiffusersCacheHandle(config=config, reset=reset)
    # Set a cache context around calls from pipelines that do not set one themselves.
    owned = []
    captured = []

    def before(args, kwargs):
        if all(sm._context is None for sm in managers):
            for sm in managers:
                sm.set_context(CacheContext("cond"))
            owned.append(True)
        if getattr(config, "calibrate", False):
            redirect = contextlib.redirect_stdout(io.StringIO())
            captured.append((redirect, redirect.__enter__()))

    def after():
        while owned:
            owned.pop()
            for sm in managers:
                sm.set_context(None)
        while captured:
            redirect, buffer = captured.pop()
            redirect.__exit__(None, None, None)
            _take_mag_ratios(buffer.getvalue(), handle)

    # DiffusionPipeline.maybe_free_model_hooks resets models that have this method at the end of a call.
    added_reset = not hasattr(model, "_reset_stateful_cache")
    if added_reset:
        model._reset_stateful_cache = lambda recurse=True: reset()
    try:
        with _forward_hooks(model, before, after):
            yield handle
    finally:
        if added_reset:
            del model._reset_stateful_cache
        if uses_mixin:
            model.disable_cache()
        else:
            for name in hook_names:
                root.remove_hook(name, recurse=True)
            if hasattr(root, "invalidate_child_registries_cache"):
                root.invalidate_child_registries_cache()
        for m in model.modules():
            if id(m) not in had_registry and hasattr(m, "_diffusers_hook") and not m._diffusers_hook.hooks:
                del m._diffusers_hook


def _take_mag_ratios(text: str, handle: DiffusersCacheHandle) -> None:
    """Keep the ratio list MagCache prints after its calibration run; pass other output through."""
    if _MAG_RATIOS_MARKER not in text:
        sys.stdout.write(text)
        return
    head, tail = text.split(_MAG_RATIOS_MARKER, 1)
    sys.stdout.write(head.rstrip("\n"))
    listing = tail[tail.index("["): tail.index("]") + 1]
    handle.mag_ratios = [float(r) for r in ast.literal_eval(listing)]


# -- cache-dit ------------------------------------------------------------------------------------
def _cache_dit_adapter(cache_dit, pipe):
    """The pipeline itself when cache-dit registers it, else a BlockAdapter for a DiT transformer."""
    from cache_dit.caching.block_adapters import BlockAdapterRegister

    if BlockAdapterRegister.is_supported(pipe):
        return pipe
    from diffusers import DiTTransformer2DModel

    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, DiTTransformer2DModel):
        raise ValueError(f"cache-dit has no adapter for {type(pipe).__name__} and its transformer is "
                         f"{type(transformer).__name__}, not DiTTransformer2DModel")
    from cache_dit.caching.patch_functors import DiTPatchFunctor

    # cache-dit's own "DiT" adapter: BasicTransformerBlock takes and returns hidden_states only.
    return cache_dit.BlockAdapter(pipe=pipe, transformer=transformer, blocks=transformer.transformer_blocks,
                                  forward_pattern=cache_dit.ForwardPattern.Pattern_3,
                                  patch_functor=DiTPatchFunctor(), check_forward_pattern=True)


@contextlib.contextmanager
def _restored_attributes(objects: Iterable[object]) -> Iterator[None]:
    """On exit, drop attributes and submodules added to ``objects`` and restore replaced ones."""
    saved = [(obj, dict(vars(obj)), dict(getattr(obj, "_modules", {}))) for obj in objects]
    try:
        yield
    finally:
        for obj, attrs, modules in saved:
            for name in set(vars(obj)) - set(attrs):
                delattr(obj, name)
            for name, value in attrs.items():
                if name != "_modules" and vars(obj).get(name) is not value:
                    object.__setattr__(obj, name, value)
            if isinstance(obj, torch.nn.Module):
                obj._modules.clear()
                obj._modules.update(modules)


@contextlib.contextmanager
def _quiet_loggers(prefix: str, level: int = logging.ERROR) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n.lower().startswith(prefix)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextlib.contextmanager
def cache_dit_cache(pipe, kind: str, taylorseer_order: int = 1, quiet: bool = True, **params) -> Iterator[object]:
    """Install cache-dit's DBCache on a diffusers pipeline while the context is open.

    Args:
        pipe: a ``DiffusionPipeline``: one cache-dit registers (``FluxPipeline``, ...) or one whose
            ``transformer`` is a ``DiTTransformer2DModel`` (the bundled digits-dit pipeline).
        kind: ``"dbcache"`` or ``"dbcache_taylorseer"`` (DBCache with the TaylorSeer calibrator).
        taylorseer_order: order of the TaylorSeer calibrator (cache-dit recommends 1 or 2).
        quiet: silence cache-dit's info/warning logging while installing, running and removing.
        params: ``cache_dit.DBCacheConfig`` fields with cache-dit's names and defaults:
            ``Fn_compute_blocks``, ``Bn_compute_blocks``, ``residual_diff_threshold``,
            ``max_warmup_steps``, ``warmup_interval``, ``max_cached_steps``,
            ``max_continuous_cached_steps``, ``enable_separate_cfg``, ``num_inference_steps``, ...

    Yields the cache-dit ``DBCacheConfig`` in use.
    """
    cache_dit = _require("cache_dit", "pip install --no-deps cache-dit==1.5.3")
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"pipe must be a diffusers DiffusionPipeline, got {type(pipe).__name__}")
    _check_kind(kind, CACHE_DIT_KINDS)
    if kind == "dbcache_taylorseer":
        if isinstance(taylorseer_order, bool) or not isinstance(taylorseer_order, int) or taylorseer_order < 1:
            raise ValueError(f"taylorseer_order must be a positive int, got {taylorseer_order!r}")
    elif taylorseer_order != 1:
        raise ValueError("taylorseer_order applies to kind='dbcache_taylorseer' only")
    config = _build_config(cache_dit.DBCacheConfig, params, "cache_dit.DBCacheConfig")
    calibrator = (cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=taylorseer_order)
                  if kind == "dbcache_taylorseer" else None)
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ValueError(f"pipe ({type(pipe).__name__}) has no transformer for cache-dit to cache")
    watched = [pipe, transformer, *(getattr(transformer, n) for n in _BLOCK_LIST_NAMES
                                   if isinstance(getattr(transformer, n, None), torch.nn.ModuleList))]
    pipe_call = vars(type(pipe)).get("__call__")
    quiet_logs = _quiet_loggers("cache_dit") if quiet else contextlib.nullcontext()
    with quiet_logs, _restored_attributes(watched):
        cache_dit.enable_cache(_cache_dit_adapter(cache_dit, pipe), cache_config=config, calibrator_config=calibrator)
        try:
            yield config
        finally:
            cache_dit.disable_cache(pipe)
            if vars(type(pipe)).get("__call__") is not pipe_call:
                type(pipe).__call__ = pipe_call


# -- smoke demo ------------------------------------------------------------------------------------
def _smoke(argv: Optional[List[str]] = None) -> None:
    import argparse
    import time
    from pathlib import Path

    from stepfuse import metrics, models

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", choices=("ddim", "dpmpp2m"), default="ddim")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1 is steadier on a shared CPU)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row (the fastest is shown)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = models.load("digits-dit")
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler == "dpmpp2m":
        from diffusers import DPMSolverMultistepScheduler

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=2)
    blocks = denoiser_blocks(pipe.transformer)
    labels, steps = list(range(8)), args.steps

    def run():
        with count_block_evaluations(blocks) as counts:
            start = time.perf_counter()
            images = pipe(labels, num_inference_steps=steps, guidance_scale=4.0,
                          generator=torch.Generator().manual_seed(0), output_type="pt").images
            seconds = time.perf_counter() - start
        return images, counts.evaluated, seconds

    def measured():
        """Images and block evaluations of the first run, the fastest of ``repeats`` runs' time."""
        images, evaluated, seconds = run()
        return images, evaluated, min([seconds] + [run()[2] for _ in range(args.repeats - 1)])

    run()  # warm-up: first-call allocations and lazy initialisation
    reference, total, base_seconds = measured()
    rows = [{"baseline": "uncached", "block evals": total, "skipped": "0.00", "time s": f"{base_seconds:.2f}",
             "speedup": "1.00", "PSNR dB": "inf"}]

    with diffusers_cache(pipe.transformer, "magcache", calibrate=True, num_inference_steps=steps) as calib:
        run()
    ratios = calib.mag_ratios

    # TaylorSeer predicts each listed module's output; whole blocks or only their attention.
    blocks_re, attn_re = [r"transformer_blocks\.\d+"], [r"transformer_blocks\.\d+\.attn1"]
    dbcache = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 4}
    configs = [
        *[("diffusers", "first_block", {"threshold": t}, f"threshold={t}") for t in (0.05, 0.1, 0.2)],
        *[("diffusers", "taylorseer", {"cache_interval": n, "cache_identifiers": blocks_re,
                                       "taylor_factors_dtype": torch.float32}, f"blocks interval={n} order=1")
          for n in (2, 4)],
        ("diffusers", "taylorseer", {"cache_interval": 4, "cache_identifiers": attn_re,
                                     "taylor_factors_dtype": torch.float32}, "attn1 interval=4 order=1"),
        *[("diffusers", "magcache", {"threshold": t, "mag_ratios": ratios, "num_inference_steps": steps},
           f"threshold={t} (calibrated)") for t in (0.06, 0.12, 0.24)],
        *[("cache-dit", "dbcache", {**dbcache, "residual_diff_threshold": t}, f"F1B0 W4 threshold={t}")
          for t in (0.08, 0.16, 0.32)],
        *[("cache-dit", "dbcache_taylorseer", {**dbcache, "residual_diff_threshold": 0.16, "taylorseer_order": o},
           f"F1B0 W4 threshold=0.16 order={o}") for o in (1, 2)],
    ]
    for library, kind, params, label in configs:
        cm = diffusers_cache(pipe.transformer, kind, **params) if library == "diffusers" else \
            cache_dit_cache(pipe, kind, **params)
        with cm:
            images, evaluated, seconds = measured()
        rows.append({"baseline": f"{library} {kind} {label}", "block evals": evaluated,
                     "skipped": f"{1 - evaluated / total:.2f}", "time s": f"{seconds:.2f}",
                     "speedup": f"{base_seconds / seconds:.2f}", "PSNR dB": f"{metrics.psnr(images, reference):.1f}"})

    after, evaluated, _ = run()
    identical = torch.equal(after, reference) and evaluated == total
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import format_table

    print(f"digits-dit, {args.scheduler} {steps} steps, 8 labels, guidance 4.0, "
          f"{len(blocks)} blocks x {steps} calls = {total} block evaluations uncached")
    print(format_table(rows, ["baseline", "block evals", "skipped", "time s", "speedup", "PSNR dB"]))
    print(f"uncached run after all baselines identical to the first: {identical}")


if __name__ == "__main__":
    _smoke()
