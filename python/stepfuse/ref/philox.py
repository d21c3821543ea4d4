"""Reference of the counter-based normal generator used inside stepfuse kernels.

Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011) keyed by a 64-bit ``seed``; element ``i`` of a tensor uses counter block
``offset + i // 4`` and lane ``i % 4``.  The four 32-bit words of a block become
four standard normals by two Box-Muller transforms.  A sampler advances
``offset`` by ``philox_blocks(numel)`` per draw, so draws never overlap.
"""

from __future__ import annotations

import numpy as np
import torch

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_MASK = np.uint64(0xFFFFFFFF)


def philox_blocks(numel: int) -> int:
    """Counter blocks one draw of ``numel`` normals consumes."""
    return (numel + 3) // 4


def philox4x32(counter_block: np.ndarray, seed: int) -> np.ndarray:
    """Philox4x32-10 of 64-bit counters ``counter_block`` (words c2 = c3 = 0); returns ``[n, 4]`` uint32."""
    block = counter_block.astype(np.uint64)
    c0 = (block & _MASK).astype(np.uint32)
    c1 = (block >> np.uint64(32)).astype(np.uint32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint32(seed & 0xFFFFFFFF)
    k1 = np.uint32((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for r in range(10):
            p0 = _M0 * c0.astype(np.uint64)
            p1 = _M1 * c2.astype(np.uint64)
            hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), (p0 & _MASK).astype(np.uint32)
            hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), (p1 & _MASK).astype(np.uint32)
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            if r < 9:
                k0 = np.uint32(k0 + _W0)
                k1 = np.uint32(k1 + _W1)
    return np.stack([c0, c1, c2, c3], axis=-1)


def philox_normal(numel: int, seed: int, offset: int) -> torch.Tensor:
    """``numel`` standard normals (float64) exactly as the kernels draw them, before rounding to fp32."""
    blocks = np.arange(philox_blocks(numel), dtype=np.uint64) + np.uint64(offset)
    words = philox4x32(blocks, seed).astype(np.float64)
    # 24-bit uniforms: u1 in (0, 1] for the log, u2 in [0, 1) for the angle.
    top = np.floor(words / 256.0)
    u1 = (top[:, 0::2] + 1.0) * 2.0**-24
    u2 = top[:, 1::2] * 2.0**-24
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * np.pi * u2
    z = np.stack([radius[:, 0] * np.cos(angle[:, 0]), radius[:, 0] * np.sin(angle[:, 0]),
                  radius[:, 1] * np.cos(angle[:, 1]), radius[:, 1] * np.sin(angle[:, 1])], axis=-1)
    return torch.from_numpy(z.reshape(-1)[:numel].copy())
