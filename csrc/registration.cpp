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
}

TORCH_LIBRARY_IMPL(stepfuse, CPU, m) { m.impl("solver_step", &stepfuse::solver_step_cpu); }
