// CUDA kernels of fused guidance (stepfuse/guidance.h): the per-sample statistics
// pass (guidance_stats) and the guided solver step (guided_step).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>

#include "solver_step_kernel.cuh"

namespace stepfuse {
namespace {

constexpr int kStatsThreads = 256;
constexpr int kWarp = 32;
// Elements a statistics block covers at least (16 per thread): fewer blocks per
// sample means fewer double atomics.
constexpr int64_t kStatsMinChunk = 16 * kStatsThreads;

template <typename T, int N>
struct StatsInputs {
  const T* operand[N];
  // The APG momentum buffer as the last operand: float32 while the branches are 16-bit
  // (null otherwise, and operand[N - 1] is read instead).
  const float* momentum;
};

// One block covers `chunk` elements of one sample (block index = sample * chunks +
// chunk index); each thread sums its strided elements' products in double (the weights
// take differences of these sums, see csrc/cpu/solver_step_kernel.h's lane_dot), the
// block reduces in double and adds its partial sums to stats[sample] atomically (stats
// starts at zero).
template <typename T, int N>
__global__ void __launch_bounds__(kStatsThreads) guidance_stats_kernel(const StatsInputs<T, N> in, int64_t per_sample,
                                                                       int64_t chunk, int64_t chunks,
                                                                       double* __restrict__ stats) {
  constexpr int kWidth = guidance_stats_width(N);
  constexpr int kWarps = kStatsThreads / kWarp;
  const int64_t sample = blockIdx.x / chunks;
  const int64_t begin = (blockIdx.x % chunks) * chunk;
  const int64_t end = begin + chunk < per_sample ? begin + chunk : per_sample;
  const int64_t offset = sample * per_sample;
  double acc[kWidth];
#pragma unroll
  for (int k = 0; k < kWidth; ++k) acc[k] = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kStatsThreads) {
    double v[N];
#pragma unroll
    for (int k = 0; k < N; ++k)
      v[k] = (k == N - 1 && in.momentum != nullptr) ? static_cast<double>(in.momentum[offset + i])
                                                    : static_cast<double>(static_cast<float>(in.operand[k][offset + i]));
#pragma unroll
    for (int a = 0; a < N; ++a) {
      acc[a] += v[a];
#pragma unroll
      for (int b = a; b < N; ++b) acc[gram_index(N, a, b)] = fma(v[a], v[b], acc[gram_index(N, a, b)]);
    }
  }
  __shared__ double partial[kWidth][kWarps];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
#pragma unroll
  for (int k = 0; k < kWidth; ++k) {
    double s = acc[k];
#pragma unroll
    for (int d = kWarp / 2; d > 0; d /= 2) s += __shfl_down_sync(0xffffffffu, s, d);
    if (lane == 0) partial[k][warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < kWidth; ++k) {
      double s = lane < kWarps ? partial[k][lane] : 0.0;
#pragma unroll
      for (int d = kWarps / 2; d > 0; d /= 2) s += __shfl_down_sync(0xffffffffu, s, d);
      if (lane == 0) atomicAdd(stats + sample * kWidth + k, s);
    }
  }
}

template <typename T, int N>
void launch_guidance_stats_typed(const std::vector<at::Tensor>& operands, at::Tensor& stats) {
  StatsInputs<T, N> in{};
  // As on the CPU: a float32 last operand after 16-bit ones is the momentum buffer.
  const bool float_last = !std::is_same_v<T, float> && operands[N - 1].scalar_type() == at::kFloat;
  for (int k = 0; k < N; ++k)
    in.operand[k] = (k == N - 1 && float_last) ? nullptr : operands[k].const_data_ptr<T>();
  in.momentum = float_last ? operands[N - 1].const_data_ptr<float>() : nullptr;
  const int64_t batch = operands[0].size(0);
  const int64_t per_sample = operands[0].numel() / batch;
  // About eight resident blocks per multiprocessor over the whole batch.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = std::max<int64_t>(1, (static_cast<int64_t>(sms) * 8 + batch - 1) / batch);
  const int64_t chunk = std::max<int64_t>(kStatsMinChunk, (per_sample + wanted - 1) / wanted);
  const int64_t chunks = (per_sample + chunk - 1) / chunk;
  const int64_t blocks = batch * chunks;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int>::max(), "guidance_stats: batch of ", batch,
                    " samples is too large for one launch");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  guidance_stats_kernel<T, N><<<static_cast<int>(blocks), kStatsThreads, 0, stream>>>(in, per_sample, chunk, chunks,
                                                                                      stats.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_guidance_stats_cuda(const std::vector<at::Tensor>& operands, at::Tensor& stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, operands[0].scalar_type(), "guidance_stats", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      switch (operands.size()) {
        case 1: return launch_guidance_stats_typed<scalar_t, 1>(operands, stats);
        case 2: return launch_guidance_stats_typed<scalar_t, 2>(operands, stats);
        case 3: return launch_guidance_stats_typed<scalar_t, 3>(operands, stats);
        case 4: return launch_guidance_stats_typed<scalar_t, 4>(operands, stats);
        default: return launch_guidance_stats_typed<scalar_t, 5>(operands, stats);
      }
    }
  });
}

// Per-sample weights of the guided combination, on the device so that the step needs
// no host sync: one thread per sample, in double (guidance_weights).  `stats` is null
// when the rule needs none (the weights are then the same for every sample).
__global__ void guidance_weights_kernel(const GuidanceRule rule, const double* __restrict__ stats, int64_t per_sample,
                                        int64_t batch, float* __restrict__ weights) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= batch) return;
  const int width = guidance_stats_width(rule.num_stats_operands);
  float w[kGuideOperands];
  guidance_weights(rule, stats != nullptr ? stats + b * width : nullptr, per_sample, w);
