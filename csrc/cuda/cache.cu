// CUDA kernels of the feature-cache ops (csrc/cache.h).  Nothing here reads a device
// value on the host: the skip decision stays on the device for the caller's torch.where
// or graph-captured branch logic.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../cache.h"
#include "solver_step_kernel.cuh"  // Pack, load_vec, is_aligned

namespace stepfuse {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// cache_distance: each thread sums between 4 and 16 vectors (or strided elements) of
// its block's chunk in fp32; blocks reduce in double.
constexpr int64_t kMinItemsPerThread = 4;
constexpr int64_t kMaxItemsPerThread = 16;

// Sum of (d, m) over the block, valid in thread 0.  A fixed reduction tree: the result
// does not depend on scheduling.
__device__ __forceinline__ void block_sum2(double& d, double& m) {
  __shared__ double shared[2][kThreads / kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int s = kWarp / 2; s > 0; s /= 2) {
    d += __shfl_down_sync(0xffffffffu, d, s);
    m += __shfl_down_sync(0xffffffffu, m, s);
  }
  if (lane == 0) shared[0][warp] = d, shared[1][warp] = m;
  __syncthreads();
  if (warp == 0) {
    d = lane < kThreads / kWarp ? shared[0][lane] : 0.0;
    m = lane < kThreads / kWarp ? shared[1][lane] : 0.0;
#pragma unroll
    for (int s = kWarp / 2; s > 0; s /= 2) {
      d += __shfl_down_sync(0xffffffffu, d, s);
      m += __shfl_down_sync(0xffffffffu, m, s);
    }
  }
}

// Block = (sample, chunk of `chunk` items); an item is a kVec-element vector (stride 1,
// aligned) or one strided element.  Writes the block's (sum |a - b|, sum |b|) to
// partial[2 * blockIdx.x]: no atomics, so repeated calls agree bit for bit.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    distance_partial_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t per_sample, int64_t stride,
                            int64_t count, int64_t chunk, int64_t chunks, double* __restrict__ partial) {
  const int64_t sample = blockIdx.x / chunks;
  const int64_t begin = (blockIdx.x % chunks) * chunk;
  const int64_t end = begin + chunk < count ? begin + chunk : count;
  const T* sa = a + sample * per_sample;
  const T* sb = b + sample * per_sample;
  float d = 0.f, m = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    if constexpr (kVec > 1) {
      const Pack<T, kVec> va = load_vec<T, kVec>(sa + i * kVec), vb = load_vec<T, kVec>(sb + i * kVec);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float x = static_cast<float>(va.v[e]), y = static_cast<float>(vb.v[e]);
        d += fabsf(x - y);
        m += fabsf(y);
      }
    } else {
      const float x = static_cast<float>(sa[i * stride]), y = static_cast<float>(sb[i * stride]);
      d += fabsf(x - y);
      m += fabsf(y);
    }
  }
  double dd = d, dm = m;
  block_sum2(dd, dm);
  if (threadIdx.x == 0) partial[2 * blockIdx.x] = dd, partial[2 * blockIdx.x + 1] = dm;
}

// One block per sample adds its chunks' partial sums in a fixed order.
__global__ void __launch_bounds__(kThreads)
    distance_final_kernel(const double* __restrict__ partial, int64_t chunks, float* __restrict__ out) {
  const int64_t sample = blockIdx.x;
  double d = 0.0, m = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
    d += partial[2 * (sample * chunks + c)];
    m += partial[2 * (sample * chunks + c) + 1];
  }
  block_sum2(d, m);
  if (threadIdx.x == 0) out[2 * sample] = static_cast<float>(d), out[2 * sample + 1] = static_cast<float>(m);
}

int multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

