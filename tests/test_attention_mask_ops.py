"""The shape-only mask ops (``torch.ops.stepfuse.frame_band_block_mask`` and
``sliding_tile_block_mask``, csrc/attention_masks.cpp) against their PyTorch references
(stepfuse.ref.attention) on random and awkward geometries, their fakes and their input checks.
(tests/test_attention_masks.py checks the builders on top of them against token-level loops.)"""

from __future__ import annotations

import math
import random

import pytest
import torch

from stepfuse.attention.masks import BlockMask
from stepfuse.ops import attention as ops
from stepfuse.ref import attention as ref


def dense(blocks, block_size, total):
    num, idx = blocks
    assert num.dtype == idx.dtype == torch.int32 and num.dim() == 1 and idx.dim() == 2
    rows = idx.tolist()
    for n, row in zip(num.tolist(), rows):  # ascending, distinct, in range
        assert row[:n] == sorted(set(row[:n])) and all(0 <= j < num.shape[0] for j in row[:n])
    assert idx.shape[1] == max(1, int(num.max()))  # as narrow as the widest row
    return BlockMask(num[None, None], idx[None, None], block_size, total, total).to_dense_blocks()[0, 0]


def frame_band_cases():
    cases = [  # (frames, frame_tokens, band, block_size, prompt, prompt_last, sinks)
        (6, 8, [8, 4, 4, 2, 2, 2], 4, 0, False, 0),  # blocks inside frames
        (5, 6, [6, 3, 3, 1, 1], 16, 3, False, 1),  # blocks across several frames
        (4, 1, [1, 1, 1, 1], 2, 0, False, 0),  # one-token frames
        (3, 10, [10, 0, 0], 7, 5, True, 0),  # spatial: own frame only, blocks straddle frames
        (7, 9, [2] * 7, 5, 4, False, 2),  # temporal band
        (2, 7, [0, 0], 4, 3, False, 0),  # a band that keeps nothing: only prompt and sinks
        (3, 4, [10**9, 10**9, 10**9], 5, 0, True, 0),  # wider than the frame: dense
        (1, 5, [5], 128, 2, False, 0),  # one block
    ]
    rng = random.Random(0)
    for _ in range(40):
        frames, ft = rng.randint(1, 9), rng.randint(1, 24)
        band = sorted((rng.randint(0, ft + 2) for _ in range(frames)), reverse=True)
        cases.append((frames, ft, band, rng.choice([1, 3, 4, 8, 16, 33]), rng.choice([0, 0, 1, 6, 20]),
                      rng.random() < 0.5, rng.choice([0, 0, 1, 3])))
    return cases


@pytest.mark.parametrize("case", frame_band_cases())
def test_frame_band_matches_reference(case):
    frames, ft, band, bs, prompt, last, sinks = case
    got = dense(ops.frame_band_block_mask(frames, ft, band, bs, prompt, last, sinks), bs, frames * ft + prompt)
    assert torch.equal(got, ref.frame_band_block_mask(frames, ft, band, bs, prompt, last, sinks))


def sliding_tile_cases():
    cases = [  # (grid, tile, window, block_size, prompt, prompt_last, sinks)
        ((4, 4, 6), (2, 2, 3), (1, 1, 1), 12, 0, False, 0),  # blocks are tiles
        ((5, 7, 3), (2, 3, 2), (1, 3, 2), 8, 5, False, 1),  # ragged edge tiles
        ((3, 5, 4), (2, 2, 2), (5, 5, 5), 6, 7, True, 2),  # window wider than the grid
        ((3, 4, 5), (1, 1, 1), (3, 1, 3), 16, 0, False, 0),  # one-token tiles, many per block
        ((2, 3, 2), (4, 4, 4), (1, 1, 1), 4, 3, False, 0),  # one tile bigger than the grid
        ((6, 6, 6), (2, 2, 2), (2, 2, 2), 32, 0, True, 1),  # even window
    ]
    rng = random.Random(1)
    for _ in range(40):
        grid = tuple(rng.randint(1, 7) for _ in range(3))
        tile = tuple(rng.randint(1, 4) for _ in range(3))
        window = tuple(rng.randint(1, 4) for _ in range(3))
        cases.append((grid, tile, window, rng.choice([1, 4, 8, 16, 27]), rng.choice([0, 0, 2, 9]),
                      rng.random() < 0.5, rng.choice([0, 0, 2])))
    return cases


