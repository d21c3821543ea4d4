// Schemas of every stepfuse op and their CPU implementations; CUDA
// implementations register themselves from csrc/cuda/.
#include <torch/library.h>

#include "attention.h"
#include "cache.h"
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
  // Feature caching (csrc/cache.h): per-sample (sum |a - b|, sum |b|) in one pass, the
  // skip decision as a device-side state machine, residual store / apply, and
  // TaylorSeer's finite-difference update and forecast.
  m.def("cache_distance(Tensor a, Tensor b, int stride=1) -> Tensor");
  m.def(
      "cache_decide(Tensor sums, Tensor(a!) state, float[] poly, float threshold, bool accumulate, bool pooled, "
      "int max_consecutive, int max_cached, bool force) -> Tensor");
  m.def("cache_residual_store(Tensor output, Tensor input, Tensor(a!) residual) -> ()");
  m.def("cache_residual_apply(Tensor(a!) x, Tensor residual) -> ()");
  m.def("cache_taylor_update(Tensor feature, Tensor(a!) factors, float dt, int valid) -> ()");
  m.def("cache_taylor_predict(Tensor factors, float dt, int terms, Tensor(a!) out, bool accumulate) -> ()");
  // Sparse block attention (csrc/attention.h): attention over the key/value blocks listed per
  // query block (FlexAttention's block mask), and the pooled block-pair scores mask builders rank.
  m.def(
      "block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, int block_size, "
      "float scale, bool bshd) -> Tensor");
  m.def("attention_block_scores(Tensor q, Tensor k, int block_size, float scale, bool bshd) -> Tensor");
  // Shape-only video masks built on the host from the geometry alone (no tensor inputs).
  m.def(
      "frame_band_block_mask(int frames, int frame_tokens, int[] band, int block_size, int prompt_tokens, "
      "bool prompt_last, int sinks) -> (Tensor, Tensor)");
  m.def(
      "sliding_tile_block_mask(int[] grid, int[] tile, int[] window, int block_size, int prompt_tokens, "
      "bool prompt_last, int sinks) -> (Tensor, Tensor)");
}

// Ops without tensor inputs have no backend to dispatch on.
TORCH_LIBRARY_IMPL(stepfuse, CompositeExplicitAutograd, m) {
  m.impl("frame_band_block_mask", &stepfuse::frame_band_block_mask);
  m.impl("sliding_tile_block_mask", &stepfuse::sliding_tile_block_mask);
}

TORCH_LIBRARY_IMPL(stepfuse, CPU, m) {
  m.impl("solver_step", &stepfuse::solver_step_cpu);
  m.impl("guidance_stats", &stepfuse::guidance_stats_cpu);
  m.impl("guided_step", &stepfuse::guided_step_cpu);
  m.impl("cache_distance", &stepfuse::cache_distance_cpu);
  m.impl("cache_decide", &stepfuse::cache_decide_cpu);
  m.impl("cache_residual_store", &stepfuse::cache_residual_store_cpu);
  m.impl("cache_residual_apply", &stepfuse::cache_residual_apply_cpu);
  m.impl("cache_taylor_update", &stepfuse::cache_taylor_update_cpu);
  m.impl("cache_taylor_predict", &stepfuse::cache_taylor_predict_cpu);
  m.impl("block_sparse_attention", &stepfuse::block_sparse_attention_cpu);
  m.impl("attention_block_scores", &stepfuse::attention_block_scores_cpu);
}
