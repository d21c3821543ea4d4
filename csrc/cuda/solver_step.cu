// CUDA entry of the fused solver step: the model output is a tensor
// (kernel and launcher in solver_step_kernel.cuh).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "solver_step_kernel.cuh"

namespace stepfuse {
namespace {

at::Tensor solver_step_cuda(const at::Tensor& sample, const at::Tensor& model_output, at::Tensor& history,
                            at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                            const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset) {
  const c10::cuda::OptionalCUDAGuard guard(sample.device());
  return solver_step_dispatch(sample, model_output, history, coeffs, targets, noise, seed, offset,
                              launch_solver_step_cuda);
}

}  // namespace
}  // namespace stepfuse

TORCH_LIBRARY_IMPL(stepfuse, CUDA, m) { m.impl("solver_step", &stepfuse::solver_step_cuda); }
