#include "solver_step.h"

#include <cmath>

namespace stepfuse {

StepProgram decode_program(at::ArrayRef<double> coeffs, at::IntArrayRef targets, int64_t num_slots, int64_t seed,
                           int64_t offset) {
  TORCH_CHECK_VALUE(num_slots >= 0 && num_slots <= kMaxSlots, "solver_step: history must have at most ", kMaxSlots,
                    " slots (dim 0), got ", num_slots);
  const int64_t rows = static_cast<int64_t>(targets.size());
  const int64_t width = num_slots + 3;
  TORCH_CHECK_VALUE(rows >= 1 && rows <= kMaxRows, "solver_step: targets must have 1 to ", kMaxRows,
                    " rows, got ", rows);
  TORCH_CHECK_VALUE(static_cast<int64_t>(coeffs.size()) == rows * width, "solver_step: coeffs must have ",
                    rows * width, " entries (", rows, " rows x (3 + ", num_slots, " slots)), got ", coeffs.size());
  TORCH_CHECK_VALUE(offset >= 0, "solver_step: offset must be non-negative, got ", offset);

  StepProgram p{};
  p.num_slots = static_cast<int>(num_slots);
  p.num_rows = static_cast<int>(rows);
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  uint32_t written = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t target = targets[r];
    const bool last = r == rows - 1;
    TORCH_CHECK_VALUE(last ? target == -1 : (target >= 0 && target < num_slots), "solver_step: targets[", r,
                      "] must be ", last ? "-1 (the next sample) in the last row" : "a history slot index", ", got ",
                      target);
    p.targets[r] = static_cast<int>(target);
    for (int64_t c = 0; c < width; ++c) {
      const double value = coeffs[r * width + c];
      TORCH_CHECK_VALUE(std::isfinite(value), "solver_step: coeffs must be finite, got ", value, " at row ", r,
                        " column ", c);
      const int column = c < 2 ? static_cast<int>(c) : (c == width - 1 ? kNoiseColumn : slot_column(c - 2));
      p.coeffs[r * kMaxWidth + column] = static_cast<float>(value);
      if (value == 0.0) continue;
      if (column == kSampleColumn) p.reads_sample = true;
      if (column == kModelOutputColumn) p.reads_model_output = true;
      if (column == kNoiseColumn) p.uses_noise = true;
      if (c >= 2 && c < width - 1 && !(written & (1u << (c - 2)))) p.load_mask |= 1u << (c - 2);
    }
    if (target >= 0) written |= 1u << target;
  }
  p.store_mask = written;
  for (int64_t r = 0; r + 1 < rows; ++r)
    for (int64_t later = r + 1; later < rows; ++later)
      if (p.coeffs[later * kMaxWidth + slot_column(p.targets[r])] != 0.f) p.reread_rows |= 1u << r;
  return p;
}

void check_like_sample(const char* op, const at::Tensor& t, const at::Tensor& sample, const char* name) {
  TORCH_CHECK_VALUE(t.device() == sample.device(), op, ": ", name, " must be on ", sample.device(),
                    " like sample, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == sample.scalar_type(), op, ": ", name, " must have dtype ",
                   sample.scalar_type(), " like sample, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == sample.sizes(), op, ": ", name, " must have shape ", sample.sizes(),
                    " like sample, got ", t.sizes());
}

void check_history(const char* op, const at::Tensor& history, const at::Tensor& sample) {
  TORCH_CHECK_VALUE(history.dim() == sample.dim() + 1 && history.sizes().slice(1) == sample.sizes(), op,
                    ": history must have shape [num_slots, *sample.shape] = [R, ", sample.sizes(), "], got ",
                    history.sizes());
  TORCH_CHECK_VALUE(history.device() == sample.device(), op, ": history must be on ", sample.device(),
                    " like sample, got ", history.device());
  TORCH_CHECK_TYPE(history.scalar_type() == sample.scalar_type() || history.scalar_type() == at::kFloat, op,
                   ": history dtype must be ", sample.scalar_type(), " (like sample) or float32, got ",
                   history.scalar_type());
}

StepOperands prepare_operands(const at::Tensor& sample, at::Tensor& history, const std::optional<at::Tensor>& noise,
                              const StepProgram& program) {
  StepOperands ops;
  ops.numel = sample.numel();
  ops.sample = sample.contiguous();
  ops.history = history.is_contiguous() ? history : history.contiguous();
  if (noise.has_value() && program.uses_noise) ops.noise = noise->contiguous();
  ops.next_sample = at::empty(sample.sizes(), sample.options().memory_format(at::MemoryFormat::Contiguous));
  return ops;
}

void finish_history(const StepOperands& ops, at::Tensor& history, const StepProgram& program) {
  if (!ops.history.is_same(history) && program.store_mask != 0) history.copy_(ops.history);
}

at::Tensor solver_step_dispatch(const at::Tensor& sample, const at::Tensor& model_output, at::Tensor& history,
                                at::ArrayRef<double> coeffs, at::IntArrayRef targets,
                                const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                                const StepLauncher& launch) {
  check_like_sample("solver_step", model_output, sample, "model_output");
  check_history("solver_step", history, sample);
  if (noise.has_value()) check_like_sample("solver_step", *noise, sample, "noise");
  const StepProgram program = decode_program(coeffs, targets, history.size(0), seed, offset);

  StepOperands ops = prepare_operands(sample, history, noise, program);
  ops.model_output = model_output.contiguous();
  if (ops.numel > 0) launch(program, ops);
  finish_history(ops, history, program);
  return ops.next_sample;
}

}  // namespace stepfuse
