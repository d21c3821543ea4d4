"""Pure-PyTorch references of ``guidance_stats`` and ``guided_step``, written formula by formula.

``guided_step`` here builds the guided prediction directly from the variant's formula
(see ``stepfuse.guidance``) on whole tensors, as diffusers' guiders do, instead of through
the per-sample weights the kernels use: the two derivations check each other.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import solver_step as _solver_step

(_KIND, _EXTRA, _STATS_X, _MOMENTUM, _P, _Q, _A0, _A1, _A2, _THRESHOLD, _BETA, _RESCALE) = range(12)


def guidance_stats(operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[B, n + n(n+1)/2]`` float64: per-sample sums, then the Gram matrix's upper triangle by rows."""
    flat = [t.reshape(t.shape[0], -1).to(torch.float64) for t in operands]
    n = len(flat)
    columns = [v.sum(dim=1) for v in flat]
    columns += [(flat[i] * flat[j]).sum(dim=1) for i in range(n) for j in range(i, n)]
    return torch.stack(columns, dim=1)


def _per_sample(fn, t: torch.Tensor) -> torch.Tensor:
    return fn(t.reshape(t.shape[0], -1), dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def guided_prediction(rule: Sequence[float], sample: torch.Tensor, branches: Sequence[torch.Tensor],
                      momentum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The guided prediction ``g`` in the rule's space (``p x + q b``), float64.

    Advances ``momentum`` in place when the rule has one.
    """
    f64 = torch.float64
    p, q = rule[_P], rule[_Q]
    x = sample.to(f64)
    v = [p * x + q * b.to(f64) for b in branches]
    cond, uncond = v[0], v[1]
    kind = int(rule[_KIND])
    w = rule[_A0]
    if kind == 0:
        g = rule[_A0] * cond + rule[_A1] * uncond
        if rule[_EXTRA]:
            g = g + rule[_A2] * v[2]
    elif kind == 1:
        dot = _per_sample(torch.sum, cond * uncond)
        s_star = dot / (_per_sample(torch.sum, uncond * uncond) + 1e-8)
        scaled = uncond * s_star
        g = (cond if rule[_A1] else scaled) + w * (cond - scaled)
    else:
        diff = cond - uncond
        if rule[_MOMENTUM]:
            diff = diff + rule[_BETA] * momentum.to(f64)
            momentum.copy_(diff.to(momentum.dtype))
        if rule[_THRESHOLD] > 0:
            norm = _per_sample(torch.linalg.vector_norm, diff)
            diff = diff * torch.clamp(rule[_THRESHOLD] / norm, max=1.0)
        unit = cond / torch.clamp(_per_sample(torch.linalg.vector_norm, cond), min=1e-12)
        parallel = _per_sample(torch.sum, diff * unit) * unit
        update = (diff - parallel) + rule[_A2] * parallel
        g = (cond if rule[_A1] else uncond) + w * update
    if rule[_RESCALE]:
        std_cond = _per_sample(torch.std, cond)
        std_g = _per_sample(torch.std, g)
        g = rule[_RESCALE] * g * (std_cond / std_g) + (1.0 - rule[_RESCALE]) * g
    return g


def guided_step(
    sample: torch.Tensor,
    branches: Sequence[torch.Tensor],
    stats: Optional[torch.Tensor],
    momentum: Optional[torch.Tensor],
    rule: Sequence[float],
    history: torch.Tensor,
    coeffs: Sequence[float],
    targets: Sequence[int],
    noise: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """Reference of ``torch.ops.stepfuse.guided_step`` (``stats`` is recomputed, not read)."""
    g = guided_prediction(rule, sample, branches, momentum)
    # The raw output whose conversion p x + q out is g, handed to the solver program.
    output = ((g - rule[_P] * sample.to(torch.float64)) / rule[_Q]).to(torch.float32)
    return _solver_step.solver_step(sample, output, history, coeffs, targets, noise, seed, offset)