@pytest.mark.parametrize("case", sliding_tile_cases())
def test_sliding_tile_matches_reference(case):
    grid, tile, window, bs, prompt, last, sinks = case
    got = dense(ops.sliding_tile_block_mask(grid, tile, window, bs, prompt, last, sinks), bs, math.prod(grid) + prompt)
    assert torch.equal(got, ref.sliding_tile_block_mask(grid, tile, window, bs, prompt, last, sinks))


def test_masks_at_video_scale():
    """A Wan-sized latent (21 x 30 x 52 tokens, 128-token blocks) against the references."""
    grid, bs = (21, 30, 52), 128
    frames, ft = grid[0], grid[1] * grid[2]
    band = [math.ceil(max(ft / 2 ** ((d + 1).bit_length() - 1), 1.0)) for d in range(frames)]
    got = dense(ops.frame_band_block_mask(frames, ft, band, bs, 512, False, 1), bs, math.prod(grid) + 512)
    assert torch.equal(got, ref.frame_band_block_mask(frames, ft, band, bs, 512, False, 1))
    got = dense(ops.sliding_tile_block_mask(grid, (3, 6, 8), (3, 3, 3), bs, 0, False, 0), bs, math.prod(grid))
    assert torch.equal(got, ref.sliding_tile_block_mask(grid, (3, 6, 8), (3, 3, 3), bs, 0, False, 0))


OPCHECK = {
    "frame band": (torch.ops.stepfuse.frame_band_block_mask, (5, 6, [6, 3, 3, 1, 1], 16, 3, False, 1)),
    "sliding tile": (torch.ops.stepfuse.sliding_tile_block_mask, ([5, 7, 3], [2, 3, 2], [1, 3, 2], 8, 5, True, 1)),
}


@pytest.mark.parametrize("name", list(OPCHECK))
def test_opcheck(name):
    op, args = OPCHECK[name]
    torch.library.opcheck(op.default, args)


def test_compile_fullgraph():
    def layer(x):
        num, idx = ops.frame_band_block_mask(4, 6, [6, 3, 3, 1], 8, 2, False, 0)
        return x * num.sum() + idx.shape[1]

    x = torch.ones(3)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


BAD = {
    "band length": (lambda: ops.frame_band_block_mask(3, 8, [4, 2], 16), "band"),
    "frames": (lambda: ops.frame_band_block_mask(0, 8, [], 16), "frames"),
    "block size": (lambda: ops.frame_band_block_mask(3, 8, [4, 2, 1], 0), "block_size"),
    "prompt": (lambda: ops.frame_band_block_mask(3, 8, [4, 2, 1], 16, -1), "prompt_tokens"),
    "sinks": (lambda: ops.frame_band_block_mask(3, 8, [4, 2, 1], 16, 0, False, -1), "sinks"),
    "grid length": (lambda: ops.sliding_tile_block_mask([3, 4], [1, 1, 1], [1, 1, 1], 16), "triples"),
    "tile entry": (lambda: ops.sliding_tile_block_mask([3, 4, 4], [0, 1, 1], [1, 1, 1], 16), "entries"),
    "tile block size": (lambda: ops.sliding_tile_block_mask([3, 4, 4], [1, 1, 1], [1, 1, 1], 0), "block_size"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    call, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("name", ["band length", "block size", "prompt"])
def test_bad_input_fake(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    call, message = BAD[name]
    with FakeTensorMode(), pytest.raises(ValueError, match=message):
        call()
