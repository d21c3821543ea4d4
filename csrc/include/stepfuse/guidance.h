// Header-only math of fused guidance, shared by the CPU and CUDA kernels.
//
// Every guidance variant stepfuse fuses (python/stepfuse/guidance.py) turns the
// branch outputs into a guided output that is, per sample, a linear combination of
// a few per-element operands:
//
//   operands  x (the sample), c (cond), u (uncond), t (the extra condition of
//             two-condition guidance), m (the APG momentum buffer before this step)
//   space     guidance acts on v_k = p x + q b_k: the raw output (p = 0, q = 1) or
//             the data prediction (the solver's own conversion at this step)
//   result    g = sum_k lambda_k * operand_k, lambdas per sample
//
// The lambdas of the nonlinear variants (guidance_rescale, APG, CFG-Zero*) depend on
// a few inner products, which follow from the per-sample sums S_i and Gram matrix
// G_ij of the operands: one reduction pass (guidance_stats).  The guided step then
// feeds the solver program the raw output whose data prediction is g,
//   out = (g - p x) / q,
// so the whole guided step is one more pass.  Weights are computed in double.
#pragma once

#include <cmath>
#include <cstdint>

#include "stepfuse/philox.h"

namespace stepfuse {

// Operand order of the guided combination.
constexpr int kGuideX = 0;
constexpr int kGuideCond = 1;
constexpr int kGuideUncond = 2;
constexpr int kGuideExtra = 3;
constexpr int kGuideMomentum = 4;
constexpr int kGuideOperands = 5;

// Layout of the `rule` float list the ops take (python/stepfuse/guidance.py writes it).
enum GuideParam : int {
  kRuleKind = 0,       // GuidanceKind
  kRuleExtra,          // 1: a third branch t (two-condition guidance)
  kRuleStatsX,         // 1: x is an operand of the statistics (data-prediction guidance)
  kRuleMomentum,       // 1: APG momentum buffer m
  kRuleP,              // conversion v = p x + q b
  kRuleQ,
  kRuleA0,             // linear: weight of c     | zero-star, projected: guidance scale w
  kRuleA1,             // linear: weight of u     | zero-star, projected: 1 = original formulation
  kRuleA2,             // linear: weight of t     | projected: eta (parallel component kept)
  kRuleThreshold,      // projected: norm threshold r (0: none)
  kRuleMomentumCoeff,  // projected: momentum beta of m_new = (v_c - v_u) + beta m
  kRuleRescale,        // guidance_rescale phi (0: none)
  kRuleSize
};

enum GuidanceKind : int { kGuideLinear = 0, kGuideZeroStar = 1, kGuideProjected = 2 };

struct GuidanceRule {
  int kind;
  bool extra;
  bool stats_x;
  bool momentum;
  double p, q, a0, a1, a2, threshold, beta, rescale;
  // Statistics slot of each operand (-1: not an operand of the statistics) and their count.
  int slot[kGuideOperands];
  int num_stats_operands;
};

SF_HOST_DEVICE inline GuidanceRule make_guidance_rule(const double* r) {
  GuidanceRule g{};
  g.kind = static_cast<int>(r[kRuleKind]);
  g.extra = r[kRuleExtra] != 0.0;
  g.stats_x = r[kRuleStatsX] != 0.0;
  g.momentum = r[kRuleMomentum] != 0.0;
  g.p = r[kRuleP];
  g.q = r[kRuleQ];
  g.a0 = r[kRuleA0];
  g.a1 = r[kRuleA1];
  g.a2 = r[kRuleA2];
  g.threshold = r[kRuleThreshold];
  g.beta = r[kRuleMomentumCoeff];
  g.rescale = r[kRuleRescale];
  const bool present[kGuideOperands] = {g.stats_x, true, true, g.extra, g.momentum};
  int n = 0;
  for (int k = 0; k < kGuideOperands; ++k) g.slot[k] = present[k] ? n++ : -1;
  g.num_stats_operands = n;
  return g;
}

// Number of doubles per sample guidance_stats writes for n operands: n sums, then the
// upper triangle of the Gram matrix, row by row.
SF_HOST_DEVICE constexpr int guidance_stats_width(int n) { return n + n * (n + 1) / 2; }

SF_HOST_DEVICE constexpr int gram_index(int n, int i, int j) {
  return n + i * n - i * (i - 1) / 2 + (j - i);  // i <= j
}

// Whether the lambdas depend on the data (and so need guidance_stats).
SF_HOST_DEVICE inline bool guidance_needs_stats(const GuidanceRule& g) {
  return g.kind != kGuideLinear || g.rescale != 0.0;
}

// Inner products of operand-coefficient vectors, from one sample's statistics.
struct GuideMoments {
  const double* s;
  const GuidanceRule* g;
  double numel;

