"""Sparse attention inside a diffusers transformer: processors, the schedule and fallbacks.

Every self-attention (or joint-attention) layer gets a :class:`BlockSparseAttnProcessor` wrapping
the processor it had.  The wrapped processor runs unchanged (projections, norms, rotary
embeddings); only its ``scaled_dot_product_attention`` call is routed, through a
``TorchFunctionMode`` active for that call, to stepfuse's block-sparse kernel with the layer's
mask.  Whatever the kernels cannot take (an attention mask, dropout, causal or cross-attention, a
head dim or device they do not support, diffusers attention backends other than the native one)
runs the original call, and the reason is counted in :func:`stats`, logged once at DEBUG level on
the ``stepfuse.attention`` logger and listed by ``stepfuse info``.

The model's forward is wrapped too: it reads the call's geometry (latent grid, prompt tokens) and
the denoising step and CFG branch (named by the stepfuse Sampler, :func:`stepfuse.cache.branch`
or diffusers' ``cache_context``), which decide whether a layer runs dense, reuses its mask or
builds a new one.
"""

from __future__ import annotations

import collections
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .config import SparseAttention

__all__ = ["AttentionStats", "AttentionRuntime", "BlockSparseAttnProcessor", "FALLBACKS", "attention_layers"]

logger = logging.getLogger("stepfuse.attention")

#: Reasons attention fell back to dense SDPA in this process, with counts (``stepfuse info`` lists them).
FALLBACKS: "collections.Counter[str]" = collections.Counter()

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: What runs block-sparse; anything else runs dense SDPA with its reason recorded.
SUPPORTED = ("self/joint attention without mask, dropout or causal masking; head dims 16 to 128 in steps of 16; "
             "float16, bfloat16, float32; forward only")


@dataclass
class AttentionStats:
    """What the attention layers ran since install (or the last reset)."""

    calls: int = 0  # attention calls seen
    sparse: int = 0  # run block-sparse
    dense_scheduled: int = 0  # dense by the schedule (early steps, first layers)
    fallbacks: Dict[str, int] = field(default_factory=dict)  # dense because unsupported: reason -> calls
    masks_built: int = 0
    kept_blocks: float = 0.0  # sum over sparse calls of the fraction of block pairs computed

    @property
    def density(self) -> float:
        """Mean fraction of (query block, key block) pairs the sparse calls computed."""
        return self.kept_blocks / self.sparse if self.sparse else 1.0

    @property
    def attention_saved(self) -> float:
        """Fraction of all attention block pairs skipped (dense calls count as nothing skipped)."""
        return (self.sparse - self.kept_blocks) / self.calls if self.calls else 0.0


# -- which layers, and the geometry of a call ------------------------------------------------------------

@dataclass(frozen=True)
class _Family:
    layers: Callable[[torch.nn.Module], List[Tuple[str, torch.nn.Module]]]
    grid: Callable[[torch.nn.Module, tuple, dict], Tuple[int, int, int]]  # latent tokens (t, h, w)
    prompt_position: str = "first"  # where joint attention puts the prompt tokens


def _blocks_attr(*pairs: Tuple[str, str]) -> Callable:
    def layers(model):
        out = []
        for blocks, attr in pairs:
            for i, block in enumerate(getattr(model, blocks, None) or ()):
                module = getattr(block, attr, None)
                if module is not None:
                    out.append((f"{blocks}.{i}.{attr}", module))
        return out

    return layers


