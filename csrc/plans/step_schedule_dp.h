// Optimal step schedules by dynamic programming over a teacher grid.
//
// "Optimal Stepsize for Diffusion Sampling" (Pei et al. 2025, sec. 3.2) and the
// step-selection DP of "Learning to Efficiently Sample from Diffusion Probabilistic
// Models" (Watson et al. 2021) pick K of the N intervals of a fine teacher grid:
// with cost[j][i] the error of one student step from grid point j to grid point i
// (j < i), the schedule 0 = i_0 < i_1 < ... < i_K = N minimising the summed cost is
//     best[k][i] = min_{j < i} best[k-1][j] + cost[j][i],   best[0][0] = 0,
// solved in O(K N^2) time and O(K N) memory on plain host arrays.
#pragma once

#include <cstdint>
#include <vector>

namespace stepfuse {

// cost: row-major (n_points x n_points); entries with j >= i are ignored, +inf forbids a
// step, NaN is rejected.  Returns the K + 1 grid indices from 0 to n_points - 1.
// Throws std::invalid_argument on bad arguments (pybind11 raises ValueError).
std::vector<int64_t> optimal_step_indices(const double* cost, int64_t n_points, int64_t num_steps);

}  // namespace stepfuse
