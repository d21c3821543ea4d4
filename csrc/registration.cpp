// Schemas of every stepfuse op and their CPU implementations; CUDA
// implementations register themselves from csrc/cuda/.
#include <torch/library.h>

#include "solver_step.h"

TORCH_LIBRARY(stepfuse, m) {
  // One fused solver step (DESIGN.md): rows of a linear program over
  // (sample, model_output, history slots, noise); history is updated in place.
  m.def(
      "solver_step(Tensor sample, Tensor model_output, Tensor(a!) history, float[] coeffs, int[] targets, "
      "Tensor? noise=None, int seed=0, int offset=0) -> Tensor");
  // Per-sample sums and Gram matrix of up to five operands in one pass: every
  // statistic the guidance variants need (stepfuse/guidance.h).
  m.def("guidance_stats(Tensor[] operands) -> Tensor");
  // A solver step whose model output is the guided combination of the branches
  // (weights from `rule` and `stats`); the APG momentum buffer is updated in place.
  m.def(
      "guided_step(Tensor sample, Tensor[] branches, Tensor? stats, Tensor(a!)? momentum, float[] rule, "
      "Tensor(b!) history, float[] coeffs, int[] targets, Tensor? noise=None, int seed=0, int offset=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(stepfuse, CPU, m) {
  m.impl("solver_step", &stepfuse::solver_step_cpu);
  m.impl("guidance_stats", &stepfuse::guidance_stats_cpu);
  m.impl("guided_step", &stepfuse::guided_step_cpu);
}
