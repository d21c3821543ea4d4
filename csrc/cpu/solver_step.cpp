// CPU entry of the fused solver step: picks the kernel build for this processor.
#include "../solver_step.h"

namespace stepfuse {
// Entry points of each kernel build (csrc/cpu/solver_step_kernel.h).
#define SF_CPU_KERNELS                                                                                  \
  void launch_solver_step_cpu(const StepProgram& program, StepOperands& ops);                           \
  void launch_guided_step_cpu(const StepProgram& program, StepOperands& ops, const GuidedOperands& guided, \
                              const float* weights);                                                    \
  void launch_guidance_stats_cpu(const std::vector<at::Tensor>& operands, at::Tensor& stats);
namespace baseline {
SF_CPU_KERNELS
}
#ifdef STEPFUSE_CPU_AVX2
namespace avx2 {
SF_CPU_KERNELS
}
#endif
#undef SF_CPU_KERNELS

namespace {

bool use_avx2() {
#ifdef STEPFUSE_CPU_AVX2
  // AVX2 + FMA + F16C: 8-wide arithmetic and conversions (every x86-64 CPU since ~2013).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

#ifdef STEPFUSE_CPU_AVX2
#define SF_PICK(NAME) (use_avx2() ? &avx2::NAME : &baseline::NAME)
#else
#define SF_PICK(NAME) (&baseline::NAME)
#endif

// Per-sample weights of the guided combination, computed on the host from the statistics.
std::vector<float> guided_weights(const GuidedOperands& guided, int64_t numel) {
  std::vector<float> weights(static_cast<size_t>(guided.batch * kGuideOperands));
  const double* stats = guided.stats ? guided.stats->const_data_ptr<double>() : nullptr;
  const int64_t width = guidance_stats_width(guided.rule.num_stats_operands);
  for (int64_t b = 0; b < guided.batch; ++b) {
    float(&w)[kGuideOperands] = *reinterpret_cast<float(*)[kGuideOperands]>(weights.data() + b * kGuideOperands);
    guidance_weights(guided.rule, stats != nullptr ? stats + b * width : nullptr, numel / guided.batch, w);
  }
  return weights;
}

}  // namespace

at::Tensor solver_step_cpu(const at::Tensor& sample, const at::Tensor& model_output, at::Tensor& history,
                           at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                           const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset) {
  static const StepLauncher launch = SF_PICK(launch_solver_step_cpu);
  return solver_step_dispatch(sample, model_output, history, coeffs, targets, noise, seed, offset, launch);
}

at::Tensor guidance_stats_cpu(at::TensorList operands) {
  static const StatsLauncher launch = SF_PICK(launch_guidance_stats_cpu);
  return guidance_stats_dispatch(operands, launch);
}

at::Tensor guided_step_cpu(const at::Tensor& sample, at::TensorList branches, const std::optional<at::Tensor>& stats,
                           const std::optional<at::Tensor>& momentum, at::ArrayRef<double> rule, at::Tensor& history,
                           at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                           const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset) {
  static const auto kernel = SF_PICK(launch_guided_step_cpu);
  static const StepLauncher plain = SF_PICK(launch_solver_step_cpu);
  return guided_step_dispatch(
      sample, branches, stats, momentum, rule, history, coeffs, targets, noise, seed, offset,
      [](const StepProgram& program, StepOperands& ops, const GuidedOperands& guided) {
        const std::vector<float> weights = guided_weights(guided, ops.numel);
        kernel(program, ops, guided, weights.data());
      },
      plain);
}

#undef SF_PICK

}  // namespace stepfuse
