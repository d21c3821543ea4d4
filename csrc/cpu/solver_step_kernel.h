// CPU kernel of the fused solver step, compiled once per instruction set: the
// including file defines STEPFUSE_CPU_ISA (the namespace) and gets its own compiler
// flags (csrc/cpu/solver_step_<isa>.cpp).  Each thread walks its range in chunks of
// kChunk elements.  Every row is one pass over the chunk that multiplies-adds only
// its non-zero columns (unrolled by column count, vectorised over elements), reading
// fp32 operands in place and half-precision ones from small widened buffers that stay
// in L1, and writing fp32 results straight to their destination.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>

#include "../solver_step.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

#ifndef STEPFUSE_CPU_ISA
#error "define STEPFUSE_CPU_ISA before including solver_step_kernel.h"
#endif

namespace stepfuse {
namespace STEPFUSE_CPU_ISA {
namespace {

constexpr int64_t kChunk = 1024;
constexpr int64_t kGrain = 16384;

template <typename T>
inline void widen(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void narrow(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// bfloat16 is the top half of a float: written as integer arithmetic the compiler
// vectorises these loops, which c10::BFloat16's scalar conversions do not allow.
template <>
inline void widen(const at::BFloat16* __restrict__ src, float* __restrict__ dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  auto* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

template <>
inline void narrow(const float* __restrict__ src, at::BFloat16* __restrict__ dst, int64_t n) {
  const auto* in = reinterpret_cast<const uint32_t*>(src);
  auto* bits = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = in[i];
    // Round to nearest even; NaNs stay quiet NaNs instead of rounding into infinity.
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    bits[i] = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
  }
}

#if defined(__F16C__)
// Eight half-precision values per instruction instead of c10::Half's scalar bit twiddling.
// Tails go through an 8-wide stack buffer too, so this file calls no c10::Half inline
// conversion (whose AVX2 build the linker could otherwise share with the baseline kernel).
template <>
inline void widen(const at::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  if (i < n) {
    alignas(16) uint16_t in[8] = {};
    alignas(32) float out[8];
    std::memcpy(in, src + i, (n - i) * sizeof(uint16_t));
    _mm256_store_ps(out, _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(in))));
    std::memcpy(dst + i, out, (n - i) * sizeof(float));
  }
}

template <>
inline void narrow(const float* __restrict__ src, at::Half* __restrict__ dst, int64_t n) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kRound));
  if (i < n) {
    alignas(32) float in[8] = {};
    alignas(16) uint16_t out[8];
    std::memcpy(in, src + i, (n - i) * sizeof(float));
    _mm_store_si128(reinterpret_cast<__m128i*>(out), _mm256_cvtps_ph(_mm256_load_ps(in), kRound));
    std::memcpy(dst + i, out, (n - i) * sizeof(uint16_t));
  }
}
#endif

inline void fill_philox(const StepProgram& p, int64_t begin, int64_t n, float* __restrict__ dst) {
  int64_t i = 0;
  while (i < n) {
    const int64_t index = begin + i;
    const Normal4 z = philox_normal4(p.offset + static_cast<uint64_t>(index / 4), p.seed);
    for (int64_t lane = index % 4; lane < 4 && i < n; ++lane, ++i) dst[i] = z.v[lane];
  }
}

// Element access in a storage dtype: fp32 as is, bf16 widened / rounded in registers.
inline float load_element(float v) { return v; }
inline float load_element(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void store_element(float v, float* dst) { *dst = v; }
inline void store_element(float v, at::BFloat16* dst) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  // Round to nearest even; NaNs stay quiet NaNs (as the buffered narrow above).
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  dst->x = static_cast<uint16_t>(nan ? ((u >> 16) | 0x40u) : rounded);
}

// dst[i] = sum_k c[k] * src[k][i] over N columns in one pass, all in storage dtype T.
// `dst` may alias a source only element-for-element (each element is read before it is
// written).
template <typename T, int N>
void row_pass(T* dst, const float* c, const T* const* src, int64_t n) {
  std::array<const T*, N> s;
  std::array<float, N> w;
  for (int k = 0; k < N; ++k) s[k] = src[k], w[k] = c[k];
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float acc = w[0] * load_element(s[0][i]);
    for (int k = 1; k < N; ++k) acc += w[k] * load_element(s[k][i]);
    store_element(acc, dst + i);
  }
}

template <typename T>
using RowPass = void (*)(T*, const float*, const T* const*, int64_t);
template <typename T>
constexpr std::array<RowPass<T>, kMaxWidth + 1> kRowPasses = {
    nullptr,         &row_pass<T, 1>, &row_pass<T, 2>, &row_pass<T, 3>,  &row_pass<T, 4>,  &row_pass<T, 5>,
    &row_pass<T, 6>, &row_pass<T, 7>, &row_pass<T, 8>, &row_pass<T, 9>, &row_pass<T, 10>, &row_pass<T, 11>};

