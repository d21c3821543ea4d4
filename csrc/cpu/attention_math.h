// Element loops of the CPU attention kernels (csrc/cpu/attention_kernel.cpp), compiled once
// per instruction set: the including file defines STEPFUSE_CPU_ISA (the namespace) and gets
// its own compiler flags (csrc/cpu/attention_kernel_avx2.cpp).  Everything here works on raw
// fp32 / 16-bit buffers and calls no inline function of another header, so the linker never
// shares an AVX2 build of one with the baseline kernel.
#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#else
#include <c10/util/Half.h>  // portable half -> float (the baseline build only)
#endif

#ifndef STEPFUSE_CPU_ISA
#error "define STEPFUSE_CPU_ISA before including attention_math.h"
#endif

namespace stepfuse {

#ifndef STEPFUSE_ATTENTION_MATH_TABLE
#define STEPFUSE_ATTENTION_MATH_TABLE
// The entry points of one build, gathered in a table the driver picks once.
struct AttentionMath {
  // dst[r * dst_stride + c] = mul * src[r * stride + c] in fp32 (r < rows, c < d); with
  // transpose, dst[c * dst_stride + r] instead.
  using Load = void (*)(const void* src, int64_t rows, int64_t stride, int64_t d, float mul, float* dst,
                        int64_t dst_stride, bool transpose);
  Load load_f32, load_bf16, load_f16;
  // C (+)= A B for row-major fp32 B [depth x cols] and C [rows x cols] with leading dims ldb,
  // ldc, cols a multiple of kGemmColumns; A is [rows x depth] row-major (gemm) or stored
  // transposed, [depth x rows] (gemm_at), with leading dim lda.
  using Gemm = void (*)(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                        int64_t rows, int64_t cols, int64_t depth, bool accumulate);
  Gemm gemm, gemm_at;
  // One step of the online softmax over a tile of base-2 logits stored transposed, keys x cols
  // (one column per query, cols a multiple of 8), in place; per-query running max, sum and
  // the factor that rescales the earlier accumulator.
  void (*softmax_columns)(float* st, int64_t keys, int64_t cols, float* row_max, float* row_sum, float* rescale);
};
constexpr int64_t kGemmColumns = 16;
#endif

namespace STEPFUSE_CPU_ISA {

AttentionMath attention_math();

#ifdef STEPFUSE_ATTENTION_MATH_IMPL
namespace {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline float f16_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

template <typename T, float (*Convert)(T)>
void load_rows(const void* src, int64_t rows, int64_t stride, int64_t d, float mul, float* __restrict__ dst,
               int64_t dst_stride, bool transpose) {
  const T* in = static_cast<const T*>(src);
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict__ row = in + r * stride;
    if (transpose) {
      for (int64_t c = 0; c < d; ++c) dst[c * dst_stride + r] = mul * Convert(row[c]);
    } else {
      float* __restrict__ out = dst + r * dst_stride;
      for (int64_t c = 0; c < d; ++c) out[c] = mul * Convert(row[c]);
    }
  }
}

inline float identity(float x) { return x; }

// Eight fp32 lanes as a GCC/Clang vector: AVX registers in the AVX2 build, SSE pairs in the
// baseline one.  Explicit vectors because the compiler does not vectorise these reductions.
// (These helpers are internal: the warning that AVX vectors change the argument ABI without
// AVX does not apply.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof(v)); }

inline f32x8 broadcast8(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

// 2^x for x <= 0 (0 below 2^-126): x = n + f with n an integer and |f| <= 1/2, 2^f from its
// Taylor series in f ln 2 to degree 7 (truncation error < 6e-9 relative), 2^n from the
// exponent bits.
inline f32x8 exp2_nonpositive(f32x8 x) {
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  constexpr float c1 = 0.6931471805599453f, c2 = 0.2402265069591007f, c3 = 0.05550410866482158f,
                  c4 = 0.009618129107628477f, c5 = 0.0013333558146428443f, c6 = 0.00015403530393381608f,
                  c7 = 1.525273380405984e-05f;
  x = x < -127.f ? broadcast8(-127.f) : x;
  const f32x8 n = (x + kRound) - kRound;
  const f32x8 f = x - n;
  const f32x8 p = 1.f + f * (c1 + f * (c2 + f * (c3 + f * (c4 + f * (c5 + f * (c6 + f * c7))))));
  // n = -127 gives the exponent field 0: the result is 0 (flushes what would be subnormal).
  const i32x8 bits = (__builtin_convertvector(n, i32x8) + 127) << 23;
  f32x8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// R rows x 16 columns of C, in 2 R vector accumulators (12 of the 16 AVX registers at R = 6):
// each step over the depth loads 16 values of B and broadcasts one value of A per row.
template <int R, bool kTransA>
inline void gemm_tile(const float* __restrict__ a, int64_t lda, const float* __restrict__ b, int64_t ldb,
                      float* __restrict__ c, int64_t ldc, int64_t depth, bool accumulate) {
  f32x8 acc[R][2];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    acc[r][0] = accumulate ? load8(c + r * ldc) : f32x8{};
    acc[r][1] = accumulate ? load8(c + r * ldc + 8) : f32x8{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    const f32x8 b0 = load8(b + k * ldb), b1 = load8(b + k * ldb + 8);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const f32x8 x = broadcast8(kTransA ? a[k * lda + r] : a[r * lda + k]);
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r) {
    store8(c + r * ldc, acc[r][0]);
    store8(c + r * ldc + 8, acc[r][1]);
  }
}

// Column panels of B outermost, so that a panel (depth x 16) stays in L1 while every row
// block of A passes over it.  Each C element is one dot product in depth order: the result
// does not depend on how the rows were split.
template <bool kTransA>
void gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t rows,
          int64_t cols, int64_t depth, bool accumulate) {
  constexpr int kRows = 6;
  for (int64_t j = 0; j < cols; j += kGemmColumns) {
    int64_t i = 0;
    for (; i + kRows <= rows; i += kRows)
      gemm_tile<kRows, kTransA>(a + (kTransA ? i : i * lda), lda, b + j, ldb, c + i * ldc + j, ldc, depth,
                                accumulate);
    const float* ai = a + (kTransA ? i : i * lda);
    float* ci = c + i * ldc + j;
    switch (rows - i) {
      case 5: gemm_tile<5, kTransA>(ai, lda, b + j, ldb, ci, ldc, depth, accumulate); break;
      case 4: gemm_tile<4, kTransA>(ai, lda, b + j, ldb, ci, ldc, depth, accumulate); break;
      case 3: gemm_tile<3, kTransA>(ai, lda, b + j, ldb, ci, ldc, depth, accumulate); break;
      case 2: gemm_tile<2, kTransA>(ai, lda, b + j, ldb, ci, ldc, depth, accumulate); break;
      case 1: gemm_tile<1, kTransA>(ai, lda, b + j, ldb, ci, ldc, depth, accumulate); break;
      default: break;
    }
  }
}

// FlashAttention-2's online softmax (Dao 2023, Algorithm 1): with the running max m and sum
// l of a query, a new tile of its logits s gives m' = max(m, max s), p = 2^(s - m'), and the
// earlier sum and accumulator are rescaled by 2^(m - m') (0 on the first tile, where m = -inf).
// The tile is transposed (a row per key), so every step is vectorised across queries and
// walks the tile row by row; each sum is taken in key order.
void softmax_columns(float* st, int64_t keys, int64_t cols, float* row_max, float* row_sum, float* rescale) {
  for (int64_t i = 0; i < cols; i += 8) store8(rescale + i, load8(row_max + i));  // the tile max, for now
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t i = 0; i < cols; i += 8) {
      const f32x8 x = load8(st + j * cols + i), m = load8(rescale + i);
      store8(rescale + i, x > m ? x : m);
    }
  for (int64_t i = 0; i < cols; i += 8) {
    const f32x8 m = load8(row_max + i), m_new = load8(rescale + i);
    store8(row_max + i, m_new);
    store8(rescale + i, exp2_nonpositive(m - m_new));  // exp2(-inf) = 0 on the first tile
  }
  for (int64_t i = 0; i < cols; i += 8) store8(row_sum + i, load8(row_sum + i) * load8(rescale + i));
  for (int64_t j = 0; j < keys; ++j)
    for (int64_t i = 0; i < cols; i += 8) {
      const f32x8 p = exp2_nonpositive(load8(st + j * cols + i) - load8(row_max + i));
      store8(st + j * cols + i, p);
      store8(row_sum + i, load8(row_sum + i) + p);
    }
}

}  // namespace

AttentionMath attention_math() {
  return {&load_rows<float, identity>, &load_rows<uint16_t, bf16_to_float>, &load_rows<uint16_t, f16_to_float>, &gemm<false>,
          &gemm<true>, &softmax_columns};
}
#endif  // STEPFUSE_ATTENTION_MATH_IMPL

}  // namespace STEPFUSE_CPU_ISA
}  // namespace stepfuse

#undef STEPFUSE_CPU_ISA
