// CPU entry of the fused solver step: picks the kernel build for this processor.
#include "../solver_step.h"

namespace stepfuse {
namespace baseline {
void launch_solver_step_cpu(const StepProgram& program, StepOperands& ops);
}
#ifdef STEPFUSE_CPU_AVX2
namespace avx2 {
void launch_solver_step_cpu(const StepProgram& program, StepOperands& ops);
}
#endif

namespace {

StepLauncher pick_cpu_kernel() {
#ifdef STEPFUSE_CPU_AVX2
  // AVX2 + FMA + F16C: 8-wide arithmetic and conversions (every x86-64 CPU since ~2013).
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return &avx2::launch_solver_step_cpu;
#endif
  return &baseline::launch_solver_step_cpu;
}

}  // namespace

at::Tensor solver_step_cpu(const at::Tensor& sample, const at::Tensor& model_output, at::Tensor& history,
                           at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                           const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset) {
  static const StepLauncher launch = pick_cpu_kernel();
  return solver_step_dispatch(sample, model_output, history, coeffs, targets, noise, seed, offset, launch);
}

}  // namespace stepfuse
