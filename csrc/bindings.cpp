// The Python module stepfuse._C: build information and the eager fast path of the
// fused step.  Importing it also runs the TORCH_LIBRARY registrations compiled into
// the same shared object.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>
#include <torch/csrc/Exceptions.h>
#include <torch/python.h>

#include <vector>

#include "plans/step_schedule_dp.h"

namespace py = pybind11;

namespace {

// A step program converted once to C++ vectors.  Calling the op through a typed
// dispatcher handle with these skips the per-call parsing of Python float/int lists
// (about half the host cost of a step); it is still a dispatcher call, so autograd
// checks, dispatch modes and device dispatch behave as for torch.ops.stepfuse.
struct ProgramHandle {
  std::vector<double> coeffs;
  std::vector<int64_t> targets;
};

at::Tensor solver_step_fast(const at::Tensor& sample, const at::Tensor& model_output, at::Tensor& history,
                            const ProgramHandle& program, const std::optional<at::Tensor>& noise, int64_t seed,
                            int64_t offset) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stepfuse::solver_step", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::ArrayRef<double>,
                            at::IntArrayRef, const std::optional<at::Tensor>&, int64_t, int64_t)>();
  return op.call(sample, model_output, history, program.coeffs, program.targets, noise, seed, offset);
}

// c10 errors become the Python exceptions torch.ops would raise (ValueError, TypeError, ...).
at::Tensor solver_step_py(const at::Tensor& sample, const at::Tensor& model_output, at::Tensor& history,
                          const ProgramHandle& program, const std::optional<at::Tensor>& noise, int64_t seed,
                          int64_t offset) {
  HANDLE_TH_ERRORS
  return solver_step_fast(sample, model_output, history, program, noise, seed, offset);
  END_HANDLE_TH_ERRORS_PYBIND
}

// A guidance rule (stepfuse.guidance.Guidance.rule) converted once, like ProgramHandle.
struct RuleHandle {
  std::vector<double> rule;
};

// Eager fast path of guided_step, through the same typed dispatcher handle scheme.
at::Tensor guided_step_py(const at::Tensor& sample, const std::vector<at::Tensor>& branches,
                          const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& momentum,
                          const RuleHandle& rule, at::Tensor& history, const ProgramHandle& program,
                          const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset) {
  HANDLE_TH_ERRORS
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("stepfuse::guided_step", "")
          .typed<at::Tensor(const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, at::ArrayRef<double>, at::Tensor&, at::ArrayRef<double>,
                            at::IntArrayRef, const std::optional<at::Tensor>&, int64_t, int64_t)>();
  return op.call(sample, branches, stats, momentum, rule.rule, history, program.coeffs, program.targets, noise, seed,
                 offset);
  END_HANDLE_TH_ERRORS_PYBIND
}

std::vector<int64_t> optimal_step_indices_py(
    const py::array_t<double, py::array::c_style | py::array::forcecast>& cost, int64_t num_steps) {
  if (cost.ndim() != 2 || cost.shape(0) != cost.shape(1)) {
    throw py::value_error("cost must be a square (n_points x n_points) matrix");
  }
  const double* data = cost.data();
  const int64_t n_points = cost.shape(0);
  py::gil_scoped_release release;  // O(K N^2) on plain memory; other Python threads may run
  return stepfuse::optimal_step_indices(data, n_points, num_steps);
}

}  // namespace

#ifndef STEPFUSE_VERSION
#define STEPFUSE_VERSION "0.0.0"
#endif
#ifndef STEPFUSE_TORCH_VERSION
#define STEPFUSE_TORCH_VERSION "unknown"
#endif
#ifndef STEPFUSE_CUDA_ARCHITECTURES
#define STEPFUSE_CUDA_ARCHITECTURES ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "stepfuse compiled kernels";
  py::dict info;
  info["version"] = STEPFUSE_VERSION;
  info["torch_version"] = STEPFUSE_TORCH_VERSION;
#ifdef STEPFUSE_WITH_CUDA
  info["cuda_kernels"] = true;
  info["cuda_version"] = STEPFUSE_CUDA_VERSION;
  info["cuda_architectures"] = STEPFUSE_CUDA_ARCHITECTURES;
#else
  info["cuda_kernels"] = false;
  info["cuda_version"] = py::none();
  info["cuda_architectures"] = "";
#endif
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#endif
  m.attr("build_info") = info;

  py::class_<ProgramHandle>(m, "ProgramHandle")
      .def(py::init<std::vector<double>, std::vector<int64_t>>(), py::arg("coeffs"), py::arg("targets"));
  m.def("solver_step", &solver_step_py, py::arg("sample"), py::arg("model_output"), py::arg("history"),
        py::arg("program"), py::arg("noise") = py::none(), py::arg("seed") = 0, py::arg("offset") = 0,
        "Eager fast path of torch.ops.stepfuse.solver_step for a pre-converted program.");
  py::class_<RuleHandle>(m, "RuleHandle").def(py::init<std::vector<double>>(), py::arg("rule"));
  m.def("guided_step", &guided_step_py, py::arg("sample"), py::arg("branches"), py::arg("stats"),
        py::arg("momentum"), py::arg("rule"), py::arg("history"), py::arg("program"),
        py::arg("noise") = py::none(), py::arg("seed") = 0, py::arg("offset") = 0,
        "Eager fast path of torch.ops.stepfuse.guided_step for a pre-converted rule and program.");
  m.def("optimal_step_indices", &optimal_step_indices_py, py::arg("cost"), py::arg("num_steps"),
        "Grid indices 0 = i_0 < ... < i_K = N minimising sum_k cost[i_{k-1}][i_k] (dynamic programming).");
}