// Evaluates row `r` into `dst` from the operand pointers `col` (one per padded column),
// touching only the columns with a non-zero coefficient.
template <typename T>
void run_row(const StepProgram& p, int r, const T* const (&col)[kMaxWidth], T* dst, int64_t n) {
  const float* c = p.coeffs + r * kMaxWidth;
  float nz_coeff[kMaxWidth];
  const T* nz_src[kMaxWidth];
  int count = 0;
  for (int k = 0; k < kMaxWidth; ++k)
    if (c[k] != 0.f) nz_coeff[count] = c[k], nz_src[count++] = col[k];
  if (count == 0) {
    for (int64_t i = 0; i < n; ++i) store_element(0.f, dst + i);
  } else {
    kRowPasses<T>[count](dst, nz_coeff, nz_src, n);
  }
}

// Direct path: when every operand a row touches is stored in one dtype (fp32, or bf16
// with a bf16 history) each row is a single pass that reads its sources in place and
// converts in registers, instead of widening them into buffers first.

template <typename T>
void solver_step_cpu_direct(const StepProgram& p, StepOperands& ops) {
  const T* x = ops.sample.const_data_ptr<T>();
  const T* out = ops.model_output.const_data_ptr<T>();
  const T* noise = ops.noise ? ops.noise->const_data_ptr<T>() : nullptr;
  T* hist = ops.history.data_ptr<T>();
  T* next = ops.next_sample.data_ptr<T>();
  const int64_t numel = ops.numel;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t n = std::min(kChunk, end - start);
      const T* col[kMaxWidth] = {};
      col[kSampleColumn] = x + start;
      col[kModelOutputColumn] = out + start;
      col[kNoiseColumn] = noise != nullptr ? noise + start : nullptr;
      // Slots are read in place, so a row sees what earlier rows stored there.
      for (int s = 0; s < p.num_slots; ++s) col[slot_column(s)] = hist + s * numel + start;
      for (int r = 0; r < p.num_rows; ++r) {
        const int target = p.targets[r];
        run_row<T>(p, r, col, target < 0 ? next + start : hist + target * numel + start, n);
      }
    }
  });
}

// fp32 view of n elements: the data in place, or widened into `buf`.
template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    widen(src, buf, n);
    return buf;
  }
}

// Buffered kernel.  `model_output(start, n, buf)` returns the fp32 model output of
// elements [start, start + n), in place or written to `buf` (kChunk floats); the
// guided step computes it there from the branches.
template <typename scalar_t, typename hist_t, typename ModelOutput>
void solver_step_cpu_kernel(const StepProgram& p, StepOperands& ops, bool reads_model_output,
                            const ModelOutput& model_output) {
  constexpr bool kSampleFloat = std::is_same_v<scalar_t, float>;
  constexpr bool kHistFloat = std::is_same_v<hist_t, float>;
  const scalar_t* x = ops.sample.const_data_ptr<scalar_t>();
  const scalar_t* noise = ops.noise ? ops.noise->const_data_ptr<scalar_t>() : nullptr;
  hist_t* hist = ops.history.data_ptr<hist_t>();
  scalar_t* next = ops.next_sample.data_ptr<scalar_t>();
  const int64_t numel = ops.numel;

  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float buf[kMaxWidth][kChunk];
    alignas(64) float acc[kChunk];
    const float* col[kMaxWidth] = {};
    // Point a column at fp32 data in place, or widen it into its buffer.
    const auto bind = [&](int column, const auto* src, int64_t n) {
      using T = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
      if constexpr (std::is_same_v<T, float>) {
        col[column] = src;
      } else {
        widen(src, buf[column], n);
        col[column] = buf[column];
      }
    };
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t n = std::min(kChunk, end - start);
      if (p.reads_sample) bind(kSampleColumn, x + start, n);
      if (reads_model_output) col[kModelOutputColumn] = model_output(start, n, buf[kModelOutputColumn]);
      for (int s = 0; s < p.num_slots; ++s)
        if (p.load_mask & (1u << s)) bind(slot_column(s), hist + s * numel + start, n);
      if (p.uses_noise) {
        if (noise != nullptr) {
          bind(kNoiseColumn, noise + start, n);
        } else {
          fill_philox(p, start, n, buf[kNoiseColumn]);
          col[kNoiseColumn] = buf[kNoiseColumn];
        }
      }
      for (int r = 0; r < p.num_rows; ++r) {
        const int target = p.targets[r];
        float* dst = acc;
        if (target < 0 && kSampleFloat) dst = reinterpret_cast<float*>(next + start);
        if (target >= 0 && kHistFloat) dst = reinterpret_cast<float*>(hist + target * numel + start);
        run_row<float>(p, r, col, dst, n);
        if (target < 0) {
          if (!kSampleFloat) narrow(acc, next + start, n);
        } else if (kHistFloat) {
          col[slot_column(target)] = dst;  // later rows read the stored fp32 value in place
        } else {
          // Later rows read the slot as stored, rounded to the history dtype.
          hist_t* slot = hist + target * numel + start;
          narrow(acc, slot, n);
          if (p.reread_rows & (1u << r)) {
            widen(slot, buf[slot_column(target)], n);
            col[slot_column(target)] = buf[slot_column(target)];
          }
        }
      }
    }
  });
}

}  // namespace

