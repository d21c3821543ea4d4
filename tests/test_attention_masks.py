"""Mask builders against token-level definitions written out with explicit loops on tiny grids:
a builder's block mask must be exactly the blocks that hold at least one allowed token pair."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stepfuse.attention import masks
from stepfuse.attention.masks import (BlockMask, TileLayout, adaptive_mask, profile_head_patterns, radial_mask,
                                      sliding_tile_mask)
from stepfuse.ref import attention as ref


def pooled(token_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """(Qb, Kb): block pairs holding at least one allowed token pair of an (S_q, S_kv) mask."""
    s_q, s_kv = token_mask.shape
    qb, kb = -(-s_q // block_size), -(-s_kv // block_size)
    padded = torch.zeros(qb * block_size, kb * block_size, dtype=torch.bool)
    padded[:s_q, :s_kv] = token_mask
    return padded.view(qb, block_size, kb, block_size).any(3).any(1)


def with_prompt(video: torch.Tensor, prompt: int, position: str, sink_tokens: int) -> torch.Tensor:
    """The joint-attention token mask: prompt rows and columns dense, the first ``sink_tokens``
    video keys seen by everyone."""
    n = video.shape[0]
    video = video.clone()
    video[:, :sink_tokens] = True
    full = torch.ones(n + prompt, n + prompt, dtype=torch.bool)
    part = slice(prompt, None) if position == "first" else slice(0, n)
    full[part, part] = video
    return full


def check_blocks(mask: BlockMask, token_mask: torch.Tensor):
    want = pooled(token_mask, mask.block_size)
    got = mask.to_dense_blocks()
    assert got.shape[-2:] == want.shape
    assert torch.equal(got[0, 0], want), (got[0, 0].int(), want.int())
    dense = ref.block_mask_to_dense(mask.kv_num_blocks, mask.kv_indices, mask.block_size, mask.q_len, mask.kv_len)
    assert bool((dense[0, 0] | ~token_mask).all()), "the block mask drops an allowed token pair"


def loop_tile_order(grid, tile):
    """Old token index at each new position, by walking tiles and their tokens."""
    (t, h, w), (tt, th, tw) = grid, tile
    order = []
    for a, b, c in itertools.product(range(0, t, tt), range(0, h, th), range(0, w, tw)):
        for x, y, z in itertools.product(range(a, min(a + tt, t)), range(b, min(b + th, h)), range(c, min(c + tw, w))):
            order.append((x * h + y) * w + z)
    return order


def loop_sliding_tile(grid, tile, window):
    order = loop_tile_order(grid, tile)
    tiles = [-(-g // s) for g, s in zip(grid, tile)]
    (_, h, w) = grid

    def tile_of(token):
        x, y, z = token // (h * w), token // w % h, token % w
        return x // tile[0], y // tile[1], z // tile[2]

    def inside(qc, kc):
        for c, k, n, win in zip(qc, kc, tiles, window):
            start = min(max(c - win // 2, 0), max(n - win, 0))
            if not start <= k < start + win:
                return False
        return True

    n = len(order)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = inside(tile_of(order[i]), tile_of(order[j]))
    return m


def loop_frame_rule(grid, rule):
    """Natural-order token mask from ``rule(frame distance, in-frame position distance)``."""
    s = grid[1] * grid[2]
    n = grid[0] * s
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            m[i, j] = rule(abs(i // s - j // s), abs(i % s - j % s))
    return m


def radial_rule(s, decay):
    return lambda d, gap: gap < max(decay * s / 2 ** ((d + 1).bit_length() - 1), 1)


# --------------------------------------------------------------------------------------------- TileLayout


@pytest.mark.parametrize("grid,tile", [((4, 6, 6), (2, 3, 3)), ((5, 7, 3), (2, 3, 2)), ((3, 4, 5), (1, 1, 1)),
                                       ((2, 3, 2), (4, 4, 4))])
def test_tile_layout_order_and_round_trip(grid, tile):
    layout = TileLayout(grid, tile)
    assert layout.permutation.tolist() == loop_tile_order(grid, tile)
    assert torch.equal(layout.permutation[layout.inverse], torch.arange(math.prod(grid)))
    x = torch.randn(2, math.prod(grid) + 5, 3)
    for prompt, position in ((0, "first"), (5, "first"), (5, "last")):
        y = x[:, :math.prod(grid) + prompt]
        moved = layout.reorder(y, 1, prompt_tokens=prompt, prompt_position=position)
        assert torch.equal(layout.restore(moved, 1, prompt_tokens=prompt, prompt_position=position), y)
        video = slice(prompt, None) if position == "first" else slice(0, math.prod(grid))
        assert torch.equal(moved[:, video], y[:, video][:, layout.permutation])
    # tokens of one tile are contiguous: tile ids never decrease along the new order
    assert bool((layout.tile_of_position.diff() >= 0).all())


# --------------------------------------------------------------------------------------------- builders


@pytest.mark.parametrize("grid,tile,window,block_size", [
    ((4, 4, 6), (2, 2, 3), (1, 1, 1), None),   # divisible, blocks are tiles
    ((4, 6, 6), (2, 3, 3), (3, 1, 3), None),   # window clamped at the borders
    ((4, 4, 4), (2, 2, 2), (2, 2, 2), 4),      # even window, two blocks per tile
    ((5, 7, 3), (2, 3, 2), (1, 3, 2), 8),      # ragged edge tiles, blocks straddle tiles
    ((3, 5, 4), (2, 2, 2), (5, 5, 5), 6),      # window wider than the grid
])
@pytest.mark.parametrize("prompt,position,sinks", [(0, "first", 0), (5, "first", 1), (7, "last", 2)])
def test_sliding_tile_mask_matches_token_definition(grid, tile, window, block_size, prompt, position, sinks):
    mask = sliding_tile_mask(grid, tile, window, block_size=block_size, prompt_tokens=prompt,
                             prompt_position=position, sinks=sinks)
    bs = mask.block_size
    assert bs == (block_size or math.prod(tile)) and mask.q_len == mask.kv_len == math.prod(grid) + prompt
    check_blocks(mask, with_prompt(loop_sliding_tile(grid, tile, window), prompt, position, sinks * bs))


@pytest.mark.parametrize("builder,args", [(sliding_tile_mask, ((2, 2, 2), (1, 1, 1))), (radial_mask, ())])
def test_geometry_masks_are_cached(builder, args):
    a = builder((4, 4, 4), *args)
    assert builder([4, 4, 4], *args) is a
    builder.cache_clear()
    assert builder((4, 4, 4), *args) is not a


@pytest.mark.parametrize("grid,block_size,decay", [((6, 2, 4), 4, 1.0), ((9, 1, 3), 4, 1.0), ((5, 3, 3), 4, 0.5),
                                                   ((4, 2, 2), 8, 1.0), ((7, 4, 4), 5, 2.0)])
@pytest.mark.parametrize("prompt,position,sinks", [(0, "first", 0), (3, "first", 1), (6, "last", 1)])
def test_radial_mask_matches_token_definition(grid, block_size, decay, prompt, position, sinks):
    mask = radial_mask(grid, block_size=block_size, decay=decay, prompt_tokens=prompt, prompt_position=position,
                       sinks=sinks)
    video = loop_frame_rule(grid, radial_rule(grid[1] * grid[2], decay))
    check_blocks(mask, with_prompt(video, prompt, position, sinks * block_size))


def test_radial_mask_is_sparse_on_long_videos():
    dense = radial_mask((1, 16, 16), block_size=16).density
    long = radial_mask((64, 16, 16), block_size=16).density
    assert dense == 1.0 and long < 0.3


def frame_and_position_heads(grid, spatial_frames, seed=0):
    """Head 0's queries and keys match only within a frame, head 1's only at the same position."""
    t, s = grid[0], grid[1] * grid[2]
    frame = torch.arange(t * s) // s
    position = torch.arange(t * s) % s
    g = torch.Generator().manual_seed(seed)
    d = t + s
    qk = torch.zeros(1, 2, t * s, d)
    qk[0, 0] = 6.0 * torch.nn.functional.one_hot(frame, d)
    qk[0, 1] = 6.0 * torch.nn.functional.one_hot(t + position, d)
    return qk, qk.clone(), torch.randn(1, 2, t * s, d, generator=g)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("with_v", [True, False])
def test_profile_head_patterns_picks_each_heads_pattern(layout, with_v):
    grid, bs = (5, 2, 4), 4
    q, k, v = frame_and_position_heads(grid, 1)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    got = profile_head_patterns(q, k, grid, v=v if with_v else None, num_rows=16, block_size=bs, layout=layout)
    assert got.labels == [["spatial", "temporal"]]
    mask, choice = got
    assert choice.shape == (1, 2) and mask is got.mask
    spatial = pooled(loop_frame_rule(grid, lambda d, gap: d <= 1), bs)
    temporal = pooled(loop_frame_rule(grid, lambda d, gap: gap < 1), bs)
    dense = got.mask.to_dense_blocks()
    assert torch.equal(dense[0, 0], spatial) and torch.equal(dense[0, 1], temporal)


def test_profile_head_patterns_prompt_and_sinks():
    grid, bs, prompt = (4, 3, 4), 4, 6
    q, k, v = frame_and_position_heads(grid, 1)
    pad = torch.zeros(1, 2, prompt, q.shape[-1])
    q, k, v = (torch.cat([t, pad], 2) for t in (q, k, v))  # prompt last, uninformative
    got = profile_head_patterns(q, k, grid, v=v, num_rows=16, block_size=bs, prompt_tokens=prompt,
                                prompt_position="last", sinks=1, spatial_frames=0, temporal_width=2)
    assert got.labels == [["spatial", "temporal"]]
    for head, rule in enumerate((lambda d, gap: d == 0, lambda d, gap: gap < 2)):
        want = with_prompt(loop_frame_rule(grid, rule), prompt, "last", bs)
        assert torch.equal(got.mask.to_dense_blocks()[0, head], pooled(want, bs))


# --------------------------------------------------------------------------------------------- adaptive


def _qk(b=2, h=3, s_q=70, s_kv=70, d=16, layout="bhsd", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = lambda s: (b, h, s, d) if layout == "bhsd" else (b, s, h, d)
    return torch.randn(shape(s_q), generator=g) * 2, torch.randn(shape(s_kv), generator=g) * 2


def forced_blocks(qb, kb, bs, s_q, s_kv, prompt, position, sinks):
    """Blocks adaptive_mask must keep whatever the scores, from the token-level rule."""
    token = torch.zeros(s_q, s_kv, dtype=torch.bool)
    if s_q == s_kv:
        token |= pooled(torch.eye(s_q, dtype=torch.bool), bs).repeat_interleave(bs, 0).repeat_interleave(bs, 1)[
            :s_q, :s_kv]
    if prompt:
        rows = slice(0, prompt) if position == "first" else slice(s_q - prompt, s_q)
        cols = slice(0, prompt) if position == "first" else slice(s_kv - prompt, s_kv)
        token[rows], token[:, cols] = True, True
    v0 = prompt if position == "first" else 0
    token[:, v0:v0 + sinks * bs] = True
    return pooled(token, bs)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("s_q,s_kv,bs", [(70, 70, 16), (128, 128, 16), (40, 90, 16)])
@pytest.mark.parametrize("rule", [dict(top_k=2), dict(top_k=1, min_blocks=3), dict(mass=0.6), dict(mass=0.9),
                                  dict(mass=0.3, min_blocks=2)])
@pytest.mark.parametrize("prompt,position,sinks", [(0, "first", 0), (10, "first", 1), (9, "last", 1)])
def test_adaptive_mask_semantics(layout, s_q, s_kv, bs, rule, prompt, position, sinks):
    q, k = _qk(s_q=s_q, s_kv=s_kv, layout=layout)
    mask = adaptive_mask(q, k, block_size=bs, sinks=sinks, prompt_tokens=prompt, prompt_position=position,
                         layout=layout, **rule)
    scores = ref.block_scores(q, k, bs, layout=layout)
    keep = mask.to_dense_blocks()
    b, h, qb, kb = keep.shape
    assert (b, h, mask.q_len, mask.kv_len) == (2, 3, s_q, s_kv)
    forced = forced_blocks(qb, kb, bs, s_q, s_kv, prompt, position, sinks)
    assert bool((keep | ~forced).all()), "a diagonal, sink or prompt block is missing"
    min_blocks = min(rule.get("min_blocks", 1), kb)
    if "top_k" in rule:
        n = min(max(rule["top_k"], min_blocks), kb)
        best = torch.zeros_like(keep).scatter_(-1, scores.topk(n, -1).indices, True)
        assert torch.equal(keep, best | forced)
    else:
        assert bool(((scores * keep).sum(-1) >= rule["mass"] - 1e-6).all())
        assert bool((keep.sum(-1) >= min_blocks).all())
        # beyond the forced blocks: the fewest highest-scoring ones that reach the mass
        assert torch.equal(keep, best_prefix(scores, rule["mass"], min_blocks) | forced)
    # indices ascending and in range
    idx, num = mask.kv_indices, mask.kv_num_blocks
    used = torch.arange(idx.shape[-1]) < num[..., None]
    assert bool((idx.diff(dim=-1)[used[..., 1:]] > 0).all()) and bool((idx[used] < kb).all())


def best_prefix(scores, mass, min_blocks):
    """The fewest highest-scoring blocks reaching ``mass`` (at least ``min_blocks``), row by row."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for row in itertools.product(*(range(n) for n in scores.shape[:-1])):
        total, order = 0.0, scores[row].argsort(descending=True).tolist()
        for rank, j in enumerate(order):
            if total >= mass and rank >= min_blocks:
                break
            keep[row + (j,)] = True
            total += float(scores[row + (j,)])
    return keep


