// Host-side glue of fused guidance (stepfuse/guidance.h): input checks and operand
// preparation shared by the CPU and CUDA entry points of guidance_stats and guided_step.
#include <cmath>

#include "solver_step.h"

namespace stepfuse {
namespace {

GuidanceRule decode_rule(at::ArrayRef<double> rule) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(rule.size()) == kRuleSize, "guided_step: rule must have ", kRuleSize,
                    " entries (see stepfuse.guidance), got ", rule.size());
  for (size_t i = 0; i < rule.size(); ++i)
    TORCH_CHECK_VALUE(std::isfinite(rule[i]), "guided_step: rule must be finite, got ", rule[i], " at ", i);
  const GuidanceRule g = make_guidance_rule(rule.data());
  TORCH_CHECK_VALUE(g.kind >= kGuideLinear && g.kind <= kGuideProjected, "guided_step: rule kind must be 0, 1 or 2, got ",
                    g.kind);
  TORCH_CHECK_VALUE(g.q != 0.0, "guided_step: rule's conversion q must be non-zero (data = p * sample + q * output)");
  TORCH_CHECK_VALUE(!g.momentum || g.kind == kGuideProjected, "guided_step: a momentum buffer needs the projected (APG) rule");
  return g;
}

// The program's rows with the model-output column k replaced by k (w_c cond + w_u uncond
// + w_x x): cond stays in the model-output column, uncond takes the noise column (the
// step must not use noise), in float64 before the op rounds coefficients to fp32.
std::vector<double> fold_uniform_guidance(const GuidanceRule& g, at::ArrayRef<double> coeffs, int64_t num_slots) {
  double w[kGuideOperands];
  guidance_weights(g, nullptr, 1, w);
  const int64_t width = num_slots + 3;
  std::vector<double> folded(coeffs.begin(), coeffs.end());
  for (size_t row = 0; row * width < folded.size(); ++row) {
    double* c = folded.data() + row * width;
    const double k = c[1];
    c[0] += k * w[kGuideX];
    c[1] = k * w[kGuideCond];
    c[width - 1] = k * w[kGuideUncond];
  }
  return folded;
}

}  // namespace

at::Tensor guidance_stats_dispatch(at::TensorList operands, const StatsLauncher& launch) {
  const int64_t n = static_cast<int64_t>(operands.size());
  TORCH_CHECK_VALUE(n >= 1 && n <= kGuideOperands, "guidance_stats: operands must hold 1 to ", kGuideOperands,
                    " tensors, got ", n);
  const at::Tensor& first = operands[0];
  TORCH_CHECK_VALUE(first.dim() >= 1 && first.size(0) >= 1, "guidance_stats: operands must have a batch dimension, got shape ",
                    first.sizes());
  TORCH_CHECK_TYPE(first.scalar_type() == at::kFloat || first.scalar_type() == at::kHalf ||
                       first.scalar_type() == at::kBFloat16,
                   "guidance_stats: operands must be float32, float16 or bfloat16, got ", first.scalar_type());
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(n);
  for (int64_t k = 0; k < n; ++k) {
    const at::Tensor& t = operands[k];
    TORCH_CHECK_VALUE(t.device() == first.device() && t.sizes() == first.sizes(), "guidance_stats: operands[", k,
                      "] must have shape ", first.sizes(), " on ", first.device(), " like operands[0], got ",
                      t.sizes(), " on ", t.device());
    // The APG momentum buffer is float32 whatever the branches' dtype.
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type() || t.scalar_type() == at::kFloat,
                     "guidance_stats: operands[", k, "] must have dtype ", first.scalar_type(), " or float32, got ",
                     t.scalar_type());
    contiguous.push_back(t.contiguous());
  }
  at::Tensor stats = at::zeros({first.size(0), guidance_stats_width(static_cast<int>(n))},
                               first.options().dtype(at::kDouble));
  if (first.numel() > 0) launch(contiguous, stats);
  return stats;
}

