// Fused feature-cache ops (DESIGN.md, "feature caching"): the relative-L1 distance that
// first-block / dual-block caches, TeaCache and MagCache-style policies threshold, the
// skip decision itself (a device-side state machine, so a sampling loop never waits on
// the host), residual store / apply, and TaylorSeer's finite-difference forecast.
// Host glue (input checks, contiguous operands) in csrc/cache.cpp; kernels in
// csrc/cpu/cache_kernel.cpp and csrc/cuda/cache.cu; reference in python/stepfuse/ref/cache.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

#include "stepfuse/philox.h"  // SF_HOST_DEVICE

namespace stepfuse {

// Rescaling polynomials of TeaCache are degree 4; 16 coefficients leave room.
constexpr int kMaxPolyTerms = 16;
// TaylorSeer uses orders 1 to 2 in practice; factors hold at most 5 slots.
constexpr int kMaxTaylorOrder = 4;
// Floor of the denominators of the relative distance (a sample that is all zeros).
constexpr double kDistanceFloor = 1e-30;

// Slots of the decision state (float64 [4], updated in place on the device).
enum CacheState { kAccumulator = 0, kConsecutive = 1, kTotalCached = 2, kLastMetric = 3, kStateSize = 4 };

// Everything cache_decide needs besides its tensors, passed to kernels by value.
struct DecideParams {
  double poly[kMaxPolyTerms];  // numpy.polyval order: poly[0] multiplies the highest power
  int num_poly;                // 0: the metric is used as is
  double threshold;
  bool accumulate, pooled, force;
  int64_t max_consecutive, max_cached;  // < 0: unbounded
};

// The skip decision over per-sample sums [batch, 2] = (sum |a - b|, sum |b|), in double.
// The metric is the relative L1 change of the block input (first-block cache; TeaCache,
// Liu et al. 2025, which then rescales it with a fitted polynomial and accumulates
// it across skipped steps until it reaches the threshold).
SF_HOST_DEVICE inline bool cache_decide_update(const float* sums, int64_t batch, double* state,
                                               const DecideParams& p) {
  double diff = 0.0, base = 0.0, worst = 0.0;
  for (int64_t i = 0; i < batch; ++i) {
    const double d = sums[2 * i], m = sums[2 * i + 1];
    diff += d;
    base += m;
    const double rel = d / (m > kDistanceFloor ? m : kDistanceFloor);
    if (i == 0 || rel > worst) worst = rel;
  }
  const double metric = p.pooled ? diff / (base > kDistanceFloor ? base : kDistanceFloor) : worst;
  double value = metric;
  if (p.num_poly > 0) {
    value = p.poly[0];  // Horner
    for (int k = 1; k < p.num_poly; ++k) value = value * metric + p.poly[k];
  }
  const double candidate = p.accumulate ? state[kAccumulator] + value : value;
  const bool skip = !p.force && candidate < p.threshold &&
                    (p.max_consecutive < 0 || state[kConsecutive] < static_cast<double>(p.max_consecutive)) &&
                    (p.max_cached < 0 || state[kTotalCached] < static_cast<double>(p.max_cached));
  if (skip) {
    state[kAccumulator] = p.accumulate ? candidate : 0.0;
    state[kConsecutive] += 1.0;
    state[kTotalCached] += 1.0;
  } else {
    state[kAccumulator] = 0.0;
    state[kConsecutive] = 0.0;
  }
  state[kLastMetric] = metric;
  return skip;
}

// Taylor forecast weights dt^k / k! (computed in double on the host, applied in fp32).
struct TaylorWeights {
  float w[kMaxTaylorOrder + 1];
  int terms;
};

// cache_distance's operands as the kernels see them: contiguous [batch, per_sample],
// summed over elements 0, stride, 2 stride, ... (`count` of them) of each sample.
struct DistanceOperands {
  at::Tensor a, b;
  at::Tensor out;  // float32 [batch, 2]
  int64_t batch, per_sample, stride, count;
};

// Kernel launchers of one device type; operands arrive checked and contiguous.
using DistanceLauncher = std::function<void(DistanceOperands& ops)>;
using DecideLauncher =
    std::function<void(const at::Tensor& sums, at::Tensor& state, const DecideParams& params, at::Tensor& skip)>;
using ResidualStoreLauncher =
    std::function<void(const at::Tensor& output, const at::Tensor& input, at::Tensor& residual)>;
using ResidualApplyLauncher = std::function<void(at::Tensor& x, const at::Tensor& residual)>;
// `updated` = min(valid, order): slots 1..updated get a new difference quotient.
using TaylorUpdateLauncher =
    std::function<void(const at::Tensor& feature, at::Tensor& factors, float dt, int updated)>;
using TaylorPredictLauncher =
    std::function<void(const at::Tensor& factors, const TaylorWeights& weights, at::Tensor& out, bool accumulate)>;

at::Tensor cache_distance_dispatch(const at::Tensor& a, const at::Tensor& b, int64_t stride,
                                   const DistanceLauncher& launch);
at::Tensor cache_decide_dispatch(const at::Tensor& sums, at::Tensor& state, at::ArrayRef<double> poly, double threshold,
                                 bool accumulate, bool pooled, int64_t max_consecutive, int64_t max_cached, bool force,
                                 const DecideLauncher& launch);
void cache_residual_store_dispatch(const at::Tensor& output, const at::Tensor& input, at::Tensor& residual,
                                   const ResidualStoreLauncher& launch);
void cache_residual_apply_dispatch(at::Tensor& x, const at::Tensor& residual, const ResidualApplyLauncher& launch);
void cache_taylor_update_dispatch(const at::Tensor& feature, at::Tensor& factors, double dt, int64_t valid,
                                  const TaylorUpdateLauncher& launch);
void cache_taylor_predict_dispatch(const at::Tensor& factors, double dt, int64_t terms, at::Tensor& out,
                                   bool accumulate, const TaylorPredictLauncher& launch);

at::Tensor cache_distance_cpu(const at::Tensor& a, const at::Tensor& b, int64_t stride);
at::Tensor cache_decide_cpu(const at::Tensor& sums, at::Tensor& state, at::ArrayRef<double> poly, double threshold,
                            bool accumulate, bool pooled, int64_t max_consecutive, int64_t max_cached, bool force);
void cache_residual_store_cpu(const at::Tensor& output, const at::Tensor& input, at::Tensor& residual);
void cache_residual_apply_cpu(at::Tensor& x, const at::Tensor& residual);
void cache_taylor_update_cpu(const at::Tensor& feature, at::Tensor& factors, double dt, int64_t valid);
void cache_taylor_predict_cpu(const at::Tensor& factors, double dt, int64_t terms, at::Tensor& out, bool accumulate);

// Calls f(T{}) with T the storage type of `dtype` (float, at::Half or at::BFloat16).
template <typename F>
void dispatch_cache_dtype(at::ScalarType dtype, const char* op, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

// Calls f(T{}, U{}) with the storage types of two tensors.
template <typename F>
void dispatch_cache_dtypes(const char* op, const at::Tensor& first, const char* first_name, const at::Tensor& second,
                           const char* second_name, F&& f) {
  dispatch_cache_dtype(first.scalar_type(), op, first_name, [&](auto t) {
    dispatch_cache_dtype(second.scalar_type(), op, second_name, [&](auto u) { f(t, u); });
  });
}

}  // namespace stepfuse
