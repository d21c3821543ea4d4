"""Tolerances, keyed by dtype in one place (DESIGN.md, "Tests and benchmarks")."""

from __future__ import annotations

import torch

# A kernel may be at most this many times worse than the reference run in the same dtype.
REFERENCE_ERROR_FACTOR = 2.0
# Unit roundoff of each working dtype: the floor under which differences are rounding noise.
EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def max_abs_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double().cpu() - expected.double().cpu()).abs().max()) if got.numel() else 0.0


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, low_precision_ref: torch.Tensor) -> None:
    """``got`` (kernel, working dtype) vs ``expected`` (float64 reference).

    Passes when the kernel's error is at most twice that of ``low_precision_ref`` (the
    reference computed in the working dtype), with a floor of a few ulps of the data scale.
    """
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.isfinite(got).all(), "kernel output has non-finite values"
    err = max_abs_error(got, expected)
    ref_err = max_abs_error(low_precision_ref, expected)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    floor = 4.0 * EPS[got.dtype] * max(scale, 1.0)
    bound = REFERENCE_ERROR_FACTOR * ref_err + floor
    assert err <= bound, f"error {err:.3e} > {REFERENCE_ERROR_FACTOR} x reference error {ref_err:.3e} + floor {floor:.1e}"