#pragma unroll
  for (int k = 0; k < kGuideOperands; ++k) weights[b * kGuideOperands + k] = w[k];
}

// The guided model output out = sum_k w_k operand_k over (x, cond, uncond, extra,
// momentum) with the weights of the element's sample; the momentum buffer is read
// for it and then advanced, m <- q (cond - uncond) + beta m, element for element.
template <typename scalar_t>
struct GuidedModelOutput {
  const scalar_t* __restrict__ cond;
  const scalar_t* __restrict__ uncond;
  const scalar_t* __restrict__ extra;  // null without a third branch
  float* __restrict__ momentum;        // null without APG momentum
  const float* __restrict__ weights;   // [batch, kGuideOperands]
  int64_t per_sample;
  float q, beta;
  bool reads_sample;  // w_x is non-zero only for a conversion with p != 0

  template <int kVec>
  __device__ __forceinline__ Pack<float, kVec> load(const StepProgram& /*p*/, int64_t base,
                                                    const Pack<scalar_t, kVec>& x) const {
    const Pack<scalar_t, kVec> c = load_vec<scalar_t, kVec>(cond + base);
    const Pack<scalar_t, kVec> u = load_vec<scalar_t, kVec>(uncond + base);
    Pack<scalar_t, kVec> t{};
    Pack<float, kVec> m{};
    if (extra != nullptr) t = load_vec<scalar_t, kVec>(extra + base);
    if (momentum != nullptr) m = load_vec<float, kVec>(momentum + base);
    // The vector path needs per_sample % kVec == 0, so one vector lies in one sample.
    const float* w = weights + (base / per_sample) * kGuideOperands;
    const float wx = w[kGuideX], wc = w[kGuideCond], wu = w[kGuideUncond], wt = w[kGuideExtra],
                wm = w[kGuideMomentum];
    Pack<float, kVec> out;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float vc = static_cast<float>(c.v[e]), vu = static_cast<float>(u.v[e]);
      float acc = wx * static_cast<float>(x.v[e]) + wc * vc + wu * vu;
      if (extra != nullptr) acc += wt * static_cast<float>(t.v[e]);
      if (momentum != nullptr) {
        acc += wm * m.v[e];
        m.v[e] = q * (vc - vu) + beta * m.v[e];
      }
      out.v[e] = acc;
    }
    if (momentum != nullptr) *reinterpret_cast<Pack<float, kVec>*>(momentum + base) = m;
    return out;
  }

  bool vectorisable(int vec) const {
    const size_t bytes = sizeof(scalar_t) * vec;
    return per_sample % vec == 0 && is_aligned(cond, bytes) && is_aligned(uncond, bytes) &&
           (extra == nullptr || is_aligned(extra, bytes)) &&
           (momentum == nullptr || is_aligned(momentum, sizeof(float) * vec));
  }
};

template <typename scalar_t, typename hist_t>
void launch_guided_step(const StepProgram& program, StepOperands& ops, const GuidedOperands& guided) {
  const GuidanceRule& g = guided.rule;
  const int64_t per_sample = ops.numel / guided.batch;
  at::Tensor weights = at::empty({guided.batch, kGuideOperands}, ops.sample.options().dtype(at::kFloat));
  constexpr int kWeightThreads = 128;
  const int weight_blocks = static_cast<int>((guided.batch + kWeightThreads - 1) / kWeightThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  guidance_weights_kernel<<<weight_blocks, kWeightThreads, 0, stream>>>(
      g, guided.stats ? guided.stats->const_data_ptr<double>() : nullptr, per_sample, guided.batch,
      weights.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const GuidedModelOutput<scalar_t> out{guided.branches[0].const_data_ptr<scalar_t>(),
                                        guided.branches[1].const_data_ptr<scalar_t>(),
                                        g.extra ? guided.branches[2].const_data_ptr<scalar_t>() : nullptr,
                                        g.momentum ? guided.momentum->data_ptr<float>() : nullptr,
                                        weights.const_data_ptr<float>(),
                                        per_sample,
                                        static_cast<float>(g.q),
                                        static_cast<float>(g.beta),
                                        g.p != 0.0};
  launch_solver_step_kernel<scalar_t, hist_t>(program, ops, out);
}

at::Tensor guidance_stats_cuda(at::TensorList operands) {
  c10::cuda::OptionalCUDAGuard guard;
  if (!operands.empty()) guard.set_device(operands[0].device());
  return guidance_stats_dispatch(operands, &launch_guidance_stats_cuda);
}

at::Tensor guided_step_cuda(const at::Tensor& sample, at::TensorList branches, const std::optional<at::Tensor>& stats,
                            const std::optional<at::Tensor>& momentum, at::ArrayRef<double> rule, at::Tensor& history,
                            at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                            const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset) {
  const c10::cuda::OptionalCUDAGuard guard(sample.device());
  return guided_step_dispatch(
      sample, branches, stats, momentum, rule, history, coeffs, targets, noise, seed, offset,
      [](const StepProgram& program, StepOperands& ops, const GuidedOperands& guided) {
        SF_DISPATCH_STEP_TYPES(ops.sample.scalar_type(), ops.history.scalar_type(), "guided_step",
                               [&] { launch_guided_step<scalar_t, hist_t>(program, ops, guided); });
      },
      launch_solver_step_cuda);
}

}  // namespace
}  // namespace stepfuse

TORCH_LIBRARY_IMPL(stepfuse, CUDA, m) {
  m.impl("guidance_stats", &stepfuse::guidance_stats_cuda);
  m.impl("guided_step", &stepfuse::guided_step_cuda);
}
