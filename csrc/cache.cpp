// Host-side glue of the feature-cache ops (csrc/cache.h): input checks and contiguous
// operands, shared by the CPU and CUDA entry points.
#include "cache.h"

#include <cmath>

namespace stepfuse {
namespace {

bool is_cache_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

void check_cache_dtype(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_cache_dtype(t.scalar_type()), op, ": ", name, " must be float32, float16 or bfloat16, got ",
                   t.scalar_type());
}

// `t` must sit on `like`'s device with the shape `sizes`.
void check_placed(const char* op, const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name,
                  at::IntArrayRef sizes) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on ", like.device(), " like ", like_name,
                    ", got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
}

// A stored operand (residual, factors) is float32 or the dtype of the data it derives from.
void check_storage_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType data,
                         const char* data_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == data, op, ": ", name,
                   " must be float32 or the dtype of ", data_name, " (", data, "), got ", t.scalar_type());
}

// Runs `kernel` on a contiguous view of `target`, which is written in place: the tensor
// itself when it is contiguous, else a scratch copy written back afterwards.
template <typename Kernel>
void write_in_place(at::Tensor& target, const Kernel& kernel) {
  at::Tensor work = target.contiguous();
  kernel(work);
  if (!work.is_same(target)) target.copy_(work);
}

}  // namespace

at::Tensor cache_distance_dispatch(const at::Tensor& a, const at::Tensor& b, int64_t stride,
                                   const DistanceLauncher& launch) {
  constexpr const char* op = "cache_distance";
  check_cache_dtype(op, a, "a");
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), op, ": b must have dtype ", a.scalar_type(), " like a, got ",
                   b.scalar_type());
  check_placed(op, b, "b", a, "a", a.sizes());
  TORCH_CHECK_VALUE(a.dim() >= 1 && a.size(0) >= 1 && a.numel() >= a.size(0), op,
                    ": a must be [B, ...] with B >= 1 and at least one element per sample, got shape ", a.sizes());
  TORCH_CHECK_VALUE(stride >= 1, op, ": stride must be >= 1, got ", stride);
  DistanceOperands ops{a.contiguous(), b.contiguous(), at::empty({a.size(0), 2}, a.options().dtype(at::kFloat)),
                       a.size(0), a.numel() / a.size(0), stride, 0};
  ops.count = (ops.per_sample + stride - 1) / stride;
  launch(ops);
  return ops.out;
}

at::Tensor cache_decide_dispatch(const at::Tensor& sums, at::Tensor& state, at::ArrayRef<double> poly, double threshold,
                                 bool accumulate, bool pooled, int64_t max_consecutive, int64_t max_cached, bool force,
                                 const DecideLauncher& launch) {
  constexpr const char* op = "cache_decide";
  TORCH_CHECK_TYPE(sums.scalar_type() == at::kFloat, op, ": sums must be float32 (from cache_distance), got ",
                   sums.scalar_type());
  TORCH_CHECK_VALUE(sums.dim() == 2 && sums.size(0) >= 1 && sums.size(1) == 2, op,
                    ": sums must be [B, 2] with B >= 1 (from cache_distance), got shape ", sums.sizes());
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble, op, ": state must be float64 [4], got ", state.scalar_type());
  check_placed(op, state, "state", sums, "sums", {kStateSize});
  TORCH_CHECK_VALUE(static_cast<int64_t>(poly.size()) <= kMaxPolyTerms, op, ": poly must have at most ",
                    kMaxPolyTerms, " coefficients, got ", poly.size());
  TORCH_CHECK_VALUE(std::isfinite(threshold), op, ": threshold must be finite, got ", threshold);
  DecideParams params{};
  for (size_t k = 0; k < poly.size(); ++k) {
    TORCH_CHECK_VALUE(std::isfinite(poly[k]), op, ": poly must be finite, got ", poly[k], " at ", k);
    params.poly[k] = poly[k];
  }
  params.num_poly = static_cast<int>(poly.size());
  params.threshold = threshold;
  params.accumulate = accumulate;
  params.pooled = pooled;
  params.force = force;
  params.max_consecutive = max_consecutive;
  params.max_cached = max_cached;
  at::Tensor skip = at::empty({}, sums.options().dtype(at::kBool));
  const at::Tensor s = sums.contiguous();
  write_in_place(state, [&](at::Tensor& work) { launch(s, work, params, skip); });
  return skip;
}

