// CPU kernels of the feature-cache ops (csrc/cache.h).  Element loops run over chunks
// of kChunk elements with fp32 math in plain loops the compiler vectorises; threads
// split the tensor with at::parallel_for.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cache.h"

namespace stepfuse {
namespace {

constexpr int64_t kChunk = 1024;
constexpr int64_t kGrain = 32 * kChunk;
// cache_distance: fp32 lanes each sum kChunk / kLanes terms, a chunk's lanes are added
// pairwise, chunk sums go to a double per task of kDistanceBlock elements, and the tasks'
// partial sums are added in a fixed order.  The split depends only on the shape, so the
// result is the same bit for bit whatever the thread count; the rounding error stays
// near 100 fp32 ulps of the sum of magnitudes for any length.
constexpr int kLanes = 16;
constexpr int64_t kDistanceBlock = 64 * kChunk;

// IEEE half <-> float without branches (after F. Giesen's branch-free conversions), so
// that loops over float16 data vectorise on any x86-64; c10::Half's portable conversions
// are scalar bit manipulation with branches.  mask(): all ones where `condition` holds,
// selects written as arithmetic (GCC turned conditional expressions here into branches).
inline uint32_t mask(bool condition) { return 0u - static_cast<uint32_t>(condition); }

inline float half_to_float(uint16_t h) {
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  float f;
  std::memcpy(&f, &magnitude, sizeof(f));
  f *= 0x1p112f;  // exponent bias 15 -> 127; half subnormals become float normals exactly
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u |= 0x7F800000u & mask((h & 0x7C00u) == 0x7C00u);  // infinity, NaN
  u |= static_cast<uint32_t>(h & 0x8000u) << 16;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, overflow to infinity, NaN to a quiet NaN.
inline uint16_t float_to_half(float value) {
  constexpr uint32_t kInfinity = 255u << 23, kOverflow = (127u + 16u) << 23, kSmallest = 113u << 23;
  constexpr uint32_t kSubnormalMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t f;
  std::memcpy(&f, &value, sizeof(f));
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t large = 0x7C00u | (0x0200u & mask(f > kInfinity));
  // Below the smallest normal half: adding 0.5 lets the FPU round the subnormal mantissa.
  float magnitude, magic;
  std::memcpy(&magnitude, &f, sizeof(f));
  std::memcpy(&magic, &kSubnormalMagic, sizeof(magic));
  magnitude += magic;
  uint32_t subnormal;
  std::memcpy(&subnormal, &magnitude, sizeof(subnormal));
  subnormal -= kSubnormalMagic;
  // Normal: rebias the exponent (wrapping unsigned arithmetic), round half to even.
  const uint32_t normal = (f + ((15u - 127u) << 23) + 0xFFFu + ((f >> 13) & 1u)) >> 13;
  const uint32_t is_large = mask(f >= kOverflow), is_small = mask(f < kSmallest);
  const uint32_t bits = (large & is_large) | (subnormal & ~is_large & is_small) | (normal & ~(is_large | is_small));
  return static_cast<uint16_t>(bits | (sign >> 16));
}

template <typename T>
inline float load(T v) {
  if constexpr (std::is_same_v<T, at::Half>)
    return half_to_float(v.x);
  else
    return static_cast<float>(v);
}

// fp32 -> storage dtype.  c10::BFloat16's constructor branches on NaN, which keeps GCC
// from vectorising the loops; the same rounding (to nearest even, NaN -> 0x7FC0) as a select.
template <typename T>
inline T narrow_to(float v) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const auto rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return at::BFloat16(v != v ? uint16_t{0x7FC0} : rounded, at::BFloat16::from_bits());
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return at::Half(float_to_half(v), at::Half::from_bits());
  } else {
    return v;
  }
}

template <typename T, bool kUnitStride>
void distance_chunk(const T* __restrict__ a, const T* __restrict__ b, int64_t stride, int64_t n, double& diff,
                    double& base) {
  float d[kLanes] = {}, m[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) {
      const int64_t j = kUnitStride ? i + l : (i + l) * stride;
      const float x = load(a[j]), y = load(b[j]);
      d[l] += std::fabs(x - y);
      m[l] += std::fabs(y);
    }
  }
  for (; i < n; ++i) {
    const int64_t j = kUnitStride ? i : i * stride;
    const float x = load(a[j]), y = load(b[j]);
    d[0] += std::fabs(x - y);
    m[0] += std::fabs(y);
  }
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) d[l] += d[l + width], m[l] += m[l + width];
  diff += d[0];
  base += m[0];
}

