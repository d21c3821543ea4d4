"""DPM-Solver-2 stages on diffusers' interleaved schedule (KDPM2 and its ancestral variant).

DPM-Solver-2 (Lu et al. 2022a, Alg. 1 with r1 = 1/2), written in Karras et al.'s VE form
(2022, sec. 3 and the DPM-2 sampler of k-diffusion): from ``sigma`` an Euler step to the
log-midpoint ``sigma_mid`` gives ``u``; the slope ``(u - D(u)) / sigma_mid`` there carries
the *start* sample over the whole interval to ``sigma_to``. The ancestral variant steps to
``sigma_down`` and adds noise of std ``sigma_up`` (Ho et al. 2020's ancestral sampling).

diffusers runs the two stages as two scheduler steps; the first keeps the start sample in
ring slot 0 for the second. Which sigmas a stage reads is the scheduler's business
(``stage``), so that its index conventions are reproduced exactly.
"""

from __future__ import annotations

from typing import Callable, Optional

from .euler import euler_terms
from .program import OUTPUT, StepProgram


def dpm2_plan(num_steps: int, start_index: int, stage: Callable[[int, bool], tuple],
              conversion: Callable[[float], tuple]) -> list:
    """One program per scheduler step; stages alternate from ``start_index`` on.

    ``stage(i, first)`` gives ``(sigma, sigma_mid, sigma_to, sigma_up)`` of step ``i``;
    ``conversion(sigma)`` the ``(p, q)`` with ``D = p * x + q * out`` for a model output at ``sigma``.

    * first stage: slot 0 <- ``x``; output ``x + (sigma_mid - sigma) * (x - D) / sigma``;
    * second stage, at ``u`` with ``D`` read at ``sigma_mid``:
      output ``slot0 + (sigma_to - sigma) * (u - D) / sigma_mid + sigma_up * z``.
    """
    plan: list[Optional[StepProgram]] = [None] * num_steps
    for i in range(start_index, num_steps):
        first = (i - start_index) % 2 == 0
        sigma, sigma_mid, sigma_to, sigma_up = stage(i, first)
        if first:
            rows = [(OUTPUT, euler_terms(*conversion(sigma), sigma, sigma_mid))]
            if i + 1 < num_steps:  # the last step has no second stage to feed
                rows.insert(0, (0, {"x": 1.0}))
        else:
            if not sigma_mid > 0.0:
                raise ValueError(f"step {i} is a second stage at sigma_mid = {sigma_mid}; choose another begin_index")
            p, q = conversion(sigma_mid)
            r = (sigma_to - sigma) / sigma_mid
            terms = {0: 1.0, "x": r * (1.0 - p), "out": -r * q}
            if sigma_up:
                terms["noise"] = sigma_up
            rows = [(OUTPUT, terms)]
        plan[i] = StepProgram.build(1, rows)
    return plan