void launch_solver_step_cpu(const StepProgram& program, StepOperands& ops) {
  SF_DISPATCH_STEP_TYPES(ops.sample.scalar_type(), ops.history.scalar_type(), "solver_step", [&] {
    constexpr bool kDirect = std::is_same_v<scalar_t, hist_t> &&
                             (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>);
    // Philox noise is generated into an fp32 buffer: that needs the buffered path.
    const bool philox = program.uses_noise && !ops.noise.has_value();
    if constexpr (kDirect) {
      if (!philox) return solver_step_cpu_direct<scalar_t>(program, ops);
    }
    const scalar_t* out = ops.model_output.const_data_ptr<scalar_t>();
    solver_step_cpu_kernel<scalar_t, hist_t>(
        program, ops, program.reads_model_output,
        [out](int64_t start, int64_t n, float* buf) { return as_float(out + start, buf, n); });
  });
}

template <typename scalar_t, typename hist_t>
void guided_step_cpu_kernel(const StepProgram& program, StepOperands& ops, const GuidedOperands& guided,
                            const float* weights) {
  const GuidanceRule& g = guided.rule;
  const scalar_t* x = ops.sample.const_data_ptr<scalar_t>();
  const scalar_t* cond = guided.branches[0].const_data_ptr<scalar_t>();
  const scalar_t* uncond = guided.branches[1].const_data_ptr<scalar_t>();
  const scalar_t* extra = g.extra ? guided.branches[2].const_data_ptr<scalar_t>() : nullptr;
  float* momentum = g.momentum ? guided.momentum->data_ptr<float>() : nullptr;
  const int64_t per_sample = ops.numel / guided.batch;
  const float mq = static_cast<float>(g.q), beta = static_cast<float>(g.beta);
  // The model output column, sample by sample: out = sum_k w_k operand_k; the
  // momentum buffer is read for it and then advanced, element for element.
  const auto guided_output = [&](int64_t start, int64_t n, float* buf) -> const float* {
    // Widening buffers, untouched (and uninitialised) when the operands are fp32.
    alignas(64) float tmp[4][kChunk];
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
    const float* vx = as_float(x + start, tmp[0], n);
    const float* vc = as_float(cond + start, tmp[1], n);
    const float* vu = as_float(uncond + start, tmp[2], n);
    const float* vt = extra != nullptr ? as_float(extra + start, tmp[3], n) : nullptr;
    float* m = momentum != nullptr ? momentum + start : nullptr;
    for (int64_t i = 0; i < n;) {
      const int64_t b = (start + i) / per_sample;
      const int64_t end = std::min(n, (b + 1) * per_sample - start);
      const float* w = weights + b * kGuideOperands;
      const float w0 = w[kGuideX], w1 = w[kGuideCond], w2 = w[kGuideUncond], w3 = w[kGuideExtra],
                  w4 = w[kGuideMomentum];
      if (vt == nullptr && m == nullptr) {
#pragma GCC ivdep
        for (int64_t e = i; e < end; ++e) buf[e] = w0 * vx[e] + w1 * vc[e] + w2 * vu[e];
      } else {
        for (int64_t e = i; e < end; ++e) {
          float acc = w0 * vx[e] + w1 * vc[e] + w2 * vu[e];
          if (vt != nullptr) acc += w3 * vt[e];
          if (m != nullptr) {
            acc += w4 * m[e];
            m[e] = mq * (vc[e] - vu[e]) + beta * m[e];
          }
          buf[e] = acc;
        }
      }
      i = end;
    }
    return buf;
#pragma GCC diagnostic pop
  };
  solver_step_cpu_kernel<scalar_t, hist_t>(program, ops, true, guided_output);
}

void launch_guided_step_cpu(const StepProgram& program, StepOperands& ops, const GuidedOperands& guided,
                            const float* weights) {
  SF_DISPATCH_STEP_TYPES(ops.sample.scalar_type(), ops.history.scalar_type(), "guided_step",
                         [&] { guided_step_cpu_kernel<scalar_t, hist_t>(program, ops, guided, weights); });
}

