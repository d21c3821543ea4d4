"""Where each supported model keeps its blocks, how a block's hidden states go in and come out,
and which tensor TeaCache watches.

A block stack is one or more ``nn.ModuleList`` attributes seen as a single sequence (Flux: the
dual-stream ``transformer_blocks`` then the ``single_transformer_blocks``).  Every block in the
stack reads ``hidden_states`` (and, for the joint-attention models, ``encoder_hidden_states``)
and returns them, either alone or as an ``(encoder_hidden_states, hidden_states)`` pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["BlockIO", "BlockStack", "block_stack", "unet_blocks", "UNetBlocks"]


@dataclass(frozen=True)
class BlockIO:
    """How a block's forward takes and returns its hidden states.

    Args:
        pair: the block returns ``(encoder_hidden_states, hidden_states)`` (Flux, SD3) rather
            than ``hidden_states`` alone (DiT, Wan).
        hidden_position / encoder_position: positional index of the argument when not passed by
            keyword (-1: keyword only).
    """

    pair: bool = False
    hidden_position: int = 0
    encoder_position: int = 1

    def read(self, args: tuple, kwargs: dict) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        hidden = _argument(args, kwargs, "hidden_states", self.hidden_position)
        encoder = _argument(args, kwargs, "encoder_hidden_states", self.encoder_position) if self.pair else None
        return hidden, encoder

    def write(self, args: tuple, kwargs: dict, hidden: torch.Tensor,
              encoder: Optional[torch.Tensor]) -> Tuple[tuple, dict]:
        """The call's arguments with new hidden (and encoder) states."""
        args, kwargs = list(args), dict(kwargs)
        _set_argument(args, kwargs, "hidden_states", self.hidden_position, hidden)
        if self.pair:
            _set_argument(args, kwargs, "encoder_hidden_states", self.encoder_position, encoder)
        return tuple(args), kwargs

    def unpack(self, output) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.pair:
            encoder, hidden = output
            return hidden, encoder
        return output, None

    def pack(self, hidden: torch.Tensor, encoder: Optional[torch.Tensor]):
        return (encoder, hidden) if self.pair else hidden


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    if 0 <= position < len(args):
        return args[position]
    return None


def _set_argument(args: list, kwargs: dict, name: str, position: int, value) -> None:
    if name in kwargs or not 0 <= position < len(args):
        kwargs[name] = value
    else:
        args[position] = value


def _norm1_indicator(block, args, kwargs, hidden):
    # The first block's timestep-modulated input (TeaCache, eq. 4): its AdaLN norm1 output.
    if getattr(block, "norm_type", None) == "ada_norm_zero":  # DiT's BasicTransformerBlock
        return block.norm1(hidden, kwargs.get("timestep"), kwargs.get("class_labels"), hidden_dtype=hidden.dtype)[0]
    temb = _argument(args, kwargs, "temb", 2)
    return block.norm1(hidden, emb=temb)[0]


def _timestep_indicator(block, args, kwargs, hidden):
    # Wan's blocks modulate inside forward; TeaCache4Wan watches the timestep projection instead.
    return _argument(args, kwargs, "temb", 2)


@dataclass
class BlockStack:
    """The cacheable blocks of a transformer, flattened, with their I/O convention."""

    model_name: str
    names: Tuple[str, ...]
    blocks: List[torch.nn.Module]
    io: List[BlockIO]
    indicator: Callable
    inplace: bool = False  # the span's input is an intermediate of the model's forward (known models)

    def __len__(self) -> int:
        return len(self.blocks)


# Known transformers: (block list attributes, I/O per list, TeaCache indicator).
_TRANSFORMERS: Dict[str, Tuple[Tuple[str, ...], Tuple[BlockIO, ...], Callable]] = {
    "DiTTransformer2DModel": (("transformer_blocks",), (BlockIO(),), _norm1_indicator),
    "PixArtTransformer2DModel": (("transformer_blocks",), (BlockIO(),), _norm1_indicator),
    "FluxTransformer2DModel": (("transformer_blocks", "single_transformer_blocks"),
                               (BlockIO(pair=True, hidden_position=-1, encoder_position=-1),) * 2, _norm1_indicator),
    "SD3Transformer2DModel": (("transformer_blocks",), (BlockIO(pair=True, hidden_position=-1, encoder_position=-1),),
                              _norm1_indicator),
    "WanTransformer3DModel": (("blocks",), (BlockIO(),), _timestep_indicator),
}
_SEARCHED = ("transformer_blocks", "single_transformer_blocks", "blocks")


def block_stack(model: torch.nn.Module, blocks: Optional[Sequence[str]] = None) -> BlockStack:
    """The block stack of ``model``: a known diffusers transformer, or the ``blocks`` attributes
    given (blocks returning ``hidden_states`` alone, watched through their input)."""
    name = type(model).__name__
    known = _TRANSFORMERS.get(name)
    if blocks is not None:
        if isinstance(blocks, str):
            blocks = (blocks,)
        names = tuple(blocks)
        ios = known[1] if known is not None and known[0] == names else (BlockIO(),) * len(names)
        indicator = known[2] if known is not None else (lambda block, args, kwargs, hidden: hidden)
    elif known is not None:
        names, ios, indicator = known
    else:
        found = [n for n in _SEARCHED if isinstance(getattr(model, n, None), torch.nn.ModuleList)]
        raise ValueError(
            f"stepfuse.cache: {name} is not a supported transformer (supported: {sorted(_TRANSFORMERS)}); "
            + (f"it has block lists {found}: pass blocks=[...] to use them" if found else
               f"it has none of the block lists {list(_SEARCHED)}"))
    flat, flat_io = [], []
    for attr, io in zip(names, ios):
        modules = getattr(model, attr, None)
        if not isinstance(modules, torch.nn.ModuleList) or len(modules) == 0:
            raise ValueError(f"stepfuse.cache: {name} has no non-empty block list '{attr}' (an nn.ModuleList)")
        flat.extend(modules)
        flat_io.extend([io] * len(modules))
    return BlockStack(name, names, flat, flat_io, indicator, inplace=known is not None and known[0] == names)


@dataclass
class UNetBlocks:
    """A diffusers UNet's down, mid and up blocks (``UNet2DModel``, ``UNet2DConditionModel``)."""

    model_name: str
    down: List[torch.nn.Module]
    mid: Optional[torch.nn.Module]
    up: List[torch.nn.Module]


def unet_blocks(model: torch.nn.Module) -> UNetBlocks:
    name = type(model).__name__
    missing = [a for a in ("down_blocks", "up_blocks") if not isinstance(getattr(model, a, None), torch.nn.ModuleList)]
    if missing:
        raise ValueError(f"stepfuse.cache: DeepCache needs a UNet with down_blocks and up_blocks; {name} lacks {missing}")
    down, up = list(model.down_blocks), list(model.up_blocks)
    if len(down) != len(up) or len(down) < 2:
        raise ValueError(f"stepfuse.cache: DeepCache needs matching down/up blocks (at least 2), {name} has "
                         f"{len(down)} down and {len(up)} up blocks")
    return UNetBlocks(name, down, getattr(model, "mid_block", None), up)
