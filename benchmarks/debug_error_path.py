"""Raise a bad-input error through both entry points of the fused step (crash triage)."""

import torch

import stepfuse
from stepfuse import ops
from stepfuse.solvers.program import StepProgram

p = StepProgram.build(1, [(0, {"x": 1.0}), (-1, {"x": 1.0})])
for name, call in [
    ("fast path", lambda: ops.solver_step(torch.randn(2, 3), torch.randn(2, 4), torch.zeros(1, 2, 3), p)),
    ("torch.ops", lambda: torch.ops.stepfuse.solver_step(torch.randn(2, 3), torch.randn(2, 4), torch.zeros(1, 2, 3),
                                                         p.coeffs_list, p.targets_list, None, 0, 0)),
]:
    try:
        call()
    except Exception as e:  # noqa: BLE001
        print(name, type(e).__name__, str(e).splitlines()[0], flush=True)