template <typename T>
void distance_typed(DistanceOperands& ops) {
  const T* pa = ops.a.const_data_ptr<T>();
  const T* pb = ops.b.const_data_ptr<T>();
  const int64_t batch = ops.batch, per_sample = ops.per_sample, stride = ops.stride, count = ops.count;
  const int64_t blocks = (count + kDistanceBlock - 1) / kDistanceBlock;
  std::vector<double> partial(static_cast<size_t>(batch * blocks * 2), 0.0);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t sample = task / blocks, first = (task % blocks) * kDistanceBlock;
      const int64_t end = std::min(count, first + kDistanceBlock);
      double diff = 0.0, base = 0.0;
      for (int64_t start = first; start < end; start += kChunk) {
        const int64_t offset = sample * per_sample + start * stride, n = std::min(kChunk, end - start);
        if (stride == 1)
          distance_chunk<T, true>(pa + offset, pb + offset, 1, n, diff, base);
        else
          distance_chunk<T, false>(pa + offset, pb + offset, stride, n, diff, base);
      }
      partial[2 * task] = diff;
      partial[2 * task + 1] = base;
    }
  });
  float* o = ops.out.data_ptr<float>();
  for (int64_t sample = 0; sample < batch; ++sample) {
    double diff = 0.0, base = 0.0;
    for (int64_t block = 0; block < blocks; ++block) {
      diff += partial[2 * (sample * blocks + block)];
      base += partial[2 * (sample * blocks + block) + 1];
    }
    o[2 * sample] = static_cast<float>(diff);
    o[2 * sample + 1] = static_cast<float>(base);
  }
}

// Calls body(start, n) for consecutive chunks of [0, numel), split across threads.
template <typename Body>
void for_each_chunk(int64_t numel, const Body& body) {
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end; start += kChunk) body(start, std::min(kChunk, end - start));
  });
}

// new[0] = f, new[k] = (new[k-1] - old[k-1]) / dt (TaylorSeer's finite differences):
// each slot's old value is read just before it is overwritten, and the unrounded fp32
// difference quotient carries on to the next order.
template <typename T, typename F>
void taylor_update_typed(const T* feature, F* factors, int64_t numel, float dt, int updated) {
  for_each_chunk(numel, [&](int64_t start, int64_t n) {
    float cur[kChunk];
    for (int64_t i = 0; i < n; ++i) cur[i] = load(feature[start + i]);
    for (int k = 0; k < updated; ++k) {
      F* slot = factors + k * numel + start;
      for (int64_t i = 0; i < n; ++i) {
        const float old = load(slot[i]);
        slot[i] = narrow_to<F>(cur[i]);
        cur[i] = (cur[i] - old) / dt;
      }
    }
    F* last = factors + updated * numel + start;
    for (int64_t i = 0; i < n; ++i) last[i] = narrow_to<F>(cur[i]);
  });
}

// out = (accumulate ? out : 0) + sum_k w_k factors[k], in fp32.
template <typename F, typename O>
void taylor_predict_typed(const F* factors, const TaylorWeights& w, O* out, int64_t numel, bool accumulate) {
  for_each_chunk(numel, [&](int64_t start, int64_t n) {
    float acc[kChunk];
    for (int64_t i = 0; i < n; ++i) acc[i] = accumulate ? load(out[start + i]) : 0.f;
    for (int k = 0; k < w.terms; ++k) {
      const F* slot = factors + k * numel + start;
      const float wk = w.w[k];
      for (int64_t i = 0; i < n; ++i) acc[i] += wk * load(slot[i]);
    }
    for (int64_t i = 0; i < n; ++i) out[start + i] = narrow_to<O>(acc[i]);
  });
}

}  // namespace