// sum_i a[i] * b[i] (b == nullptr: sum_i a[i]) over n elements, products and sums in
// double (8 lanes the compiler keeps in vector registers).  The guidance weights take
// differences of these sums (a variance from E[g^2] - E[g]^2, ||c - u||^2 from
// ||c||^2 - 2<c, u> + ||u||^2); fp32 partial sums would lose the small difference when
// the branches nearly agree or the mean dwarfs the spread.
inline double lane_dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  // Explicit 4-wide double FMAs on widened floats (exact products), four accumulators:
  // the compiler does not vectorise the float -> double widening of the portable loop.
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  const auto widen4 = [](const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); };
  int64_t i = 0;
  if (b == nullptr) {
    for (; i + 16 <= n; i += 16)
      for (int k = 0; k < 4; ++k) acc[k] = _mm256_add_pd(acc[k], widen4(a + i + 4 * k));
  } else {
    for (; i + 16 <= n; i += 16)
      for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_pd(widen4(a + i + 4 * k), widen4(b + i + 4 * k), acc[k]);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
  double total = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) total += static_cast<double>(a[i]) * (b == nullptr ? 1.0 : static_cast<double>(b[i]));
  return total;
#else
  constexpr int kLanes = 8;
  double lanes[kLanes] = {};
  int64_t i = 0;
  if (b == nullptr) {
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(a[i + l]);
    for (; i < n; ++i) lanes[0] += static_cast<double>(a[i]);
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<double>(a[i + l]) * static_cast<double>(b[i + l]);
    for (; i < n; ++i) lanes[0] += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  }
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
#endif
}

// Per-sample sums and Gram matrix of the operands (stepfuse/guidance.h).  Each task
// covers one block of one sample; each statistic is one pass over an L1-resident chunk.
template <typename T, int N>
void guidance_stats_block(const T* const* operands, const float* momentum, int64_t begin, int64_t n,
                          double* partial) {
  alignas(64) float tmp[N][kChunk];
  for (int64_t start = begin; start < begin + n; start += kChunk) {
    const int64_t len = std::min(kChunk, begin + n - start);
    const float* v[N];
    for (int k = 0; k < N; ++k) {
      if (k == N - 1 && momentum != nullptr)
        v[k] = momentum + start;
      else
        v[k] = as_float(operands[k] + start, tmp[k], len);
    }
    int idx = 0;
    for (int a = 0; a < N; ++a) partial[idx++] += lane_dot(v[a], nullptr, len);
    for (int a = 0; a < N; ++a)
      for (int b = a; b < N; ++b) partial[idx++] += lane_dot(v[a], v[b], len);
  }
}

template <typename T, int N>
void guidance_stats_typed(const std::vector<at::Tensor>& operands, at::Tensor& stats) {
  constexpr int kWidth = guidance_stats_width(N);
  constexpr int64_t kBlock = 16 * kChunk;
  // The momentum buffer (float32) may follow branches of a 16-bit dtype: it is the last operand.
  const bool float_last = !std::is_same_v<T, float> && operands[N - 1].scalar_type() == at::kFloat;
  const T* ptrs[N];
  for (int k = 0; k < N; ++k) ptrs[k] = (k == N - 1 && float_last) ? nullptr : operands[k].const_data_ptr<T>();
  const float* last = float_last ? operands[N - 1].const_data_ptr<float>() : nullptr;
  const int64_t batch = operands[0].size(0);
  const int64_t per_sample = operands[0].numel() / batch;
  const int64_t blocks = (per_sample + kBlock - 1) / kBlock;
  std::vector<double> partial(static_cast<size_t>(batch * blocks * kWidth), 0.0);
  at::parallel_for(0, batch * blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / blocks, block = task % blocks;
      const int64_t begin = b * per_sample + block * kBlock;
      const int64_t n = std::min(kBlock, per_sample - block * kBlock);
      guidance_stats_block<T, N>(ptrs, last, begin, n, partial.data() + task * kWidth);
    }
  });
  double* out = stats.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t block = 0; block < blocks; ++block)
      for (int k = 0; k < kWidth; ++k) out[b * kWidth + k] += partial[(b * blocks + block) * kWidth + k];
}

void launch_guidance_stats_cpu(const std::vector<at::Tensor>& operands, at::Tensor& stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, operands[0].scalar_type(), "guidance_stats", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      switch (operands.size()) {
        case 1: return guidance_stats_typed<scalar_t, 1>(operands, stats);
        case 2: return guidance_stats_typed<scalar_t, 2>(operands, stats);
        case 3: return guidance_stats_typed<scalar_t, 3>(operands, stats);
        case 4: return guidance_stats_typed<scalar_t, 4>(operands, stats);
        default: return guidance_stats_typed<scalar_t, 5>(operands, stats);
      }
    }
  });
}

}  // namespace STEPFUSE_CPU_ISA
}  // namespace stepfuse