  SF_HOST_DEVICE double dot(const double (&a)[kGuideOperands], const double (&b)[kGuideOperands]) const {
    const int n = g->num_stats_operands;
    double acc = 0.0;
    for (int i = 0; i < kGuideOperands; ++i) {
      const int si = g->slot[i];
      if (si < 0 || a[i] == 0.0) continue;
      for (int j = 0; j < kGuideOperands; ++j) {
        const int sj = g->slot[j];
        if (sj < 0 || b[j] == 0.0) continue;
        acc += a[i] * b[j] * s[si <= sj ? gram_index(n, si, sj) : gram_index(n, sj, si)];
      }
    }
    return acc;
  }

  SF_HOST_DEVICE double sum(const double (&a)[kGuideOperands]) const {
    double acc = 0.0;
    for (int i = 0; i < kGuideOperands; ++i)
      if (g->slot[i] >= 0) acc += a[i] * s[g->slot[i]];
    return acc;
  }

  // Unbiased standard deviation over the sample, as torch.std.
  SF_HOST_DEVICE double std(const double (&a)[kGuideOperands]) const {
    const double mean_sum = sum(a);
    const double var = (dot(a, a) - mean_sum * mean_sum / numel) / (numel - 1.0);
    return var > 0.0 ? sqrt(var) : 0.0;
  }
};

SF_HOST_DEVICE inline void axpy(double a, const double (&x)[kGuideOperands], double (&y)[kGuideOperands]) {
  for (int k = 0; k < kGuideOperands; ++k) y[k] += a * x[k];
}

// Per-sample weights w over (x, c, u, t, m) with out = sum_k w_k operand_k, the raw
// model output handed to the solver program.  `stats` is this sample's statistics
// (unused when the rule needs none); `numel` the elements per sample.
template <typename W>
SF_HOST_DEVICE inline void guidance_weights(const GuidanceRule& g, const double* stats, int64_t numel,
                                            W (&w)[kGuideOperands]) {
  double vc[kGuideOperands] = {}, vu[kGuideOperands] = {}, vt[kGuideOperands] = {};
  vc[kGuideX] = vu[kGuideX] = vt[kGuideX] = g.p;
  vc[kGuideCond] = vu[kGuideUncond] = vt[kGuideExtra] = g.q;
  const GuideMoments mom{stats, &g, static_cast<double>(numel)};
  double out[kGuideOperands] = {};
  if (g.kind == kGuideLinear) {
    axpy(g.a0, vc, out);
    axpy(g.a1, vu, out);
    if (g.extra) axpy(g.a2, vt, out);
  } else if (g.kind == kGuideZeroStar) {
    // CFG-Zero* (Fan et al. 2025, eq. 7): s* = <v_c, v_u> / ||v_u||^2 scales the
    // unconditional branch, then g = s* v_u + w (v_c - s* v_u)  (original: v_c + w (...)).
    const double w_scale = g.a0;
    const double s_star = mom.dot(vc, vu) / (mom.dot(vu, vu) + 1e-8);
    axpy(g.a1 != 0.0 ? 1.0 : s_star, g.a1 != 0.0 ? vc : vu, out);
    axpy(w_scale, vc, out);
    axpy(-w_scale * s_star, vu, out);
  } else {
    // APG (Sadat et al. 2025, Alg. 1): d = (v_c - v_u) [+ beta m], clipped to norm r,
    // split into parts parallel and orthogonal to v_c; g = v_u + w (d_perp + eta d_par).
    double d[kGuideOperands] = {};
    axpy(1.0, vc, d);
    axpy(-1.0, vu, d);
    if (g.momentum) d[kGuideMomentum] = g.beta;
    double clip = 1.0;
    if (g.threshold > 0.0) {
      const double norm = sqrt(mom.dot(d, d));
      clip = norm > g.threshold ? g.threshold / norm : 1.0;
    }
    const double cond_norm = fmax(sqrt(mom.dot(vc, vc)), 1e-12);  // F.normalize's eps
    const double parallel = clip * mom.dot(d, vc) / (cond_norm * cond_norm);
    axpy(1.0, g.a1 != 0.0 ? vc : vu, out);
    axpy(g.a0 * clip, d, out);
    axpy(-g.a0 * (1.0 - g.a2) * parallel, vc, out);
  }
  if (g.rescale != 0.0) {
    // guidance_rescale (Lin et al. 2024, eq. 15-16): g <- phi g std(v_c)/std(g) + (1 - phi) g.
    const double std_g = mom.std(out);
    const double ratio = std_g > 0.0 ? mom.std(vc) / std_g : 1.0;
    const double factor = g.rescale * ratio + (1.0 - g.rescale);
    for (int k = 0; k < kGuideOperands; ++k) out[k] *= factor;
  }
  // The raw output whose conversion p x + q out is g.
  out[kGuideX] -= g.p;
  for (int k = 0; k < kGuideOperands; ++k) w[k] = static_cast<W>(out[k] / g.q);
}

}  // namespace stepfuse
