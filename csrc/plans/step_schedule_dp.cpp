#include "step_schedule_dp.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace stepfuse {

std::vector<int64_t> optimal_step_indices(const double* cost, int64_t n_points, int64_t num_steps) {
  if (n_points < 2) {
    throw std::invalid_argument("cost must be at least 2x2 (a grid of n_points >= 2), got n_points=" +
                                std::to_string(n_points));
  }
  const int64_t n_intervals = n_points - 1;
  if (num_steps < 1 || num_steps > n_intervals) {
    throw std::invalid_argument("num_steps must be in [1, " + std::to_string(n_intervals) + "], got " +
                                std::to_string(num_steps));
  }
  for (int64_t j = 0; j < n_points; ++j) {
    for (int64_t i = j + 1; i < n_points; ++i) {
      const double c = cost[j * n_points + i];
      if (std::isnan(c) || c < 0.0) {
        throw std::invalid_argument("cost must be non-negative (or +inf to forbid a step), got cost[" +
                                    std::to_string(j) + "][" + std::to_string(i) + "]=" + std::to_string(c));
      }
    }
  }
  constexpr double kInf = std::numeric_limits<double>::infinity();
  // best[k][i]: least cost of reaching grid point i in exactly k steps; parent for backtracking.
  std::vector<double> best(static_cast<size_t>((num_steps + 1) * n_points), kInf);
  std::vector<int64_t> parent(best.size(), -1);
  best[0] = 0.0;
  for (int64_t k = 1; k <= num_steps; ++k) {
    const double* prev = best.data() + (k - 1) * n_points;
    double* cur = best.data() + k * n_points;
    int64_t* par = parent.data() + k * n_points;
    // Point i needs k steps behind it and num_steps - k ahead of it.
    const int64_t last = (k == num_steps) ? n_points - 1 : n_points - 1 - (num_steps - k);
    for (int64_t i = k; i <= last; ++i) {
      for (int64_t j = k - 1; j < i; ++j) {
        const double candidate = prev[j] + cost[j * n_points + i];
        if (candidate < cur[i]) {
          cur[i] = candidate;
          par[i] = j;
        }
      }
    }
  }
  if (!std::isfinite(best[num_steps * n_points + n_points - 1])) {
    throw std::invalid_argument("cost forbids every schedule of num_steps=" + std::to_string(num_steps) +
                                " steps (all paths have infinite cost)");
  }
  std::vector<int64_t> indices(static_cast<size_t>(num_steps + 1));
  int64_t i = n_points - 1;
  for (int64_t k = num_steps; k >= 0; --k) {
    indices[static_cast<size_t>(k)] = i;
    if (k > 0) i = parent[k * n_points + i];
  }
  return indices;
}

}  // namespace stepfuse
