"""Pure-PyTorch reference of ``torch.ops.stepfuse.solver_step`` (fp32 math, written for clarity)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .philox import philox_normal


def solver_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    coeffs: Sequence[float],
    targets: Sequence[int],
    noise: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Evaluate a step program (see ``stepfuse.solvers.program``); writes history slots in place.

    Returns the next sample in ``sample.dtype``.  ``compute_dtype`` lets tests run the
    reference itself in a low precision to measure that precision's own error.
    """
    num_slots = history.shape[0]
    width = 3 + num_slots
    x = sample.to(compute_dtype)
    operands = [x, model_output.to(compute_dtype)] + [None] * num_slots + [None]
    uses_noise = any(coeffs[r * width + width - 1] != 0.0 for r in range(len(targets)))
    if uses_noise:
        if noise is not None:
            operands[-1] = noise.to(compute_dtype)
        else:
            z = philox_normal(sample.numel(), seed, offset).to(torch.float32)
            operands[-1] = z.to(compute_dtype).reshape(sample.shape).to(sample.device)
    for s in range(num_slots):
        operands[2 + s] = history[s].to(compute_dtype)
    result = None
    for r, target in enumerate(targets):
        acc = torch.zeros_like(x)
        for c in range(width):
            coeff = coeffs[r * width + c]
            if coeff != 0.0:
                acc = acc + coeff * operands[c]
        if target >= 0:
            history[target].copy_(acc)
            # Later rows see the value as stored, rounded to the history dtype.
            operands[2 + target] = history[target].to(compute_dtype)
        else:
            result = acc
    return result.to(sample.dtype)