def _hidden(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _patch(value) -> Tuple[int, int, int]:
    if isinstance(value, int):
        return (1, value, value)
    return tuple(int(v) for v in value) if len(value) == 3 else (1, int(value[0]), int(value[1]))


def _image_grid(model, args, kwargs):
    x = _hidden(args, kwargs)  # (B, C, H, W)
    _, p, q = _patch(model.config.patch_size)
    return (1, x.shape[-2] // p, x.shape[-1] // q)


def _video_grid(model, args, kwargs):
    x = _hidden(args, kwargs)  # (B, C, F, H, W)
    t, p, q = _patch(model.config.patch_size)
    return (x.shape[-3] // t, x.shape[-2] // p, x.shape[-1] // q)


def _flux_grid(model, args, kwargs):
    # Packed latents: the (row, column) of every image token is in img_ids (columns 1 and 2).
    ids = kwargs.get("img_ids")
    x = _hidden(args, kwargs)
    if ids is None:
        side = int(round(x.shape[1] ** 0.5))
        return (1, side, x.shape[1] // side)
    ids = ids[0] if ids.dim() == 3 else ids
    rows = int(ids[:, 1].max()) - int(ids[:, 1].min()) + 1  # one host read per geometry (cached by shape)
    return (1, rows, x.shape[1] // rows)


_FAMILIES: Dict[str, _Family] = {
    "DiTTransformer2DModel": _Family(_blocks_attr(("transformer_blocks", "attn1")), _image_grid),
    "PixArtTransformer2DModel": _Family(_blocks_attr(("transformer_blocks", "attn1")), _image_grid),
    "FluxTransformer2DModel": _Family(_blocks_attr(("transformer_blocks", "attn"),
                                                   ("single_transformer_blocks", "attn")), _flux_grid),
    "SD3Transformer2DModel": _Family(_blocks_attr(("transformer_blocks", "attn"), ("transformer_blocks", "attn2")),
                                     _image_grid, prompt_position="last"),
    "WanTransformer3DModel": _Family(_blocks_attr(("blocks", "attn1")), _video_grid),
}


def attention_layers(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """The self- and joint-attention layers stepfuse makes sparse, in the model's order."""
    family = _FAMILIES.get(type(model).__name__)
    if family is None:
        raise ValueError(f"stepfuse.attention: {type(model).__name__} is not supported; supported models: "
                         f"{', '.join(_FAMILIES)}")
    layers = family.layers(model)
    # Cross-attention (keys from the prompt) is never made sparse: its keys are few and all relevant.
    return [(n, m) for n, m in layers if not getattr(m, "is_cross_attention", False)]


# -- the processor ---------------------------------------------------------------------------------------

class _Route(TorchFunctionMode):
    """Sends the wrapped processor's ``scaled_dot_product_attention`` to the runtime (only while it runs)."""

    def __init__(self, runtime: "AttentionRuntime", layer: int):
        super().__init__()
        self.runtime, self.layer = runtime, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.runtime.attend(self.layer, func, args, kwargs)
        return func(*args, **kwargs)


class BlockSparseAttnProcessor:
    """A diffusers attention processor that runs ``inner`` with block-sparse attention.

    diffusers filters the keyword arguments a processor accepts by the signature of its
    ``__call__``; the per-class subclass made by :meth:`wrap` carries the wrapped processor's.
    """

    _FORWARDED = ("_attention_backend", "_parallel_config")

    def __init__(self, inner, runtime: "AttentionRuntime", layer: int):
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "layer", layer)

    @classmethod
    def wrap(cls, inner, runtime: "AttentionRuntime", layer: int) -> "BlockSparseAttnProcessor":
        return _processor_class(type(inner))(inner, runtime, layer)

    def __getattr__(self, name):  # only reached for names this wrapper does not have
        return getattr(object.__getattribute__(self, "inner"), name)

    def __setattr__(self, name, value):
        # set_attention_backend() / parallel configs address the processor: they belong to the inner one.
        if name in self._FORWARDED:
            setattr(self.inner, name, value)
        else:
            object.__setattr__(self, name, value)

    def _run(self, attn, args, kwargs):
        with _Route(self.runtime, self.layer):
            return self.inner(attn, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def _processor_class(inner_cls: type) -> type:
    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, args, kwargs)

    functools.update_wrapper(__call__, inner_cls.__call__)  # __wrapped__: diffusers sees the inner signature
    return type(f"BlockSparse{inner_cls.__name__}", (BlockSparseAttnProcessor,),
                {"__call__": __call__, "__module__": __name__})


# -- the runtime -------------------------------------------------------------------------------------------

@dataclass
class _Call:
    branch: str
    step: int
    dense: bool  # the schedule's dense steps
    grid: Optional[Tuple[int, int, int]]
    image_tokens: int
    total: Optional[int]


@dataclass
class _BranchState:
    calls: int = 0  # model calls seen (the step when the caller does not name it)
    masks: Dict[int, Tuple[int, object]] = field(default_factory=dict)  # layer -> (step built, mask)


class AttentionRuntime:
    """The installed state of :func:`stepfuse.attention.apply` on one model."""

    def __init__(self, model: torch.nn.Module, config: SparseAttention, num_inference_steps: Optional[int] = None):
        self.model, self.config = model, config
        self.family = _FAMILIES.get(type(model).__name__)
        self.layers = attention_layers(model)
        if not self.layers:
            raise ValueError(f"stepfuse.attention: {type(model).__name__} has no attention layers to make sparse")
        self.num_inference_steps = num_inference_steps
        self.stats = AttentionStats()
        self.branches: Dict[str, _BranchState] = {}
        self.context = None  # diffusers' CacheContext, relayed by the context hook
        self.call: Optional[_Call] = None
        self._geometry: Dict[tuple, Tuple[int, int, int]] = {}
        self._static: Dict[tuple, object] = {}  # shape-only masks
        self._layouts: Dict[tuple, object] = {}  # TileLayouts by (grid, tile)
        self._originals: List[Tuple[torch.nn.Module, object]] = []
        self._forward = None
        self._logged: set = set()
        self._kept: Optional[torch.Tensor] = None  # density of the sparse calls not yet added to stats

    def resolve(self) -> AttentionStats:
        """The stats with the device-side density sums read (one host read, when asked)."""
        if self._kept is not None:
            self.stats.kept_blocks += float(self._kept)
            self._kept = None
        return self.stats

    # -- installation --------------------------------------------------------------------------------
    def install(self) -> None:
        for index, (_, module) in enumerate(self.layers):
            self._originals.append((module, module.processor))
            module.set_processor(BlockSparseAttnProcessor.wrap(module.processor, self, index))
        self._forward = self.model.__dict__.get("forward")
        original = self.model.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if self.call is not None:  # re-entrant call: part of the current one
                return original(*args, **kwargs)
            self._enter(args, kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                self._exit()

        self.model.forward = forward

    def uninstall(self) -> None:
        for module, processor in self._originals:
            module.set_processor(processor)
        self._originals.clear()
        if self._forward is None:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self._forward
        self.release()

    def release(self) -> None:
        """Drop every mask and step count (a new run)."""
        self.branches.clear()

    # -- steps and branches ------------------------------------------------------------------------
    def _branch(self) -> Tuple[str, Optional[int]]:
        from ..cache.runtime import _BRANCH  # the names the Sampler gives its calls

        name, step = _BRANCH.get() or (None, None)
        if name is None and self.context is not None:
            name, step = getattr(self.context, "name", None), getattr(self.context, "step_index", None)
        return (name or "default") if self.config.per_branch else "default", step

    def _steps(self) -> Optional[int]:
        ctx_steps = getattr(self.context, "num_inference_steps", None)
        return ctx_steps if ctx_steps else self.num_inference_steps

    @torch.compiler.disable
    def _enter(self, args, kwargs) -> None:
        name, step = self._branch()
        state = self.branches.setdefault(name, _BranchState())
        total = self._steps()
        if step is None:
            step = state.calls
            if total is not None and step >= total:  # a new run through the same model
                state.calls, state.masks, step = 0, {}, 0
        elif step < state.calls - 1:
            state.masks = {}  # the caller named an earlier step: a new run
        state.calls = step + 1
        hidden = _hidden(args, kwargs)
        key = (tuple(hidden.shape), type(self.model).__name__)
        grid = self._geometry.get(key)
        if grid is None and self.family is not None:
            grid = self._geometry[key] = self.family.grid(self.model, args, kwargs)
        image_tokens = grid[0] * grid[1] * grid[2] if grid is not None else 0
        dense = step < self.config.dense_step_count(total)
        self.call = _Call(name, step, dense, grid, image_tokens, total)

    def _exit(self) -> None:
        self.call = None

    # -- one attention call ------------------------------------------------------------------------
    def _fallback(self, layer: int, reason: str) -> None:
        self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1
        FALLBACKS[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            logger.debug("stepfuse.attention: %s layer %s runs dense SDPA: %s", type(self.model).__name__,
                         self.layers[layer][0], reason)

    def _unsupported(self, args, kwargs) -> Optional[str]:
        """Why this SDPA call cannot run block-sparse (None when it can)."""
        from .triton_kernel import SUPPORTED_HEAD_DIMS

        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        q, k, v = bound.get("query"), bound.get("key"), bound.get("value")
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            return "inputs are not 4-D (batch, heads, tokens, head dim) tensors"
        if bound.get("attn_mask") is not None:
            return "an attention mask is given"
        if bound.get("dropout_p", 0.0):
            return "attention dropout is on"
        if bound.get("is_causal", False):
            return "causal attention"
        if bound.get("enable_gqa", False) or q.shape[1] != k.shape[1]:
            return "grouped-query attention"
        if q.shape[2] != k.shape[2]:
            return "cross-attention (query and key lengths differ)"
        if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
            return f"head dim {q.shape[-1]} (supported: multiples of 16 up to {SUPPORTED_HEAD_DIMS[-1]})"
        if q.dtype not in _SUPPORTED_DTYPES or not (q.dtype == k.dtype == v.dtype):
            return f"dtype {q.dtype}"
        if q.device.type == "cuda":
            import importlib.util

            if importlib.util.find_spec("triton") is None:
                return "CUDA tensors need Triton, which is not installed"
        elif q.device.type != "cpu":
            return f"device {q.device.type} (supported: cpu, cuda)"
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return "gradients are required (the kernels are forward-only)"
        return None

    def attend(self, layer: int, sdpa, args, kwargs):
        call, stats = self.call, self.stats
        stats.calls += 1
        if call is None:  # the layer ran outside the model's forward (called directly)
            self._fallback(layer, "layer called outside the model's forward")
            return sdpa(*args, **kwargs)
        if call.dense or layer < self.config.dense_layers:
            stats.dense_scheduled += 1
            return sdpa(*args, **kwargs)
        reason = self._unsupported(args, kwargs)
        q, k, v = (kwargs.get(n, a) for n, a in zip(("query", "key", "value"), args + (None,) * 3))
        if reason is None:
            block = self.config.pick_block_size(q.shape[2], on_gpu=q.is_cuda)
            if -(-q.shape[2] // block) < self.config.min_blocks_per_side:
                reason = f"sequence of {q.shape[2]} tokens is shorter than {self.config.min_blocks_per_side} blocks"
        if reason is not None:
            self._fallback(layer, reason)
            return sdpa(*args, **kwargs)
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        return self._sparse(layer, call, q, k, v, block, scale)

    def _prompt(self, call: _Call, seq_len: int) -> Tuple[int, str]:
        position = self.family.prompt_position if self.family is not None else "first"
        prompt = seq_len - call.image_tokens if call.image_tokens and seq_len > call.image_tokens else 0
        return prompt, position

    def _sparse(self, layer: int, call: _Call, q, k, v, block: int, scale):
        from ..ops.attention import block_sparse_attention
        from . import masks

        cfg, stats = self.config, self.stats
        prompt, position = self._prompt(call, q.shape[2])
        prompt_args = dict(prompt_tokens=prompt, prompt_position=position)
        layout = None
        if cfg.pattern == "sliding_tile":
            tile = cfg.tile or _default_tile(call.grid, block)
            layout = self._layouts.get((call.grid, tile))
            if layout is None:  # kept: it holds the gather indices on the device
                layout = self._layouts[(call.grid, tile)] = masks.TileLayout(call.grid, tile)
            q, k, v = (layout.reorder(t, 2, prompt_tokens=prompt, prompt_position=position) for t in (q, k, v))
        if cfg.data_dependent:
            state = self.branches[call.branch]
            built = state.masks.get(layer)
            if built is None or call.step - built[0] >= cfg.rebuild_every or built[1].q_len != q.shape[2] \
                    or built[1].kv_num_blocks.shape[0] != q.shape[0]:
                mask = self._build(q, k, v, call, block, scale, prompt_args)
                state.masks[layer] = (call.step, mask)
                stats.masks_built += 1
            mask = state.masks[layer][1]
        else:
            key = (cfg.pattern, q.shape[0], q.shape[1], q.shape[2], call.grid, block, prompt, position, q.device)
            mask = self._static.get(key)
            if mask is None:
                mask = self._static[key] = self._build(q, k, v, call, block, scale, prompt_args)
                stats.masks_built += 1
        out = block_sparse_attention(q, k, v, mask.kv_num_blocks, mask.kv_indices, block_size=block, scale=scale,
                                     layout="bhsd", check_indices=False)  # built here: valid, no host read
        stats.sparse += 1
        # Summed on the mask's device and read when stats are asked for: no host sync per call.
        kept = mask.density_tensor
        self._kept = kept if self._kept is None else self._kept + kept.to(self._kept.device)
        if layout is not None:
            out = layout.restore(out, 2, prompt_tokens=prompt, prompt_position=position)
        return out

    def _build(self, q, k, v, call: _Call, block: int, scale, prompt_args: dict):
        from . import masks

        cfg = self.config
        b, h = q.shape[0], q.shape[1]
        if cfg.pattern == "adaptive":
            return masks.adaptive_mask(q, k, block_size=block, top_k=cfg.top_k, mass=cfg.mass,
                                       min_blocks=cfg.min_blocks, sinks=cfg.sinks, scale=scale,
                                       # without dense_prompt the scores choose prompt blocks like any other
                                       prompt_tokens=prompt_args["prompt_tokens"] if cfg.dense_prompt else 0,
                                       prompt_position=prompt_args["prompt_position"])
        if call.grid is None:
            raise ValueError(f"stepfuse.attention: the {cfg.pattern} pattern needs the latent grid of "
                             f"{type(self.model).__name__}, which stepfuse does not know")
        if cfg.pattern == "per_head":
            # Patterns are judged by the attention output they give (Sparse VideoGen), hence v.
            mask, _ = masks.profile_head_patterns(q, k, call.grid, v=v, num_rows=cfg.profile_rows, block_size=block,
                                                  sinks=cfg.sinks, scale=scale, **prompt_args)
            return mask
        if cfg.pattern == "sliding_tile":
            mask = masks.sliding_tile_mask(call.grid, cfg.tile or _default_tile(call.grid, block), cfg.window,
                                           block_size=block, sinks=cfg.sinks, **prompt_args)
        else:
            mask = masks.radial_mask(call.grid, block_size=block, decay=cfg.decay, sinks=cfg.sinks, **prompt_args)
        return mask.to(q.device).expand(b, h)


def _default_tile(grid: Tuple[int, int, int], block: int) -> Tuple[int, int, int]:
    """A tile of exactly ``block`` tokens, so tiles and blocks line up: near-cubic for video
    ((4, 4, 4) for 64, as Sliding Tile Attention uses), flat for a single frame ((1, 8, 8))."""
    n = block.bit_length() - 1  # block sizes are powers of two
    te = min(n // 3, grid[0].bit_length() - 1)  # a tile no deeper than the video
    he = (n - te) // 2
    return (1 << te, 1 << he, 1 << (n - te - he))
