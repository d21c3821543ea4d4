"""Block masks for block-sparse attention and the builders that make them.

A :class:`BlockMask` is FlexAttention's block description: for every (batch, head, query block)
the number of key blocks it attends (``kv_num_blocks``, int32 ``(B, H, Qb)``) and their indices
(``kv_indices``, int32 ``(B, H, Qb, max_blocks)``, the first ``kv_num_blocks`` entries of a row
are used, ascending).  Blocks hold ``block_size`` tokens; the last one of a sequence may be
partial.  The attention kernels do not broadcast over batch or heads: builders return
``(1, 1, ...)`` masks and :meth:`BlockMask.expand` makes them ``(B, H, ...)``.

Builders
  * :func:`sliding_tile_mask` - Sliding Tile Attention (Zhang et al. 2025, "Fast Video
    Generation with Sliding Tile Attention"): tokens reordered tile by tile (:class:`TileLayout`),
    every query tile attends the tiles of a 3-D window around it, shifted inside the grid.
  * :func:`radial_mask` - Radial Attention (Li et al. 2025, "Radial Attention: O(n log n) Sparse
    Attention with Energy Decay for Long Video Generation"): the spatial window shrinks
    exponentially with the frame distance.
  * :func:`profile_head_patterns` - Sparse VideoGen (Xi et al. 2025, "Sparse VideoGen:
    Accelerating Video Diffusion Transformers with Spatial-Temporal Sparsity"): per head, the
    spatial or the temporal pattern, whichever reproduces a few sampled attention rows better.
  * :func:`adaptive_mask` - data-dependent masks from mean-pooled block scores: the ``top_k``
    best key blocks per query block, or the fewest whose estimated attention mass reaches
    ``mass`` (cumulative threshold, as SpargeAttn (Zhang et al. 2025), XAttention (Xu et al. 2025)
    and FlexPrefill (Lai et al. 2025) select blocks).

Joint attention: ``prompt_tokens`` text tokens sit before (``prompt_position="first"``, Flux) or
after (``"last"``, SD3) the video tokens; they attend everything and everyone attends them.
``sinks``: the key blocks that hold the first ``sinks * block_size`` video tokens are kept for
every query (attention sinks).  When a block straddles the prompt/video boundary, or tiles do
not line up with blocks, a block pair is kept as soon as one token pair in it is allowed: a
block mask is always a superset of the token-level pattern it stands for.

The pure-geometry builders are cached (``functools.lru_cache``) on their arguments, so the
tensors of a returned mask are shared between calls: treat them as read-only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

__all__ = ["BlockMask", "TileLayout", "HeadPatterns", "PATTERNS", "sliding_tile_mask", "radial_mask",
           "profile_head_patterns", "adaptive_mask"]

PATTERNS = ("spatial", "temporal")  # profile_head_patterns' labels, in the order of its ``choice`` values
_PROMPT_POSITIONS = ("first", "last")
_LAYOUTS = ("bhsd", "bshd")


# ---------------------------------------------------------------------------------------------
# argument checks


def _int(fn: str, name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a Python int, got {type(value).__name__}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def _triple(fn: str, name: str, value) -> Tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"{fn}: {name} must be three ints (frames, height, width), got {value!r}")
    return tuple(_int(fn, f"{name}[{i}]", v, 1) for i, v in enumerate(value))


def _prompt(fn: str, prompt_tokens, prompt_position) -> int:
    if prompt_position not in _PROMPT_POSITIONS:
        raise ValueError(f"{fn}: prompt_position must be one of {_PROMPT_POSITIONS}, got {prompt_position!r}")
    return _int(fn, "prompt_tokens", prompt_tokens)


def _device(fn: str, device) -> torch.device:
    try:
        return torch.device(device)
    except (TypeError, RuntimeError):
        raise TypeError(f"{fn}: device must be a torch.device or a device string, got {device!r}") from None


# ---------------------------------------------------------------------------------------------
# BlockMask


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
    """A block-sparse attention pattern (see the module docstring for the fields)."""

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    q_len: int
    kv_len: int

    def __post_init__(self):
        fn = "BlockMask"
        _int(fn, "block_size", self.block_size, 1)
        _int(fn, "q_len", self.q_len, 1)
        _int(fn, "kv_len", self.kv_len, 1)
        num, idx = self.kv_num_blocks, self.kv_indices
        for name, t, dim in (("kv_num_blocks", num, 3), ("kv_indices", idx, 4)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dim:
                raise TypeError(f"{fn}: {name} must be a {dim}-D int32 tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if num.shape[-1] != self.q_blocks or tuple(idx.shape[:3]) != tuple(num.shape):
            raise ValueError(f"{fn}: kv_num_blocks must be (B, H, {self.q_blocks}) for q_len={self.q_len} and "
                             f"block_size={self.block_size}, and kv_indices (B, H, {self.q_blocks}, max_blocks); "
                             f"got {tuple(num.shape)} and {tuple(idx.shape)}")
        if num.device != idx.device:
            raise ValueError(f"{fn}: kv_num_blocks and kv_indices must share a device, got {num.device} and "
                             f"{idx.device}")
        # The index values are not range-checked here (that would read device memory); the
        # builders produce valid ones and the kernels check theirs (check_indices).

    @property
    def q_blocks(self) -> int:
        return -(-self.q_len // self.block_size)

    @property
    def kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_size)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B, H, Qb, Kb)``, the shape of :meth:`to_dense_blocks`."""
        return (*self.kv_num_blocks.shape, self.kv_blocks)

    @property
    def device(self) -> torch.device:
        return self.kv_num_blocks.device

    @functools.cached_property
    def density(self) -> float:
        """The fraction of (query token, key token) pairs that lie in kept blocks, averaged over
        batch and heads: a pair of blocks counts with the number of valid token pairs it holds, so
        the partial last blocks weigh less (one host read on first use, then remembered)."""
        return float(self.density_tensor)

    @functools.cached_property
    def density_tensor(self) -> torch.Tensor:
        """:attr:`density` as a float64 scalar tensor on the mask's device (no host read)."""
        bs = self.block_size
        q_tokens = torch.full((self.q_blocks,), bs, dtype=torch.float64, device=self.device)
        k_tokens = torch.full((self.kv_blocks,), bs, dtype=torch.float64, device=self.device)
        q_tokens[-1] = self.q_len - (self.q_blocks - 1) * bs
        k_tokens[-1] = self.kv_len - (self.kv_blocks - 1) * bs
        kept = torch.einsum("bhqk,q,k->", self.to_dense_blocks().double(), q_tokens, k_tokens)
        return kept / (self.q_len * self.kv_len * self.kv_num_blocks.shape[0] * self.kv_num_blocks.shape[1])

    def to_dense_blocks(self) -> torch.Tensor:
        """bool ``(B, H, Qb, Kb)``: which key blocks each query block attends."""
        idx = self.kv_indices.long()
        used = torch.arange(idx.shape[-1], device=idx.device) < self.kv_num_blocks[..., None]
        dense = torch.zeros(*self.kv_num_blocks.shape, self.kv_blocks + 1, dtype=torch.bool, device=idx.device)
        # unused slots go to a spare last column, dropped afterwards
        dense.scatter_(-1, torch.where(used, idx, self.kv_blocks), True)
        return dense[..., :-1]

    @classmethod
    def from_dense_blocks(cls, blocks: torch.Tensor, block_size: int, q_len: int, kv_len: int,
                          max_blocks: Optional[int] = None) -> "BlockMask":
        """The block description of a bool ``(B, H, Qb, Kb)`` block mask (indices ascending).

        ``max_blocks``, the width of ``kv_indices``, defaults to the largest row count, which costs
        one host read; pass a bound known in advance (at least that count) to avoid it.
        """
        fn = "BlockMask.from_dense_blocks"
        block_size = _int(fn, "block_size", block_size, 1)
        q_len, kv_len = _int(fn, "q_len", q_len, 1), _int(fn, "kv_len", kv_len, 1)
        shape = (-(-q_len // block_size), -(-kv_len // block_size))
        if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.bool or blocks.dim() != 4 \
                or tuple(blocks.shape[2:]) != shape:
            raise ValueError(f"{fn}: blocks must be a bool tensor of shape (B, H) + {shape}, got "
                             f"{getattr(blocks, 'dtype', type(blocks).__name__)} {tuple(getattr(blocks, 'shape', ()))}")
        num = blocks.sum(-1, dtype=torch.int32)
        if max_blocks is None:
            max_blocks = max(int(num.max()), 1)  # the one host read
        max_blocks = _int(fn, "max_blocks", max_blocks, 1)
        # Kept block j goes to slot (number of kept blocks before j); the rest to a spare slot.
        slot = torch.where(blocks, blocks.cumsum(-1) - 1, max_blocks)
        kv = torch.arange(shape[1], dtype=torch.int32, device=blocks.device).expand_as(slot)
        idx = torch.zeros(*blocks.shape[:3], max_blocks + 1, dtype=torch.int32, device=blocks.device)
        idx.scatter_(-1, slot, kv)
        return cls(num, idx[..., :max_blocks].contiguous(), block_size, q_len, kv_len)

    def expand(self, b: int, h: int) -> "BlockMask":
        """The mask for ``b`` batch entries and ``h`` heads (views, no copy) from a mask whose
        batch and head sizes are 1 or already ``b`` and ``h``."""
        b, h = _int("BlockMask.expand", "b", b, 1), _int("BlockMask.expand", "h", h, 1)
        have = tuple(self.kv_num_blocks.shape[:2])
        if have[0] not in (1, b) or have[1] not in (1, h):
            raise ValueError(f"BlockMask.expand: cannot expand batch/heads {have} to ({b}, {h})")
        num = self.kv_num_blocks.expand(b, h, -1)
        idx = self.kv_indices.expand(b, h, -1, -1)
        return dataclasses.replace(self, kv_num_blocks=num, kv_indices=idx)

    def to(self, device) -> "BlockMask":
        device = _device("BlockMask.to", device)
        return dataclasses.replace(self, kv_num_blocks=self.kv_num_blocks.to(device),
                                   kv_indices=self.kv_indices.to(device))

    def union(self, other: "BlockMask") -> "BlockMask":
        """The blocks kept by either mask (batch and heads broadcast; one host read)."""
        if not isinstance(other, BlockMask):
            raise TypeError(f"BlockMask.union: other must be a BlockMask, got {type(other).__name__}")
        mine = (self.block_size, self.q_len, self.kv_len)
        theirs = (other.block_size, other.q_len, other.kv_len)
        if mine != theirs:
            raise ValueError(f"BlockMask.union: other must have the same (block_size, q_len, kv_len) {mine}, got "
                             f"{theirs}")
        try:
            blocks = self.to_dense_blocks() | other.to(self.device).to_dense_blocks()
        except RuntimeError:
            raise ValueError(f"BlockMask.union: batch/heads {tuple(self.kv_num_blocks.shape[:2])} and "
                             f"{tuple(other.kv_num_blocks.shape[:2])} do not broadcast") from None
        return BlockMask.from_dense_blocks(blocks, *mine)


# ---------------------------------------------------------------------------------------------
# token layout for tiles


@dataclasses.dataclass(frozen=True)
class TileLayout:
    """The tile-by-tile order of a ``(T, H, W)`` grid of video tokens (after patchify).

    Tiles of ``(tt, th, tw)`` tokens are visited in (t, h, w) order and the tokens of one tile
    are contiguous, in (t, h, w) order inside the tile.  When a grid side is not a multiple of the
    tile side, the last tiles along it are smaller (ragged, no padding): the permutation stays a
    plain reordering of the real tokens, and a tile no longer fills whole blocks, which the mask
    builders account for by keeping every block that holds a token of a selected tile.
    """

    grid: Tuple[int, int, int]
    tile: Tuple[int, int, int]

    def __post_init__(self):
        object.__setattr__(self, "grid", _triple("TileLayout", "grid", self.grid))
        object.__setattr__(self, "tile", _triple("TileLayout", "tile", self.tile))

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def tiles(self) -> Tuple[int, int, int]:
        """The number of tiles along (T, H, W)."""
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile))

    @functools.cached_property
    def _order(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # Lay the token indices out on the grid padded to whole tiles (-1 in the padding), move
        # the tile axes in front of the in-tile axes, and drop the padding: no sort needed.
        (t, h, w), (tt, th, tw), (nt, nh, nw) = self.grid, self.tile, self.tiles
        index = torch.full((nt * tt, nh * th, nw * tw), -1, dtype=torch.long)
        index[:t, :h, :w] = torch.arange(t * h * w).view(t, h, w)
        index = index.view(nt, tt, nh, th, nw, tw).permute(0, 2, 4, 1, 3, 5).reshape(nt * nh * nw, -1)
        real = index >= 0
        tile_id = torch.arange(nt * nh * nw)[:, None].expand_as(index)
        return index[real], tile_id[real]

    @property
    def permutation(self) -> torch.Tensor:
        """LongTensor: ``permutation[new position] = old (t, h, w)-order token index``."""
        return self._order[0]

    @functools.cached_property
    def inverse(self) -> torch.Tensor:
        """LongTensor: ``inverse[old token index] = new position``."""
        return torch.argsort(self.permutation)

    @property
    def tile_of_position(self) -> torch.Tensor:
        """LongTensor: the tile id (in (t, h, w) tile order) of the token at each new position."""
        return self._order[1]

    def _index(self, fn, x, dim, prompt_tokens, prompt_position, table):
        prompt = _prompt(fn, prompt_tokens, prompt_position)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: x must be a tensor, got {type(x).__name__}")
        if not -x.dim() <= dim < x.dim() or x.shape[dim] != self.num_tokens + prompt:
            raise ValueError(f"{fn}: x must have {self.num_tokens} video + {prompt} prompt tokens along dim {dim}, "
                             f"got shape {tuple(x.shape)}")
        # The gather index is made once per (direction, prompt, device): a host-to-device copy on
        # every call would stall a GPU stream.
        key = (fn, prompt, prompt_position, x.device)
        index = self._indices.get(key)
        if index is None:
            start = prompt if prompt_position == "first" else 0
            index = torch.cat([torch.arange(start), table + start, torch.arange(start + self.num_tokens,
                                                                                  self.num_tokens + prompt)])
            index = self._indices[key] = index.to(x.device)
        return x.index_select(dim, index)

    @functools.cached_property
    def _indices(self) -> dict:
        return {}

    def reorder(self, x: torch.Tensor, dim: int = 1, *, prompt_tokens: int = 0,
                prompt_position: str = "first") -> torch.Tensor:
        """``x`` with its video tokens along ``dim`` in tile order (prompt tokens stay in place)."""
        return self._index("TileLayout.reorder", x, dim, prompt_tokens, prompt_position, self.permutation)

    def restore(self, x: torch.Tensor, dim: int = 1, *, prompt_tokens: int = 0,
                prompt_position: str = "first") -> torch.Tensor:
        """The inverse of :meth:`reorder`."""
        return self._index("TileLayout.restore", x, dim, prompt_tokens, prompt_position, self.inverse)


# ---------------------------------------------------------------------------------------------
# shared block geometry


def _spans(block_size: int, total: int, prompt: int, prompt_position: str, device=None):
    """Per block of a ``total``-token sequence whose video part is ``total - prompt`` tokens: the
    first and last video position it holds (``g0 > g1`` when none), and whether it holds video
    and prompt tokens."""
    v0 = prompt if prompt_position == "first" else 0
    n_video = total - prompt
    start = torch.arange(-(-total // block_size), device=device) * block_size
    end = (start + block_size).clamp(max=total)
    g0 = start.clamp(min=v0) - v0
    g1 = end.clamp(max=v0 + n_video) - 1 - v0
    video = (g1 - g0 + 1).clamp(min=0)
    return g0, g1, video > 0, end - start > video


def _forced_rows_cols(q_spans, k_spans, block_size: int, sinks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The query blocks kept whole (those holding prompt tokens) and the key blocks every query
    block keeps (prompt and sink blocks), bool (Qb,) and (Kb,)."""
    k_g0, _, k_video, k_prompt = k_spans
    return q_spans[3], k_prompt | (k_video & (k_g0 < sinks * block_size))


def _forced(q_spans, k_spans, block_size: int, sinks: int) -> torch.Tensor:
    """(Qb, Kb) blocks every pattern keeps: prompt rows and columns, and the sink key blocks."""
    rows, cols = _forced_rows_cols(q_spans, k_spans, block_size, sinks)
    return rows[:, None] | cols[None, :]


def _geometry_mask(blocks, block_size: int, total: int, device) -> BlockMask:
    """The (1, 1, Qb, ...) mask of a shape-only builder's (kv_num_blocks, kv_indices) rows."""
    num, idx = blocks
    return BlockMask(num[None, None], idx[None, None], block_size, total, total).to(device)


# ---------------------------------------------------------------------------------------------
# Sliding Tile Attention


@functools.lru_cache(maxsize=64)
def _sliding_tile(grid, tile, window, block_size, prompt, prompt_position, sinks, device):
    from ..ops.attention import sliding_tile_block_mask

    blocks = sliding_tile_block_mask(grid, tile, window, block_size, prompt, prompt_position == "last", sinks)
    return _geometry_mask(blocks, block_size, math.prod(grid) + prompt, device)


def sliding_tile_mask(grid: Sequence[int], tile: Sequence[int], window: Sequence[int], *,
                      block_size: Optional[int] = None, prompt_tokens: int = 0, prompt_position: str = "first",
                      sinks: int = 0, device="cpu") -> BlockMask:
    """Sliding Tile Attention (Zhang et al. 2025): query tile ``i`` attends the key tiles inside a
    ``window = (wt, wh, ww)``-tile box around it (shifted inside the grid at the borders).

    Tokens must be in :class:`TileLayout` ``(grid, tile)`` order (``layout.reorder``).  With
    ``block_size`` equal to the tile volume (the default) and a grid divisible by the tile, a
    block is a tile and the mask is exact; otherwise a block pair is kept when any of its tiles
    are.  Returns a ``(1, 1, Qb, Kb)`` mask (cached; read-only tensors).
    """
    fn = "sliding_tile_mask"
    grid, tile, window = _triple(fn, "grid", grid), _triple(fn, "tile", tile), _triple(fn, "window", window)
    block_size = math.prod(tile) if block_size is None else _int(fn, "block_size", block_size, 1)
    prompt = _prompt(fn, prompt_tokens, prompt_position)
    return _sliding_tile(grid, tile, window, block_size, prompt, prompt_position, _int(fn, "sinks", sinks),
                         _device(fn, device))


sliding_tile_mask.cache_clear, sliding_tile_mask.cache_info = _sliding_tile.cache_clear, _sliding_tile.cache_info


# ---------------------------------------------------------------------------------------------
# Radial Attention


@functools.lru_cache(maxsize=64)
def _radial(grid, block_size, decay, prompt, prompt_position, sinks, device):
    from ..ops.attention import frame_band_block_mask

    frames, frame_tokens = grid[0], grid[1] * grid[2]
    # half-width of the spatial band at frame distance d: decay * s / 2^floor(log2(d + 1)), at
    # least one token (the spatially aligned pair), in float64 on the host; for integer
    # distances, distance < half  <=>  distance < ceil(half)
    band = [math.ceil(max(decay * frame_tokens / 2 ** ((d + 1).bit_length() - 1), 1.0)) for d in range(frames)]
    blocks = frame_band_block_mask(frames, frame_tokens, band, block_size, prompt, prompt_position == "last", sinks)
    return _geometry_mask(blocks, block_size, frames * frame_tokens + prompt, device)


def radial_mask(grid: Sequence[int], *, block_size: int = 64, decay: float = 1.0, prompt_tokens: int = 0,
                prompt_position: str = "first", sinks: int = 0, device="cpu") -> BlockMask:
    """Radial Attention (Li et al. 2025): attention energy decays with the distance between
    frames, so the spatial window does too.

    Tokens in natural ``(t, h, w)`` order, ``s = H * W`` per frame.  Query token ``(i, p)`` keeps
    key token ``(j, p')`` when ``|p - p'| < max(decay * s / 2^floor(log2(|i - j| + 1)), 1)``:
    the whole frame for ``d = 0`` (with ``decay = 1``), half of it for ``d`` in 1..2, a quarter for
    3..6, ..., down to the spatially aligned token, which every frame pair keeps (the diagonal).
    Frames per band double as the window halves, so the kept pairs grow as ``n log n``.  Block
    pairs holding any kept token pair are kept.  Returns a ``(1, 1, Qb, Kb)`` mask (cached).
    """
    fn = "radial_mask"
    grid = _triple(fn, "grid", grid)
    if isinstance(decay, (bool, torch.Tensor)) or not isinstance(decay, (int, float)) \
            or not math.isfinite(decay) or decay <= 0:
        raise ValueError(f"{fn}: decay must be a positive finite number, got {decay!r}")
    prompt = _prompt(fn, prompt_tokens, prompt_position)
    return _radial(grid, _int(fn, "block_size", block_size, 1), float(decay), prompt, prompt_position,
                   _int(fn, "sinks", sinks), _device(fn, device))


radial_mask.cache_clear, radial_mask.cache_info = _radial.cache_clear, _radial.cache_info


# ---------------------------------------------------------------------------------------------
# Sparse VideoGen head profiling


class HeadPatterns(NamedTuple):
    """:func:`profile_head_patterns`' answer, unpackable as ``mask, choice``: the per-head mask
    and the index of each head's pattern in :data:`PATTERNS` (int64 ``(B, H)``, on the device)."""

    mask: BlockMask
    choice: torch.Tensor

    @property
    def labels(self):
        """``[[pattern name per head] per batch entry]`` (one host read)."""
        return [[PATTERNS[c] for c in row] for row in self.choice.tolist()]


def _check_qk(fn: str, q, k, layout: str):
    if layout not in _LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a 4-D floating-point tensor ({layout}), got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.device != k.device:
        raise ValueError(f"{fn}: q {tuple(q.shape)} and k {tuple(k.shape)} ({layout}) differ in batch, heads, head dim "
                         f"or device")
    return q, k


def profile_head_patterns(q: torch.Tensor, k: torch.Tensor, grid: Sequence[int], *, v: Optional[torch.Tensor] = None,
                          num_rows: int = 64, block_size: int = 64, spatial_frames: int = 1,
                          temporal_width: int = 1, prompt_tokens: int = 0, prompt_position: str = "first",
                          sinks: int = 0, layout: str = "bhsd", scale: Optional[float] = None) -> HeadPatterns:
    """Sparse VideoGen's online profiling (Xi et al. 2025, Sec. 4.1): each head is a spatial head
    (attends its own frame and the ``spatial_frames`` frames on either side) or a temporal head
    (attends the same spatial positions in every frame: key blocks whose in-frame positions come
    within ``temporal_width`` tokens of the query block's).

    ``num_rows`` query rows, evenly spaced over the video tokens, get their exact attention
    (float32) and their attention restricted to each pattern (at block granularity, the masks the
    kernel would use); each (batch, head) takes the pattern whose output has the smaller mean
    squared error.  The output is ``softmax(q k^T) v`` with ``v`` given, else the attention rows
    themselves (``v`` the identity).  Tokens in natural ``(t, h, w)`` order, prompt and sinks as
    in the module docstring.  The mask build reads the row width from the device once.
    """
    fn = "profile_head_patterns"
    grid = _triple(fn, "grid", grid)
    q, k = _check_qk(fn, q, k, layout)
    if v is not None:
        if not isinstance(v, torch.Tensor) or v.dim() != 4:
            raise TypeError(f"{fn}: v must be a 4-D tensor ({layout}) or None, got {type(v).__name__}")
        v = v.transpose(1, 2) if layout == "bshd" else v
        if v.shape[:3] != k.shape[:3] or v.device != k.device:
            raise ValueError(f"{fn}: v {tuple(v.shape)} must match k {tuple(k.shape)} in batch, heads and length")
    num_rows, block_size = _int(fn, "num_rows", num_rows, 1), _int(fn, "block_size", block_size, 1)
    spatial_frames, temporal_width = _int(fn, "spatial_frames", spatial_frames), _int(fn, "temporal_width",
                                                                                        temporal_width, 1)
    prompt, sinks = _prompt(fn, prompt_tokens, prompt_position), _int(fn, "sinks", sinks)
    frame_tokens, n_video = grid[1] * grid[2], math.prod(grid)
    total = n_video + prompt
    if q.shape[2] != total or k.shape[2] != total:
        raise ValueError(f"{fn}: q and k must hold {n_video} video + {prompt} prompt tokens, got {q.shape[2]} and "
                         f"{k.shape[2]}")

    from ..ops.attention import frame_band_block_mask

    spatial = [frame_tokens if d <= spatial_frames else 0 for d in range(grid[0])]  # whole frames nearby
    temporal = [temporal_width] * grid[0]  # positions within temporal_width, every frame
    patterns = torch.stack([
        _geometry_mask(frame_band_block_mask(grid[0], frame_tokens, band, block_size, prompt,
                                             prompt_position == "last", sinks), block_size, total, "cpu")
        .to_dense_blocks()[0, 0] for band in (spatial, temporal)]).to(q.device)

    v0 = prompt if prompt_position == "first" else 0
    rows = torch.linspace(0, n_video - 1, min(num_rows, n_video), dtype=torch.float64).round().long() + v0
    rows = rows.to(q.device)
    key_block = torch.arange(total, device=q.device) // block_size
    allowed = patterns[:, rows // block_size][..., key_block]  # (2, R, S) token masks of the sampled rows
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    logits = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale  # (B, H, R, S)

    def output(p):
        return p if v is None else p @ v.float()

    exact = output(torch.softmax(logits, -1))
    errors = torch.stack([(output(torch.softmax(logits.masked_fill(~m, float("-inf")), -1)) - exact).square()
                          .mean((-1, -2)) for m in allowed], -1)
    choice = errors.argmin(-1)
    blocks = patterns[choice]  # (B, H, Qb, Kb)
    return HeadPatterns(BlockMask.from_dense_blocks(blocks, block_size, total, total), choice)


# ---------------------------------------------------------------------------------------------
# adaptive masks from pooled block scores


def _scores(q, k, block_size, scale, layout):
    """float32 (B, H, Qb, Kb) row-softmaxed pooled block scores (the fused scoring kernel)."""
    from ..ops.attention import block_scores

    return block_scores(q, k, block_size, scale, layout)


def _select(scores: torch.Tensor, top_k: Optional[int], mass: Optional[float], min_blocks: int) -> torch.Tensor:
    """bool (B, H, Qb, Kb): the key blocks the adaptive rule keeps per query block (before the
    forced ones); what the fused GPU selection (triton_kernel.block_select_triton) computes."""
    kv_blocks = scores.shape[-1]
    if top_k is not None:
        keep_n = min(max(top_k, min_blocks), kv_blocks)
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(keep_n, -1).indices, True)
    ranked, order = scores.sort(-1, descending=True)
    before = ranked.cumsum(-1) - ranked  # mass of the higher-ranked blocks
    rank = torch.arange(kv_blocks, device=scores.device)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, (before < mass) | (rank < min_blocks))


def adaptive_mask(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 64, top_k: Optional[int] = None,
                  mass: Optional[float] = None, min_blocks: int = 1, sinks: int = 0, prompt_tokens: int = 0,
                  prompt_position: str = "first", layout: str = "bhsd", scale: Optional[float] = None) -> BlockMask:
    """A per-(batch, head) mask chosen from the data: queries and keys mean-pooled per block, the
    softmax of their scaled products (plus the log token count of the key block) estimates the
    share of attention each key block gets from each query block.

    Per query block, exactly one of
      * ``top_k``: the ``top_k`` highest-scoring key blocks (fixed budget);
      * ``mass``: the fewest highest-scoring blocks whose estimated mass adds up to at least
        ``mass`` (cumulative threshold: adapts the budget to how peaked each row is; SpargeAttn,
        XAttention and FlexPrefill select this way),
    at least ``min_blocks`` of them, plus the diagonal block when ``q_len == kv_len``, the sink
    key blocks and the prompt rows and columns.

    Everything stays on the device.  On a GPU one kernel ranks, selects and writes the indices,
    reading nothing back (``kv_indices`` is as wide as the key blocks); elsewhere the ``mass``
    rule reads the widest row count once to size ``kv_indices``.
    """
    fn = "adaptive_mask"
    q_bhsd, k_bhsd = _check_qk(fn, q, k, layout)
    block_size = _int(fn, "block_size", block_size, 1)
    if (top_k is None) == (mass is None):
        raise ValueError(f"{fn}: give exactly one of top_k and mass, got top_k={top_k!r}, mass={mass!r}")
    if top_k is not None:
        top_k = _int(fn, "top_k", top_k, 1)
    elif isinstance(mass, (bool, torch.Tensor)) or not isinstance(mass, (int, float)) or not 0 < mass <= 1:
        raise ValueError(f"{fn}: mass must be a number in (0, 1], got {mass!r}")
    min_blocks, sinks = _int(fn, "min_blocks", min_blocks), _int(fn, "sinks", sinks)
    prompt = _prompt(fn, prompt_tokens, prompt_position)
    q_len, kv_len = q_bhsd.shape[2], k_bhsd.shape[2]
    if prompt > min(q_len, kv_len):
        raise ValueError(f"{fn}: prompt_tokens ({prompt}) exceeds the sequence lengths ({q_len}, {kv_len})")

    scores = _scores(q, k, block_size, scale, layout)
    q_blocks, kv_blocks = scores.shape[-2:]
    # geometric part on the host (no device data involved), then copied over
    forced_rows, forced_cols = _forced_rows_cols(_spans(block_size, q_len, prompt, prompt_position),
                                                 _spans(block_size, kv_len, prompt, prompt_position), block_size, sinks)
    if scores.is_cuda:
        from .triton_kernel import SELECT_MAX_BLOCKS, block_select_triton

        if kv_blocks <= SELECT_MAX_BLOCKS:  # one kernel, no host read
            num, idx = block_select_triton(scores, forced_rows.to(scores.device), forced_cols.to(scores.device),
                                           top_k=top_k, mass=mass, min_blocks=min_blocks, diagonal=q_len == kv_len)
            return BlockMask(num, idx, block_size, q_len, kv_len)
    forced = forced_rows[:, None] | forced_cols[None, :]
    if q_len == kv_len:
        forced |= torch.eye(q_blocks, dtype=torch.bool)
    keep = _select(scores, top_k, mass, min_blocks) | forced.to(scores.device)
    width = None
    if top_k is not None:
        width = min(kv_blocks, min(max(top_k, min_blocks), kv_blocks) + int(forced.sum(-1).max()))
    return BlockMask.from_dense_blocks(keep, block_size, q_len, kv_len, max_blocks=width)
