"""Reference for ``stepfuse._C.optimal_step_indices``: the same DP in plain Python."""

from __future__ import annotations

import math
from typing import List


def optimal_step_indices(cost, num_steps: int) -> List[int]:
    """Minimum-cost path 0 -> N with exactly ``num_steps`` edges j -> i (j < i)."""
    n = len(cost)
    best = [[math.inf] * n for _ in range(num_steps + 1)]
    parent = [[-1] * n for _ in range(num_steps + 1)]
    best[0][0] = 0.0
    for k in range(1, num_steps + 1):
        for i in range(1, n):
            for j in range(i):
                c = best[k - 1][j] + float(cost[j][i])
                if c < best[k][i]:
                    best[k][i], parent[k][i] = c, j
    path, i = [n - 1], n - 1
    for k in range(num_steps, 0, -1):
        i = parent[k][i]
        path.append(i)
    return path[::-1]