at::Tensor cache_distance_cpu(const at::Tensor& a, const at::Tensor& b, int64_t stride) {
  return cache_distance_dispatch(a, b, stride, [](DistanceOperands& ops) {
    dispatch_cache_dtype(ops.a.scalar_type(), "cache_distance", "a",
                         [&](auto tag) { distance_typed<decltype(tag)>(ops); });
  });
}

at::Tensor cache_decide_cpu(const at::Tensor& sums, at::Tensor& state, at::ArrayRef<double> poly, double threshold,
                            bool accumulate, bool pooled, int64_t max_consecutive, int64_t max_cached, bool force) {
  return cache_decide_dispatch(
      sums, state, poly, threshold, accumulate, pooled, max_consecutive, max_cached, force,
      [](const at::Tensor& s, at::Tensor& st, const DecideParams& params, at::Tensor& skip) {
        *skip.data_ptr<bool>() =
            cache_decide_update(s.const_data_ptr<float>(), s.size(0), st.data_ptr<double>(), params);
      });
}

void cache_residual_store_cpu(const at::Tensor& output, const at::Tensor& input, at::Tensor& residual) {
  cache_residual_store_dispatch(output, input, residual, [](const at::Tensor& o, const at::Tensor& in, at::Tensor& r) {
    dispatch_cache_dtypes("cache_residual_store", o, "output", r, "residual", [&](auto data_tag, auto res_tag) {
      using T = decltype(data_tag);
      using R = decltype(res_tag);
      const T* po = o.const_data_ptr<T>();
      const T* pi = in.const_data_ptr<T>();
      R* pr = r.data_ptr<R>();
      for_each_chunk(o.numel(), [&](int64_t start, int64_t n) {
        for (int64_t i = start; i < start + n; ++i) pr[i] = narrow_to<R>(load(po[i]) - load(pi[i]));
      });
    });
  });
}

void cache_residual_apply_cpu(at::Tensor& x, const at::Tensor& residual) {
  cache_residual_apply_dispatch(x, residual, [](at::Tensor& t, const at::Tensor& r) {
    dispatch_cache_dtypes("cache_residual_apply", t, "x", r, "residual", [&](auto data_tag, auto res_tag) {
      using T = decltype(data_tag);
      using R = decltype(res_tag);
      T* px = t.data_ptr<T>();
      const R* pr = r.const_data_ptr<R>();
      for_each_chunk(t.numel(), [&](int64_t start, int64_t n) {
        for (int64_t i = start; i < start + n; ++i) px[i] = narrow_to<T>(load(px[i]) + load(pr[i]));
      });
    });
  });
}

void cache_taylor_update_cpu(const at::Tensor& feature, at::Tensor& factors, double dt, int64_t valid) {
  cache_taylor_update_dispatch(feature, factors, dt, valid, [](const at::Tensor& f, at::Tensor& fac, float h, int k) {
    dispatch_cache_dtypes("cache_taylor_update", f, "feature", fac, "factors", [&](auto t, auto u) {
      taylor_update_typed(f.const_data_ptr<decltype(t)>(), fac.data_ptr<decltype(u)>(), f.numel(), h, k);
    });
  });
}

void cache_taylor_predict_cpu(const at::Tensor& factors, double dt, int64_t terms, at::Tensor& out, bool accumulate) {
  cache_taylor_predict_dispatch(
      factors, dt, terms, out, accumulate, [](const at::Tensor& fac, const TaylorWeights& w, at::Tensor& o, bool add) {
        dispatch_cache_dtypes("cache_taylor_predict", fac, "factors", o, "out", [&](auto t, auto u) {
          taylor_predict_typed(fac.const_data_ptr<decltype(t)>(), w, o.data_ptr<decltype(u)>(), o.numel(), add);
        });
      });
}

}  // namespace stepfuse
