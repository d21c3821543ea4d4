"""Flow-matching Euler plans (rectified flow: Liu et al. 2022; Esser et al. 2024, SD3).

The sample at flow time ``s`` is ``x_s = (1 - s) x0 + s eps`` and the model predicts the
velocity ``v = eps - x0``.  Between schedule points ``s_i -> s_{i+1}``:

* ODE (Euler on dx/ds = v):  x_{i+1} = x_i + (s_{i+1} - s_i) v;
* stochastic ("ping-pong", as diffusers' ``stochastic_sampling``): denoise to
  ``x0 = x_i - s_i v``, then re-noise to the next level with fresh noise,
  x_{i+1} = (1 - s_{i+1}) x0 + s_{i+1} z.

The sigmas may also increase (diffusers' ``invert_sigmas``); the formulas are the same.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .program import OUTPUT, StepProgram


def flow_euler_program(sigma: float, sigma_next: float, stochastic: bool = False) -> StepProgram:
    """One Euler (or ping-pong) step from ``sigma`` to ``sigma_next``, float64 coefficients."""
    if not stochastic:
        return StepProgram.build(0, [(OUTPUT, {"x": 1.0, "out": sigma_next - sigma})])
    keep = 1.0 - sigma_next
    return StepProgram.build(0, [(OUTPUT, {"x": keep, "out": -keep * sigma, "noise": sigma_next})])


def flow_euler_plan(sigmas: np.ndarray, start_index: int = 0, stochastic: bool = False) -> list:
    """Programs for every step of a ``len(sigmas) - 1``-step schedule (``None`` before ``start_index``)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    plan: list[Optional[StepProgram]] = [None] * (len(sigmas) - 1)
    for i in range(start_index, len(plan)):
        plan[i] = flow_euler_program(float(sigmas[i]), float(sigmas[i + 1]), stochastic)
    return plan