def test_adaptive_mask_scores_go_through_one_function(monkeypatch):
    q, k = _qk()
    calls = []

    def fake(q_, k_, block_size, scale, layout):
        calls.append((block_size, scale, layout))
        return ref.block_scores(q_, k_, block_size, scale, layout)

    monkeypatch.setattr(masks, "_scores", fake)
    adaptive_mask(q, k, block_size=16, top_k=1, scale=0.5)
    assert calls == [(16, 0.5, "bhsd")]


# --------------------------------------------------------------------------------------------- BlockMask


@pytest.mark.parametrize("b,h,s_q,s_kv,bs", [(1, 1, 40, 40, 8), (2, 3, 37, 50, 16), (1, 2, 5, 70, 32)])
def test_block_mask_round_trip_density_and_ops(b, h, s_q, s_kv, bs):
    qb, kb = -(-s_q // bs), -(-s_kv // bs)
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(b, h, qb, kb, generator=g) < 0.4
    blocks[0, 0, 0] = False  # a query block attending nothing
    mask = BlockMask.from_dense_blocks(blocks, bs, s_q, s_kv)
    assert torch.equal(mask.to_dense_blocks(), blocks)
    assert mask.kv_indices.shape[-1] == max(int(blocks.sum(-1).max()), 1)
    token = ref.block_mask_to_dense(mask.kv_num_blocks, mask.kv_indices, bs, s_q, s_kv)
    assert mask.density == pytest.approx(token.double().mean().item())
    wide = BlockMask.from_dense_blocks(blocks, bs, s_q, s_kv, max_blocks=kb)
    assert torch.equal(wide.to_dense_blocks(), blocks)

    other = BlockMask.from_dense_blocks(torch.rand(1, 1, qb, kb, generator=g) < 0.3, bs, s_q, s_kv)
    assert torch.equal(mask.union(other).to_dense_blocks(), blocks | other.to_dense_blocks())
    expanded = other.expand(b, h)
    assert expanded.shape == (b, h, qb, kb)
    assert torch.equal(expanded.to_dense_blocks(), other.to_dense_blocks().expand(b, h, -1, -1))
    assert mask.to("cpu").device == torch.device("cpu")


def test_builder_masks_run_in_reference_attention():
    grid, tile = (2, 4, 4), (1, 2, 2)
    mask = sliding_tile_mask(grid, tile, (1, 1, 1)).expand(2, 3)
    layout = TileLayout(grid, tile)
    q, k = _qk(s_q=32, s_kv=32)
    v = torch.randn_like(k)
    out = ref.block_sparse_attention(*(layout.reorder(t, 2) for t in (q, k, v)), mask.kv_num_blocks,
                                     mask.kv_indices, mask.block_size)
    # one tile per query tile: attention within the tile only
    tile_tokens = layout.reorder(q, 2).unflatten(2, (8, 4))
    kt, vt = (layout.reorder(t, 2).unflatten(2, (8, 4)) for t in (k, v))
    want = torch.softmax(tile_tokens.double() @ kt.double().transpose(-1, -2) / 4.0, -1) @ vt.double()
    torch.testing.assert_close(out.double(), want.flatten(2, 3))


# --------------------------------------------------------------------------------------------- bad input


def _bad_calls():
    q, k = _qk(s_q=32, s_kv=32)
    blocks = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    good = BlockMask.from_dense_blocks(blocks, 16, 32, 32)
    return [
        (lambda: TileLayout((4, 4), (2, 2, 2)), ValueError, "grid"),
        (lambda: TileLayout((4, 4, 4), (2, 0, 2)), ValueError, r"tile\[1\]"),
        (lambda: TileLayout((4, 4, 4), (2, 2, 2)).reorder(torch.zeros(2, 63), 1), ValueError, "x must have"),
        (lambda: TileLayout((4, 4, 4), (2, 2, 2)).reorder(torch.zeros(2, 64), 1, prompt_position="middle"),
         ValueError, "prompt_position"),
        (lambda: sliding_tile_mask((4, 4, 4), (2, 2, 2), (1, 1)), ValueError, "window"),
        (lambda: sliding_tile_mask((4, 4, 4), (2, 2, 2), (1, 1, 1), block_size=0), ValueError, "block_size"),
        (lambda: sliding_tile_mask((4, 4, 4), (2, 2, 2), (1, 1, 1), sinks=-1), ValueError, "sinks"),
        (lambda: sliding_tile_mask((4, 4, 4), (2, 2, 2), (1, 1, 1), prompt_tokens=1.5), TypeError, "prompt_tokens"),
        (lambda: sliding_tile_mask((4, 4, 4), (2, 2, 2), (1, 1, 1), device=3.5), TypeError, "device"),
        (lambda: radial_mask((4, 4, 4), decay=0.0), ValueError, "decay"),
        (lambda: radial_mask((4, 4, 4), block_size=True), TypeError, "block_size"),
        (lambda: radial_mask((4, 4, 4), prompt_position="end"), ValueError, "prompt_position"),
        (lambda: profile_head_patterns(q, k, (2, 4, 5)), ValueError, "video"),
        (lambda: profile_head_patterns(q, k, (2, 4, 4), num_rows=0), ValueError, "num_rows"),
        (lambda: profile_head_patterns(q, k, (2, 4, 4), temporal_width=0), ValueError, "temporal_width"),
        (lambda: profile_head_patterns(q, k, (2, 4, 4), v=k[:, :, :16]), ValueError, "v "),
        (lambda: profile_head_patterns(q[0], k, (2, 4, 4)), TypeError, "q must"),
        (lambda: profile_head_patterns(q, k, (2, 4, 4), layout="sbhd"), ValueError, "layout"),
        (lambda: adaptive_mask(q, k, block_size=16), ValueError, "exactly one of top_k and mass"),
        (lambda: adaptive_mask(q, k, top_k=2, mass=0.5), ValueError, "exactly one"),
        (lambda: adaptive_mask(q, k, top_k=0), ValueError, "top_k"),
        (lambda: adaptive_mask(q, k, mass=1.5), ValueError, "mass"),
        (lambda: adaptive_mask(q, k, mass=0.5, min_blocks=-1), ValueError, "min_blocks"),
        (lambda: adaptive_mask(q, k, mass=0.5, prompt_tokens=40), ValueError, "prompt_tokens"),
        (lambda: adaptive_mask(q, k[:, :2], mass=0.5), ValueError, "differ"),
        (lambda: adaptive_mask(q.int(), k, mass=0.5), TypeError, "q must"),
        (lambda: BlockMask(good.kv_num_blocks.long(), good.kv_indices, 16, 32, 32), TypeError, "kv_num_blocks"),
        (lambda: BlockMask(good.kv_num_blocks, good.kv_indices[0], 16, 32, 32), TypeError, "kv_indices"),
        (lambda: BlockMask(good.kv_num_blocks, good.kv_indices, 16, 40, 32), ValueError, "q_len=40"),
        (lambda: BlockMask(good.kv_num_blocks, good.kv_indices, 16, 0, 32), ValueError, "q_len"),
        (lambda: BlockMask.from_dense_blocks(blocks.int(), 16, 32, 32), ValueError, "blocks must"),
        (lambda: BlockMask.from_dense_blocks(blocks, 16, 32, 48), ValueError, "blocks must"),
        (lambda: BlockMask.from_dense_blocks(blocks, 16, 32, 32, max_blocks=0), ValueError, "max_blocks"),
        (lambda: good.expand(2, 0), ValueError, "h"),
        (lambda: good.expand(2, 2).expand(3, 2), ValueError, "expand"),
        (lambda: good.union(BlockMask.from_dense_blocks(blocks, 16, 32, 20)), ValueError, "other"),
        (lambda: good.union("mask"), TypeError, "other"),
        (lambda: good.expand(2, 1).union(BlockMask.from_dense_blocks(blocks.expand(3, 1, 2, 2), 16, 32, 32)),
         ValueError, "broadcast"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input(case):
    call, error, match = _bad_calls()[case]
    with pytest.raises(error, match=match):
        call()