void cache_residual_store_dispatch(const at::Tensor& output, const at::Tensor& input, at::Tensor& residual,
                                   const ResidualStoreLauncher& launch) {
  constexpr const char* op = "cache_residual_store";
  check_cache_dtype(op, output, "output");
  TORCH_CHECK_TYPE(input.scalar_type() == output.scalar_type(), op, ": input must have dtype ", output.scalar_type(),
                   " like output, got ", input.scalar_type());
  check_placed(op, input, "input", output, "output", output.sizes());
  check_storage_dtype(op, residual, "residual", output.scalar_type(), "output");
  check_placed(op, residual, "residual", output, "output", output.sizes());
  if (output.numel() == 0) return;
  const at::Tensor o = output.contiguous(), i = input.contiguous();
  write_in_place(residual, [&](at::Tensor& work) { launch(o, i, work); });
}

void cache_residual_apply_dispatch(at::Tensor& x, const at::Tensor& residual, const ResidualApplyLauncher& launch) {
  constexpr const char* op = "cache_residual_apply";
  check_cache_dtype(op, x, "x");
  check_storage_dtype(op, residual, "residual", x.scalar_type(), "x");
  check_placed(op, residual, "residual", x, "x", x.sizes());
  if (x.numel() == 0) return;
  const at::Tensor r = residual.contiguous();
  write_in_place(x, [&](at::Tensor& work) { launch(work, r); });
}

namespace {

// factors: [order + 1, *data_shape] with 0 <= order <= kMaxTaylorOrder.
void check_factors(const char* op, const at::Tensor& factors) {
  TORCH_CHECK_VALUE(factors.dim() >= 1 && factors.size(0) >= 1 && factors.size(0) <= kMaxTaylorOrder + 1, op,
                    ": factors must be [order + 1, ...] with order 0 to ", kMaxTaylorOrder, ", got shape ",
                    factors.sizes());
}

}  // namespace

void cache_taylor_update_dispatch(const at::Tensor& feature, at::Tensor& factors, double dt, int64_t valid,
                                  const TaylorUpdateLauncher& launch) {
  constexpr const char* op = "cache_taylor_update";
  check_cache_dtype(op, feature, "feature");
  check_factors(op, factors);
  check_storage_dtype(op, factors, "factors", feature.scalar_type(), "feature");
  std::vector<int64_t> sizes{factors.size(0)};
  sizes.insert(sizes.end(), feature.sizes().begin(), feature.sizes().end());
  check_placed(op, factors, "factors", feature, "feature", sizes);
  TORCH_CHECK_VALUE(std::isfinite(dt) && dt != 0.0, op, ": dt must be finite and non-zero, got ", dt);
  TORCH_CHECK_VALUE(valid >= 0, op, ": valid must be >= 0, got ", valid);
  if (feature.numel() == 0) return;
  const int updated = static_cast<int>(std::min<int64_t>(valid, factors.size(0) - 1));
  const at::Tensor f = feature.contiguous();
  write_in_place(factors, [&](at::Tensor& work) { launch(f, work, static_cast<float>(dt), updated); });
}

void cache_taylor_predict_dispatch(const at::Tensor& factors, double dt, int64_t terms, at::Tensor& out,
                                   bool accumulate, const TaylorPredictLauncher& launch) {
  constexpr const char* op = "cache_taylor_predict";
  check_cache_dtype(op, factors, "factors");
  check_factors(op, factors);
  check_cache_dtype(op, out, "out");
  check_placed(op, out, "out", factors, "factors", factors.sizes().slice(1));
  TORCH_CHECK_VALUE(std::isfinite(dt), op, ": dt must be finite, got ", dt);
  TORCH_CHECK_VALUE(terms >= 1 && terms <= factors.size(0), op, ": terms must be 1 to ", factors.size(0),
                    " (factors.size(0)), got ", terms);
  if (out.numel() == 0) return;
  // Taylor series about the last full step (TaylorSeer, Liu et al. 2025):
  // F(t + dt) ~ sum_k F^(k)(t) dt^k / k!.
  TaylorWeights weights{};
  weights.terms = static_cast<int>(terms);
  double w = 1.0;
  for (int k = 0; k < weights.terms; ++k) {
    weights.w[k] = static_cast<float>(w);
    w *= dt / (k + 1);
  }
  const at::Tensor f = factors.contiguous();
  write_in_place(out, [&](at::Tensor& work) { launch(f, weights, work, accumulate); });
}

}  // namespace stepfuse