at::Tensor guided_step_dispatch(const at::Tensor& sample, at::TensorList branches,
                                const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& momentum,
                                at::ArrayRef<double> rule, at::Tensor& history, at::ArrayRef<double> coeffs,
                                at::IntArrayRef targets, const std::optional<at::Tensor>& noise, int64_t seed,
                                int64_t offset, const GuidedLauncher& launch, const StepLauncher& plain) {
  GuidedOperands guided;
  guided.rule = decode_rule(rule);
  const GuidanceRule& g = guided.rule;
  const size_t want = g.extra ? 3 : 2;
  TORCH_CHECK_VALUE(branches.size() == want, "guided_step: branches must be [cond, uncond", g.extra ? ", extra" : "",
                    "] (", want, " tensors) for this rule, got ", branches.size());
  TORCH_CHECK_VALUE(sample.dim() >= 1 && sample.size(0) >= 1, "guided_step: sample must have a batch dimension, got ",
                    sample.sizes());
  static const char* const kNames[] = {"branches[0] (cond)", "branches[1] (uncond)", "branches[2] (extra)"};
  for (size_t k = 0; k < branches.size(); ++k) check_like_sample("guided_step", branches[k], sample, kNames[k]);
  check_history("guided_step", history, sample);
  if (noise.has_value()) check_like_sample("guided_step", *noise, sample, "noise");
  guided.batch = sample.size(0);
  if (guidance_needs_stats(g)) {
    TORCH_CHECK_VALUE(stats.has_value(), "guided_step: this rule needs stats (from guidance_stats)");
    const int64_t width = guidance_stats_width(g.num_stats_operands);
    TORCH_CHECK_VALUE(stats->device() == sample.device() && stats->scalar_type() == at::kDouble &&
                          stats->dim() == 2 && stats->size(0) == guided.batch && stats->size(1) == width,
                      "guided_step: stats must be float64 [", guided.batch, ", ", width, "] on ", sample.device(),
                      ", got ", stats->scalar_type(), " ", stats->sizes(), " on ", stats->device());
    guided.stats = stats->contiguous();
  }
  if (g.momentum) {
    TORCH_CHECK_VALUE(momentum.has_value(), "guided_step: this rule needs the momentum buffer");
    TORCH_CHECK_VALUE(momentum->device() == sample.device() && momentum->sizes() == sample.sizes(),
                      "guided_step: momentum must have shape ", sample.sizes(), " on ", sample.device(), ", got ",
                      momentum->sizes(), " on ", momentum->device());
    TORCH_CHECK_TYPE(momentum->scalar_type() == at::kFloat, "guided_step: momentum must be float32, got ",
                     momentum->scalar_type());
    TORCH_CHECK_VALUE(momentum->is_contiguous(), "guided_step: momentum must be contiguous (it is written in place)");
    guided.momentum = *momentum;
  }
  for (const at::Tensor& b : branches) guided.branches.push_back(b.contiguous());
  const StepProgram program = decode_program(coeffs, targets, history.size(0), seed, offset);
  if (!guidance_needs_stats(g) && !g.extra && !program.uses_noise) {
    // Weights the same for every sample (CFG and its linear kin) and a deterministic step:
    // fold them into the program, with uncond in the unused noise column, and run the
    // plain step kernel, one pass with no combination buffer.
    const std::vector<double> folded = fold_uniform_guidance(g, coeffs, history.size(0));
    const StepProgram plain_program = decode_program(folded, targets, history.size(0), seed, offset);
    StepOperands ops = prepare_operands(sample, history, std::nullopt, plain_program);
    ops.model_output = guided.branches[0];
    ops.noise = guided.branches[1];
    if (ops.numel > 0) plain(plain_program, ops);
    finish_history(ops, history, plain_program);
    return ops.next_sample;
  }
  StepOperands ops = prepare_operands(sample, history, noise, program);
  if (ops.numel > 0) launch(program, ops, guided);
  finish_history(ops, history, program);
  return ops.next_sample;
}

}  // namespace stepfuse
