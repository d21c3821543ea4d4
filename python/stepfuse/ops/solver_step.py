"""The fused solver step: ``torch.ops.stepfuse.solver_step``.

The compiled op checks its inputs (``ValueError``/``TypeError`` naming the
argument); this wrapper only unpacks a :class:`~stepfuse.solvers.program.StepProgram`.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C
from ..solvers.program import StepProgram

_op = torch.ops.stepfuse.solver_step.default
_is_compiling = torch.compiler.is_compiling


def solver_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    history: torch.Tensor,
    program: StepProgram,
    noise: Optional[torch.Tensor] = None,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """Run one step ``program``: writes its history slots in place, returns the next sample.

    ``history`` is ``[R, *sample.shape]`` in the sample's dtype or float32.  Noise, when
    the program uses it, is ``noise`` if given, else drawn in the kernel from
    Philox(``seed``, ``offset``) (see ``stepfuse.ref.philox``).
    """
    if _is_compiling():
        return _op(sample, model_output, history, program.coeffs_list, program.targets_list, noise, seed, offset)
    return _C.solver_step(sample, model_output, history, _program_handle(program), noise, seed, offset)


def _program_handle(program: StepProgram):
    """The program converted once to C++ vectors, cached on it."""
    handle = program.__dict__.get("_handle")
    if handle is None:
        handle = _C.ProgramHandle(program.coeffs_list, program.targets_list)
        object.__setattr__(program, "_handle", handle)
    return handle


def _check_like_sample(op: str, name: str, t: torch.Tensor, sample: torch.Tensor) -> None:
    if t.device != sample.device:
        raise ValueError(f"{op}: {name} must be on {sample.device} like sample, got {t.device}")
    if t.dtype != sample.dtype:
        raise TypeError(f"{op}: {name} must have dtype {sample.dtype} like sample, got {t.dtype}")
    if t.shape != sample.shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(sample.shape)} like sample, got {tuple(t.shape)}")


def _fake_step(op: str, sample, history, coeffs, targets, noise) -> torch.Tensor:
    """The checks a step op shares with its C++ twin (csrc/solver_step.cpp), and its output."""
    if noise is not None:
        _check_like_sample(op, "noise", noise, sample)
    if history.shape[1:] != sample.shape or history.device != sample.device:
        raise ValueError(f"{op}: history must be [R, *sample.shape] on {sample.device}, got "
                         f"{tuple(history.shape)} on {history.device}")
    if len(coeffs) != len(targets) * (history.shape[0] + 3):
        raise ValueError(f"{op}: coeffs must have {len(targets) * (history.shape[0] + 3)} entries")
    return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)


@torch.library.register_fake("stepfuse::solver_step")
def _solver_step_fake(sample, model_output, history, coeffs, targets, noise=None, seed=0, offset=0):
    # Mirrors the shape/device/dtype checks of csrc/solver_step.cpp for traced and meta calls.
    _check_like_sample("solver_step", "model_output", model_output, sample)
    return _fake_step("solver_step", sample, history, coeffs, targets, noise)
