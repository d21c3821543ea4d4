// Host-side glue of the fused solver step: input checks, program decoding and
// operand preparation shared by the CPU and CUDA entry points.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <optional>
#include <vector>

#include "stepfuse/guidance.h"
#include "stepfuse/solver_step.h"

namespace stepfuse {

// Operands as the kernels see them: contiguous, same numel, history as one
// contiguous [R, numel] block (a scratch copy when the caller's is not).
struct StepOperands {
  at::Tensor sample;
  at::Tensor model_output;
  at::Tensor history;  // what the kernel writes; copied back when it is scratch
  std::optional<at::Tensor> noise;
  at::Tensor next_sample;
  int64_t numel = 0;
};

// Kernel launcher of one device type: reads and writes `ops` under `program`.
using StepLauncher = std::function<void(const StepProgram& program, StepOperands& ops)>;

// Extra operands of the guided step: the model output column is the per-sample
// combination sum_k w_k operand_k of (x, cond, uncond, extra, momentum)
// (stepfuse/guidance.h), and the APG momentum buffer is updated in place as
// m <- q (cond - uncond) + beta m.
struct GuidedOperands {
  GuidanceRule rule;
  std::vector<at::Tensor> branches;     // cond, uncond[, extra], contiguous, sample dtype
  std::optional<at::Tensor> stats;      // [B, guidance_stats_width] float64, when the rule needs it
  std::optional<at::Tensor> momentum;   // float32 like sample, written in place (contiguous)
  int64_t batch = 1;                    // samples (dim 0), each numel / batch elements
};

using GuidedLauncher =
    std::function<void(const StepProgram& program, StepOperands& ops, const GuidedOperands& guided)>;
using StatsLauncher = std::function<void(const std::vector<at::Tensor>& operands, at::Tensor& stats)>;

void check_like_sample(const char* op, const at::Tensor& t, const at::Tensor& sample, const char* name);
void check_history(const char* op, const at::Tensor& history, const at::Tensor& sample);
StepOperands prepare_operands(const at::Tensor& sample, at::Tensor& history, const std::optional<at::Tensor>& noise,
                              const StepProgram& program);
void finish_history(const StepOperands& ops, at::Tensor& history, const StepProgram& program);

StepProgram decode_program(at::ArrayRef<double> coeffs, at::IntArrayRef targets, int64_t num_slots, int64_t seed,
                           int64_t offset);

at::Tensor solver_step_dispatch(const at::Tensor& sample, const at::Tensor& model_output, at::Tensor& history,
                                at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                                const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                                const StepLauncher& launch);

at::Tensor guidance_stats_dispatch(at::TensorList operands, const StatsLauncher& launch);

at::Tensor guided_step_dispatch(const at::Tensor& sample, at::TensorList branches,
                                const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& momentum,
                                at::ArrayRef<double> rule, at::Tensor& history, at::ArrayRef<double> coeffs,
                                at::IntArrayRef targets, const std::optional<at::Tensor>& noise, int64_t seed,
                                int64_t offset, const GuidedLauncher& launch, const StepLauncher& plain);

at::Tensor guidance_stats_cpu(at::TensorList operands);

at::Tensor guided_step_cpu(const at::Tensor& sample, at::TensorList branches, const std::optional<at::Tensor>& stats,
                           const std::optional<at::Tensor>& momentum, at::ArrayRef<double> rule, at::Tensor& history,
                           at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                           const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset);

at::Tensor solver_step_cpu(const at::Tensor& sample, const at::Tensor& model_output, at::Tensor& history,
                           at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                           const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset);

}  // namespace stepfuse

// Dispatch over (sample dtype, history dtype): the history is stored either in the
// sample's dtype or in float32.
#define SF_DISPATCH_STEP_TYPES(SAMPLE_DTYPE, HISTORY_DTYPE, NAME, ...)                                   \
  [&] {                                                                                                 \
    const bool sf_hist_fp32 = (HISTORY_DTYPE) == at::kFloat;                                            \
    switch (SAMPLE_DTYPE) {                                                                             \
      case at::kFloat: {                                                                                \
        using scalar_t = float;                                                                         \
        using hist_t = float;                                                                           \
        return __VA_ARGS__();                                                                           \
      }                                                                                                 \
      case at::kHalf:                                                                                   \
        if (sf_hist_fp32) {                                                                             \
          using scalar_t = at::Half;                                                                    \
          using hist_t = float;                                                                         \
          return __VA_ARGS__();                                                                         \
        } else {                                                                                        \
          using scalar_t = at::Half;                                                                    \
          using hist_t = at::Half;                                                                      \
          return __VA_ARGS__();                                                                         \
        }                                                                                               \
      case at::kBFloat16:                                                                               \
        if (sf_hist_fp32) {                                                                             \
          using scalar_t = at::BFloat16;                                                                \
          using hist_t = float;                                                                         \
          return __VA_ARGS__();                                                                         \
        } else {                                                                                        \
          using scalar_t = at::BFloat16;                                                                \
          using hist_t = at::BFloat16;                                                                  \
          return __VA_ARGS__();                                                                         \
        }                                                                                               \
      default:                                                                                          \
        TORCH_CHECK_TYPE(false, NAME, ": sample dtype must be float32, float16 or bfloat16, got ", SAMPLE_DTYPE); \
    }                                                                                                   \
  }()
