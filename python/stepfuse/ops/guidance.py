"""Fused guidance: ``torch.ops.stepfuse.guidance_stats`` and ``torch.ops.stepfuse.guided_step``.

The compiled ops check their inputs (``ValueError``/``TypeError`` naming the argument);
these wrappers unpack a :class:`~stepfuse.solvers.program.StepProgram`.  The rule list
comes from :meth:`stepfuse.guidance.Guidance.rule`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import _C  # noqa: F401  (registers the ops)
from ..solvers.program import StepProgram
from .solver_step import _check_like_sample, _program_handle

_is_compiling = torch.compiler.is_compiling
# Converted rules, by value: a run reuses a handful (one per guidance config and conversion).
_rule_handles: dict = {}
_stats_op = torch.ops.stepfuse.guidance_stats.default
_step_op = torch.ops.stepfuse.guided_step.default


def guidance_stats(operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample sums and Gram matrix (float64 ``[B, n + n(n+1)/2]``) of 1 to 5 operands in one pass."""
    operands = list(operands)
    if not operands:  # the dispatcher needs a tensor to pick a kernel: say what is wrong first
        raise ValueError("guidance_stats: operands must hold 1 to 5 tensors, got none")
    return _stats_op(operands)


def guided_step(
    sample: torch.Tensor,
    branches: Sequence[torch.Tensor],
    stats: Optional[torch.Tensor],
    momentum: Optional[torch.Tensor],
    rule: Sequence[float],
    history: torch.Tensor,
    program: StepProgram,
    noise: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """Run ``program`` with the guided combination of ``branches`` as its model output.

    ``branches`` is ``[cond, uncond]`` or ``[cond, uncond, extra]``; ``momentum`` (float32,
    APG) is advanced in place; history slots are written as in ``solver_step``.
    """
    if _is_compiling():
        return _step_op(sample, list(branches), stats, momentum, list(rule), history, program.coeffs_list,
                        program.targets_list, noise, seed, offset)
    rule_handle = _rule_handles.get(tuple(rule))
    if rule_handle is None:
        rule_handle = _rule_handles.setdefault(tuple(rule), _C.RuleHandle(list(rule)))
    return _C.guided_step(sample, list(branches), stats, momentum, rule_handle, history, _program_handle(program),
                          noise, seed, offset)


@torch.library.register_fake("stepfuse::guidance_stats")
def _guidance_stats_fake(operands):
    # Mirrors csrc/guidance.cpp's checks for traced and meta calls.
    if not 1 <= len(operands) <= 5:
        raise ValueError(f"guidance_stats: operands must hold 1 to 5 tensors, got {len(operands)}")
    first = operands[0]
    for k, t in enumerate(operands):
        if t.shape != first.shape or t.device != first.device:
            raise ValueError(f"guidance_stats: operands[{k}] must have shape {tuple(first.shape)} on {first.device}")
    n = len(operands)
    return first.new_empty((first.shape[0], n + n * (n + 1) // 2), dtype=torch.float64)


@torch.library.register_fake("stepfuse::guided_step")
def _guided_step_fake(sample, branches, stats, momentum, rule, history, coeffs, targets, noise=None, seed=0,
                      offset=0):
    for k, b in enumerate(branches):
        _check_like_sample(f"branches[{k}]", b, sample)
    if noise is not None:
        _check_like_sample("noise", noise, sample)
    if history.shape[1:] != sample.shape or history.device != sample.device:
        raise ValueError(f"guided_step: history must be [R, *sample.shape] on {sample.device}, got "
                         f"{tuple(history.shape)} on {history.device}")
    return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