template <typename T>
void launch_distance(DistanceOperands& ops) {
  const T* pa = ops.a.const_data_ptr<T>();
  const T* pb = ops.b.const_data_ptr<T>();
  const int64_t batch = ops.batch, per_sample = ops.per_sample, stride = ops.stride;
  // 16-byte loads: 4 fp32 or 8 16-bit elements, when no vector straddles two samples.
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorised = stride == 1 && per_sample % kVec == 0 && is_aligned(pa, 16) && is_aligned(pb, 16);
  const int64_t count = vectorised ? per_sample / kVec : ops.count;
  // About eight resident blocks per multiprocessor over the whole batch, so that a single
  // Flux or Wan latent (B = 1) still fills the GPU.
  const int64_t wanted = std::max<int64_t>(1, (static_cast<int64_t>(multiprocessors()) * 8 + batch - 1) / batch);
  const int64_t chunk = std::clamp<int64_t>((count + wanted - 1) / wanted, kThreads * kMinItemsPerThread,
                                            kThreads * kMaxItemsPerThread);
  const int64_t chunks = (count + chunk - 1) / chunk;
  const int64_t blocks = batch * chunks;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int>::max() && batch <= std::numeric_limits<int>::max(),
                    "cache_distance: a of shape ", ops.a.sizes(), " is too large for one launch");
  at::Tensor partial = at::empty({blocks, 2}, ops.a.options().dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vectorised)
    distance_partial_kernel<T, kVec><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
        pa, pb, per_sample, 1, count, chunk, chunks, partial.data_ptr<double>());
  else
    distance_partial_kernel<T, 1><<<static_cast<int>(blocks), kThreads, 0, stream>>>(
        pa, pb, per_sample, stride, count, chunk, chunks, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  distance_final_kernel<<<static_cast<int>(batch), kThreads, 0, stream>>>(partial.const_data_ptr<double>(), chunks,
                                                                           ops.out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The decision is a handful of double operations over B rows: one thread.
__global__ void decide_kernel(const float* __restrict__ sums, int64_t batch, double* __restrict__ state,
                              const DecideParams params, bool* __restrict__ skip) {
  *skip = cache_decide_update(sums, batch, state, params);
}

// Grid-stride launch of an element-wise kernel over `numel` elements.
template <typename Kernel, typename... Args>
void launch_elementwise(int64_t numel, Kernel kernel, Args... args) {
  const int64_t needed = (numel + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, multiprocessors() * 32)));
  kernel<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(args..., numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define SF_GRID_STRIDE(i, numel)                                                                         \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (numel);             \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// The residual kernels move kVec elements per item (16-byte loads of the activations when
// every pointer is aligned and numel divides; kVec = 1 otherwise): they are pure bandwidth.
template <int kVec, typename T, typename R>
__global__ void residual_store_kernel(const T* __restrict__ output, const T* __restrict__ input,
                                      R* __restrict__ residual, int64_t items) {
  SF_GRID_STRIDE(i, items) {
    const Pack<T, kVec> o = load_vec<T, kVec>(output + i * kVec), in = load_vec<T, kVec>(input + i * kVec);
    Pack<R, kVec> r;
#pragma unroll
    for (int e = 0; e < kVec; ++e) r.v[e] = static_cast<R>(static_cast<float>(o.v[e]) - static_cast<float>(in.v[e]));
    *reinterpret_cast<Pack<R, kVec>*>(residual + i * kVec) = r;
  }
}

template <int kVec, typename T, typename R>
__global__ void residual_apply_kernel(T* __restrict__ x, const R* __restrict__ residual, int64_t items) {
  SF_GRID_STRIDE(i, items) {
    Pack<T, kVec> v = load_vec<T, kVec>(x + i * kVec);
    const Pack<R, kVec> r = load_vec<R, kVec>(residual + i * kVec);
#pragma unroll
    for (int e = 0; e < kVec; ++e) v.v[e] = static_cast<T>(static_cast<float>(v.v[e]) + static_cast<float>(r.v[e]));
    *reinterpret_cast<Pack<T, kVec>*>(x + i * kVec) = v;
  }
}

// new[0] = f, new[k] = (new[k-1] - old[k-1]) / dt for k <= updated (TaylorSeer's
// finite-difference derivatives), each old slot read before it is overwritten.
template <typename T, typename F>
__global__ void taylor_update_kernel(const T* __restrict__ feature, F* __restrict__ factors, float dt, int updated,
                                     int64_t numel) {
  SF_GRID_STRIDE(i, numel) {
    float cur = static_cast<float>(feature[i]);
    for (int k = 0; k <= updated; ++k) {
      F* slot = factors + k * numel + i;
      const float old = k < updated ? static_cast<float>(*slot) : 0.f;
      *slot = static_cast<F>(cur);
      cur = (cur - old) / dt;
    }
  }
}

template <typename F, typename O>
__global__ void taylor_predict_kernel(const F* __restrict__ factors, const TaylorWeights weights, O* __restrict__ out,
                                      bool accumulate, int64_t numel) {
  SF_GRID_STRIDE(i, numel) {
    float acc = accumulate ? static_cast<float>(out[i]) : 0.f;
    for (int k = 0; k < weights.terms; ++k) acc += weights.w[k] * static_cast<float>(factors[k * numel + i]);
    out[i] = static_cast<O>(acc);
  }
}

#undef SF_GRID_STRIDE

at::Tensor cache_distance_cuda(const at::Tensor& a, const at::Tensor& b, int64_t stride) {
  const c10::cuda::OptionalCUDAGuard guard(a.device());
  return cache_distance_dispatch(a, b, stride, [](DistanceOperands& ops) {
    dispatch_cache_dtype(ops.a.scalar_type(), "cache_distance", "a",
                         [&](auto tag) { launch_distance<decltype(tag)>(ops); });
  });
}

at::Tensor cache_decide_cuda(const at::Tensor& sums, at::Tensor& state, at::ArrayRef<double> poly, double threshold,
                             bool accumulate, bool pooled, int64_t max_consecutive, int64_t max_cached, bool force) {
  const c10::cuda::OptionalCUDAGuard guard(sums.device());
  return cache_decide_dispatch(
      sums, state, poly, threshold, accumulate, pooled, max_consecutive, max_cached, force,
      [](const at::Tensor& s, at::Tensor& st, const DecideParams& params, at::Tensor& skip) {
        decide_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(s.const_data_ptr<float>(), s.size(0),
                                                                      st.data_ptr<double>(), params,
                                                                      skip.data_ptr<bool>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void cache_residual_store_cuda(const at::Tensor& output, const at::Tensor& input, at::Tensor& residual) {
  const c10::cuda::OptionalCUDAGuard guard(output.device());
  cache_residual_store_dispatch(output, input, residual, [](const at::Tensor& o, const at::Tensor& in, at::Tensor& r) {
    dispatch_cache_dtypes("cache_residual_store", o, "output", r, "residual", [&](auto t, auto u) {
      using T = decltype(t);
      using R = decltype(u);
      constexpr int kVec = 16 / sizeof(T);
      const T *op = o.const_data_ptr<T>(), *ip = in.const_data_ptr<T>();
      R* rp = r.data_ptr<R>();
      if (o.numel() % kVec == 0 && is_aligned(op, 16) && is_aligned(ip, 16) && is_aligned(rp, sizeof(R) * kVec))
        launch_elementwise(o.numel() / kVec, residual_store_kernel<kVec, T, R>, op, ip, rp);
      else
        launch_elementwise(o.numel(), residual_store_kernel<1, T, R>, op, ip, rp);
    });
  });
}

void cache_residual_apply_cuda(at::Tensor& x, const at::Tensor& residual) {
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  cache_residual_apply_dispatch(x, residual, [](at::Tensor& t, const at::Tensor& r) {
    dispatch_cache_dtypes("cache_residual_apply", t, "x", r, "residual", [&](auto xt, auto rt) {
      using T = decltype(xt);
      using R = decltype(rt);
      constexpr int kVec = 16 / sizeof(T);
      T* xp = t.data_ptr<T>();
      const R* rp = r.const_data_ptr<R>();
      if (t.numel() % kVec == 0 && is_aligned(xp, 16) && is_aligned(rp, sizeof(R) * kVec))
        launch_elementwise(t.numel() / kVec, residual_apply_kernel<kVec, T, R>, xp, rp);
      else
        launch_elementwise(t.numel(), residual_apply_kernel<1, T, R>, xp, rp);
    });
  });
}

void cache_taylor_update_cuda(const at::Tensor& feature, at::Tensor& factors, double dt, int64_t valid) {
  const c10::cuda::OptionalCUDAGuard guard(feature.device());
  const auto launch = [](const at::Tensor& f, at::Tensor& fac, float h, int updated) {
    dispatch_cache_dtypes("cache_taylor_update", f, "feature", fac, "factors", [&](auto t, auto u) {
      using T = decltype(t);
      using F = decltype(u);
      launch_elementwise(f.numel(), taylor_update_kernel<T, F>, f.const_data_ptr<T>(), fac.data_ptr<F>(), h, updated);
    });
  };
  cache_taylor_update_dispatch(feature, factors, dt, valid, launch);
}

void cache_taylor_predict_cuda(const at::Tensor& factors, double dt, int64_t terms, at::Tensor& out, bool accumulate) {
  const c10::cuda::OptionalCUDAGuard guard(factors.device());
  cache_taylor_predict_dispatch(
      factors, dt, terms, out, accumulate,
      [](const at::Tensor& fac, const TaylorWeights& w, at::Tensor& o, bool acc) {
        dispatch_cache_dtypes("cache_taylor_predict", fac, "factors", o, "out", [&](auto t, auto u) {
          using F = decltype(t);
          using O = decltype(u);
          launch_elementwise(o.numel(), taylor_predict_kernel<F, O>, fac.const_data_ptr<F>(), w, o.data_ptr<O>(), acc);
        });
      });
}

}  // namespace
}  // namespace stepfuse

TORCH_LIBRARY_IMPL(stepfuse, CUDA, m) {
  m.impl("cache_distance", &stepfuse::cache_distance_cuda);
  m.impl("cache_decide", &stepfuse::cache_decide_cuda);
  m.impl("cache_residual_store", &stepfuse::cache_residual_store_cuda);
  m.impl("cache_residual_apply", &stepfuse::cache_residual_apply_cuda);
  m.impl("cache_taylor_update", &stepfuse::cache_taylor_update_cuda);
  m.impl("cache_taylor_predict", &stepfuse::cache_taylor_predict_cuda);
}
