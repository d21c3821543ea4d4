// CUDA kernel of the fused solver step, shared by solver_step.cu and guidance.cu: one
// thread handles kVec = 4 consecutive elements with vector loads and stores (128-bit
// for fp32, 64-bit for 16-bit types), grid-stride over the tensor; a scalar kernel
// covers misaligned pointers.  The model-output column comes from a functor: a tensor
// (solver_step) or the guided combination of the branches (guided_step).
//
// Everything here sits in an anonymous namespace: each .cu file gets its own copy of
// the kernels it instantiates, so no kernel symbol is registered by two modules.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

#include "../solver_step.h"

namespace stepfuse {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_vec(const T* src) {
  return *reinterpret_cast<const Pack<T, N>*>(src);
}

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* __restrict__ src, float (&dst)[N]) {
  const Pack<T, N> pack = load_vec<T, N>(src);
#pragma unroll
  for (int e = 0; e < N; ++e) dst[e] = static_cast<float>(pack.v[e]);
}

inline bool is_aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Model output read from a tensor (solver_step); kept packed in its storage dtype.
template <typename scalar_t>
struct TensorModelOutput {
  const scalar_t* __restrict__ out;
  static constexpr bool reads_sample = false;

  template <int kVec>
  __device__ __forceinline__ Pack<scalar_t, kVec> load(const StepProgram& p, int64_t base,
                                                       const Pack<scalar_t, kVec>& /*x*/) const {
    Pack<scalar_t, kVec> po{};
    if (p.reads_model_output) po = load_vec<scalar_t, kVec>(out + base);
    return po;
  }

  bool vectorisable(int vec) const { return is_aligned(out, sizeof(scalar_t) * vec); }
};

// kSlots bounds the history slots the kernel handles (4 covers solvers up to third
// order; 8 the rest): registers, and so occupancy, scale with it.  `model_output.load`
// returns the vector's model-output column (any element type convertible to float);
// it gets the sample vector, loaded when the program or the functor reads it.
template <typename scalar_t, typename hist_t, int kVec, int kSlots, typename ModelOutput>
__global__ void __launch_bounds__(256) solver_step_kernel(const StepProgram p, const scalar_t* __restrict__ x,
                                                          const ModelOutput model_output, hist_t* __restrict__ hist,
                                                          const scalar_t* __restrict__ noise,
                                                          scalar_t* __restrict__ next, int64_t numel) {
  static_assert(kVec == 1 || kVec % 4 == 0, "a vector covers whole Philox blocks");
  const int64_t num_vec = (numel + kVec - 1) / kVec;
  for (int64_t vi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; vi < num_vec;
       vi += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = vi * kVec;
    // Issue every load of the vector before any arithmetic; operands stay packed in
    // their storage dtype (half the registers of widened copies for 16-bit types).
    Pack<scalar_t, kVec> px{};
    Pack<hist_t, kVec> slot[kSlots];
    float z[kVec];
    if (p.reads_sample || model_output.reads_sample) px = load_vec<scalar_t, kVec>(x + base);
    const auto po = model_output.template load<kVec>(p, base, px);
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      if (p.load_mask & (1u << s)) slot[s] = load_vec<hist_t, kVec>(hist + s * numel + base);
    if (p.uses_noise) {
      if (noise != nullptr) {
        load_pack<scalar_t, kVec>(noise + base, z);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; e += 4) {
          const int64_t index = base + e;
          const Normal4 normal = philox_normal4(p.offset + static_cast<uint64_t>(index / 4), p.seed);
#pragma unroll
          for (int l = 0; l < (kVec < 4 ? kVec : 4); ++l) z[e + l] = normal.v[kVec < 4 ? index % 4 : l];
        }
      }
    }
    Pack<scalar_t, kVec> result;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float element[kSlots + 3];
      element[kSampleColumn] = p.reads_sample ? static_cast<float>(px.v[e]) : 0.f;
      element[kModelOutputColumn] = static_cast<float>(po.v[e]);
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
        element[slot_column(s)] = (p.load_mask & (1u << s)) ? static_cast<float>(slot[s].v[e]) : 0.f;
      element[kSlots + 2] = p.uses_noise ? z[e] : 0.f;
      result.v[e] = static_cast<scalar_t>(evaluate_rows<kSlots>(
          p, element, [](float value) { return static_cast<float>(static_cast<hist_t>(value)); }));
#pragma unroll
      for (int s = 0; s < kSlots; ++s)
        if (p.store_mask & (1u << s)) slot[s].v[e] = static_cast<hist_t>(element[slot_column(s)]);
    }
    *reinterpret_cast<Pack<scalar_t, kVec>*>(next + base) = result;
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      if (p.store_mask & (1u << s)) *reinterpret_cast<Pack<hist_t, kVec>*>(hist + s * numel + base) = slot[s];
  }
}

// Launches the step on the current stream: the vector kernel when every pointer (the
// functor's included, `model_output.vectorisable`) allows it, else the scalar one.
template <typename scalar_t, typename hist_t, typename ModelOutput>
void launch_solver_step_kernel(const StepProgram& p, StepOperands& ops, const ModelOutput& model_output) {
  const auto* x = ops.sample.const_data_ptr<scalar_t>();
  const scalar_t* noise = ops.noise ? ops.noise->const_data_ptr<scalar_t>() : nullptr;
  auto* hist = ops.history.data_ptr<hist_t>();
  auto* next = ops.next_sample.data_ptr<scalar_t>();
  const int64_t numel = ops.numel;

  // fp32: 4 elements, 128-bit accesses.  16-bit: also 4 elements (64-bit accesses); 8 per
  // thread (128-bit) needs ~100 registers, halves the resident warps and measured 49.8%
  // of copy bandwidth against 64.0% for this choice (H100, bf16 DPM++ 2M at the Wan shape).
  constexpr int kVec = 4;
  constexpr size_t kBytes = sizeof(scalar_t) * kVec;
  const bool vectorised = numel % kVec == 0 && is_aligned(x, kBytes) && model_output.vectorisable(kVec) &&
                          is_aligned(next, kBytes) && (noise == nullptr || is_aligned(noise, kBytes)) &&
                          is_aligned(hist, sizeof(hist_t) * kVec);
  constexpr int kThreads = 256;
  const int64_t vec = vectorised ? kVec : 1;
  const int64_t needed = (numel / vec + kThreads - 1) / kThreads;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, sms * 32)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto kernel) {
    kernel<<<blocks, kThreads, 0, stream>>>(p, x, model_output, hist, noise, next, numel);
  };
  const bool few_slots = p.num_slots <= 4;
  if (vectorised)
    few_slots ? launch(solver_step_kernel<scalar_t, hist_t, kVec, 4, ModelOutput>)
              : launch(solver_step_kernel<scalar_t, hist_t, kVec, 8, ModelOutput>);
  else
    few_slots ? launch(solver_step_kernel<scalar_t, hist_t, 1, 4, ModelOutput>)
              : launch(solver_step_kernel<scalar_t, hist_t, 1, 8, ModelOutput>);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The plain step's launcher (model output read from ops.model_output), also the guided
// step's when its weights fold into the program (csrc/guidance.cpp).
inline void launch_solver_step_cuda(const StepProgram& program, StepOperands& ops) {
  SF_DISPATCH_STEP_TYPES(ops.sample.scalar_type(), ops.history.scalar_type(), "solver_step", [&] {
    const TensorModelOutput<scalar_t> out{ops.model_output.const_data_ptr<scalar_t>()};
    launch_solver_step_kernel<scalar_t, hist_t>(program, ops, out);
  });
}

}  // namespace
}  // namespace stepfuse
