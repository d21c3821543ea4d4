"""Fused guidance: ``torch.ops.stepfuse.guidance_stats`` and ``torch.ops.stepfuse.guided_step``.

The compiled ops check their inputs (``ValueError``/``TypeError`` naming the argument);
these wrappers unpack a :class:`~stepfuse.solvers.program.StepProgram`.  The rule list
comes from :meth:`stepfuse.guidance.Guidance.rule`.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from .. import _C  # registers the ops; eager fast paths
from ..solvers.program import StepProgram
from .solver_step import _check_like_sample, _fake_step, _program_handle

_is_compiling = torch.compiler.is_compiling
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
    return _C.guided_step(sample, list(branches), stats, momentum, _rule_handle(tuple(rule)), history,
                          _program_handle(program), noise, seed, offset)


@functools.lru_cache(maxsize=256)
def _rule_handle(rule: tuple):
    # Converted once by value: a run reuses a handful of rules (one per config and step
    # conversion); bounded, since data-prediction guidance makes one per step of each schedule.
    return _C.RuleHandle(list(rule))


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
        _check_like_sample("guided_step", f"branches[{k}]", b, sample)
    return _fake_step("guided_step", sample, history, coeffs, targets, noise)
