// CPU kernels of block-sparse attention and block scoring (csrc/attention.h).
//
// Attention: one task per (batch, head, query block), handed out to the threads from a shared
// counter (query blocks list different numbers of key blocks).  A task loads its query block
// transposed in fp32, pre-multiplied by scale * log2(e) so that the softmax runs in base 2,
// then walks its listed key/value blocks in chunks of up to kChunkElements / block_size keys:
// S^T = K Q^T and O += P V are register-blocked GEMMs that read float32 key and value rows in
// place (16-bit ones are widened a block at a time), with FlashAttention-2's online softmax
// between chunks.  (BLAS GEMMs called from inside the thread pool ran two threads no faster
// than one; these also beat them single-threaded at these shapes.)  Each task's arithmetic
// depends only on its own inputs, so results are the same bits for any thread count.  GEMMs
// and element loops come from csrc/cpu/attention_math.h, built for AVX2/FMA/F16C and for the
// compiler's defaults and picked at run time.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention.h"

#define STEPFUSE_CPU_ISA baseline
#define STEPFUSE_ATTENTION_MATH_IMPL
#include "attention_math.h"
#undef STEPFUSE_ATTENTION_MATH_IMPL
#ifdef STEPFUSE_CPU_AVX2
#define STEPFUSE_CPU_ISA avx2
#include "attention_math.h"
#endif

namespace stepfuse {
namespace {

// fp32 logits per chunk (keys x queries): 128 KiB, in L2 between the softmax's passes.
constexpr int64_t kChunkElements = 32768;
constexpr float kLog2e = 1.4426950408889634f;

const AttentionMath& math() {
  static const AttentionMath table = [] {
#ifdef STEPFUSE_CPU_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return avx2::attention_math();
#endif
    return baseline::attention_math();
  }();
  return table;
}

template <typename T>
AttentionMath::Load loader(const AttentionMath& m) {
  if constexpr (std::is_same_v<T, float>)
    return m.load_f32;
  else if constexpr (std::is_same_v<T, at::BFloat16>)
    return m.load_bf16;
  else
    return m.load_f16;
}

// Calls f(T{}) with T the storage type of q's dtype (checked in csrc/attention.cpp).
template <typename F>
void dispatch_attention_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    default: return f(at::BFloat16{});
  }
}

// Runs worker(task) for every task in [0, tasks) on at most the thread pool's threads; each
// thread first builds its own state with make_state().
template <typename MakeState, typename Worker>
void for_each_task(int64_t tasks, const MakeState& make_state, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t task = next++; task < tasks; task = next++) worker(state, task);
  });
}

// A worker's fp32 buffers (64-byte aligned through the CPU allocator).  The logits tile is
// kept transposed, a row of padded-block queries per key: S^T = K Q^T reads the key rows in
// place, and the softmax runs across queries.
struct AttentionWorkspace {
  at::Tensor storage;
  float *qt, *st, *acc, *row_max, *row_sum, *rescale, *k, *v;  // k, v: 16-bit blocks widened
};

AttentionWorkspace make_workspace(int64_t block, int64_t d, int64_t chunk_keys, bool widen) {
  AttentionWorkspace w;
  const int64_t kv = widen ? chunk_keys * d : 0;
  const int64_t sizes[] = {d * block, chunk_keys * block, block * d, block, block, block, kv, kv};
  int64_t total = 0;
  for (int64_t n : sizes) total += (n + 15) / 16 * 16;
  w.storage = at::empty({total}, at::TensorOptions().dtype(at::kFloat));
  float* p = w.storage.data_ptr<float>();
  float** slots[] = {&w.qt, &w.st, &w.acc, &w.row_max, &w.row_sum, &w.rescale, &w.k, &w.v};
  for (int i = 0; i < 8; ++i) {
    *slots[i] = p;
    p += (sizes[i] + 15) / 16 * 16;
  }
  return w;
}

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Rows [start, start + len) of a key or value sequence as fp32 rows: in place for float32,
// else widened into `buffer`.  Returns the rows and sets their stride.
template <typename T>
const float* fp32_rows(const T* base, int64_t start, int64_t len, int64_t stride, int64_t d, AttentionMath::Load load,
                       float* buffer, int64_t& row_stride) {
  if constexpr (std::is_same_v<T, float>) {
    row_stride = stride;
    return base + start * stride;
  } else {
    load(base + start * stride, len, stride, d, 1.f, buffer, d, false);
    row_stride = d;
    return buffer;
  }
}

template <typename T>
void attend_query_block(const BlockSparseProblem& p, AttentionMath::Load load, const AttentionMath& m,
                        int64_t chunk_blocks, AttentionWorkspace& w, int64_t task) {
  const int64_t d = p.head_dim, bs = p.block_size;
  const int64_t qi = task % p.q_blocks, bh = task / p.q_blocks, b = bh / p.heads, h = bh % p.heads;
  const int64_t row0 = qi * bs, rows = std::min(bs, p.s_q - row0), cols = round_up(rows, kGemmColumns);
  const T* q = p.q.tensor.const_data_ptr<T>() + b * p.q.batch_stride + h * p.q.head_stride + row0 * p.q.seq_stride;
  const T* k = p.k.tensor.const_data_ptr<T>() + b * p.k.batch_stride + h * p.k.head_stride;
  const T* v = p.v.tensor.const_data_ptr<T>() + b * p.v.batch_stride + h * p.v.head_stride;
  T* out = p.out.tensor.data_ptr<T>() + b * p.out.batch_stride + h * p.out.head_stride + row0 * p.out.seq_stride;
  const int64_t count = p.kv_num_blocks.const_data_ptr<int32_t>()[task];
  const int32_t* listed = p.kv_indices.const_data_ptr<int32_t>() + task * p.max_blocks;

  std::fill(w.row_max, w.row_max + cols, -std::numeric_limits<float>::infinity());
  std::fill(w.row_sum, w.row_sum + cols, 0.f);
  if (count > 0) {
    // Q^T, pre-scaled into base 2; the queries that pad the block to `cols` are zeros.
    load(q, rows, p.q.seq_stride, d, static_cast<float>(p.scale) * kLog2e, w.qt, cols, true);
    for (int64_t c = 0; c < d; ++c) std::fill(w.qt + c * cols + rows, w.qt + (c + 1) * cols, 0.f);
  }
  for (int64_t first = 0; first < count; first += chunk_blocks) {
    const int64_t last = std::min(count, first + chunk_blocks);
    int64_t keys = 0;
    for (int64_t j = first; j < last; ++j) {
      const int64_t start = listed[j] * bs, len = std::min(bs, p.s_kv - start);
      int64_t ldk = 0;
      const float* kr = fp32_rows(k, start, len, p.k.seq_stride, d, load, w.k + keys * d, ldk);
      m.gemm(kr, ldk, w.qt, cols, w.st + keys * cols, cols, len, cols, d, false);
      keys += len;
    }
    m.softmax_columns(w.st, keys, cols, w.row_max, w.row_sum, w.rescale);
    if (first > 0)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < d; ++c) w.acc[r * d + c] *= w.rescale[r];
    keys = 0;
    for (int64_t j = first; j < last; ++j) {
      const int64_t start = listed[j] * bs, len = std::min(bs, p.s_kv - start);
      int64_t ldv = 0;
      const float* vr = fp32_rows(v, start, len, p.v.seq_stride, d, load, w.v + keys * d, ldv);
      m.gemm_at(w.st + keys * cols, cols, vr, ldv, w.acc, d, rows, d, len, j > 0);
      keys += len;
    }
  }
  // A query block that attends to nothing (row sum 0) gives zeros.
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = w.row_sum[r] > 0.f ? 1.f / w.row_sum[r] : 0.f;
    const float* a = w.acc + r * d;
    T* o = out + r * p.out.seq_stride;
    if (count == 0)
      std::fill(o, o + d, T(0.f));
    else
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<T>(a[c] * inv);
  }
}

}  // namespace

at::Tensor block_sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                      int64_t block_size, double scale, bool bshd) {
  const BlockSparseProblem p =
      block_sparse_attention_prepare(q, k, v, kv_num_blocks, kv_indices, block_size, scale, bshd);
  const int64_t tasks = p.batch * p.heads * p.q_blocks;
  if (tasks == 0) return p.out.tensor;
  const int64_t chunk_blocks =
      std::clamp<int64_t>(kChunkElements / (p.block_size * p.block_size), 1, std::max<int64_t>(p.max_blocks, 1));
  const AttentionMath& m = math();
  dispatch_attention_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const AttentionMath::Load load = loader<T>(m);
    for_each_task(
        tasks, [&] { return make_workspace(p.block_size, p.head_dim, chunk_blocks * p.block_size, !std::is_same_v<T, float>); },
        [&](AttentionWorkspace& w, int64_t task) { attend_query_block<T>(p, load, m, chunk_blocks, w, task); });
  });
  return p.out.tensor;
}

namespace {

// Means over the valid tokens of each block of one (batch, head) sequence, written as rows
// (bar[j * d + c]) or, with transpose, as columns (bar[c * ld + j]).
void pool_blocks(const AttentionOperand& x, const void* base, int64_t element_size, int64_t s, int64_t blocks,
                 int64_t bs, int64_t d, AttentionMath::Load load, float* tile, float* mean, float* bar, int64_t ld,
                 bool transpose) {
  for (int64_t j = 0; j < blocks; ++j) {
    const int64_t rows = std::min(bs, s - j * bs);
    load(static_cast<const char*>(base) + j * bs * x.seq_stride * element_size, rows, x.seq_stride, d, 1.f, tile, d,
         false);
    std::fill(mean, mean + d, 0.f);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < d; ++c) mean[c] += tile[r * d + c];
    for (int64_t c = 0; c < d; ++c) (transpose ? bar[c * ld + j] : bar[j * ld + c]) = mean[c] / rows;
  }
}

}  // namespace

at::Tensor attention_block_scores_cpu(const at::Tensor& q, const at::Tensor& k, int64_t block_size, double scale,
                                      bool bshd) {
  const BlockScoresProblem p = attention_block_scores_prepare(q, k, block_size, scale, bshd);
  const int64_t pairs = p.batch * p.heads, d = p.head_dim, bs = p.block_size;
  if (pairs * p.q_blocks * p.kv_blocks == 0) return p.out;
  // log(n_j): a key block of n_j alike keys carries n_j times the mass of one (ref.block_scores).
  std::vector<double> log_counts(static_cast<size_t>(p.kv_blocks), std::log(static_cast<double>(bs)));
  log_counts.back() = std::log(static_cast<double>(p.s_kv - (p.kv_blocks - 1) * bs));
  const int64_t ld = round_up(p.kv_blocks, kGemmColumns);  // pooled keys, transposed and zero-padded
  const AttentionMath& m = math();
  dispatch_attention_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const AttentionMath::Load load = loader<T>(m);
    const int64_t size = sizeof(T);
    for_each_task(
        pairs,
        [&] { return at::zeros({(bs + 1 + p.q_blocks) * d + (d + p.q_blocks) * ld}, at::TensorOptions().dtype(at::kFloat)); },
        [&](at::Tensor& buffer, int64_t bh) {
          const int64_t b = bh / p.heads, h = bh % p.heads;
          float* tile = buffer.data_ptr<float>();
          float* mean = tile + bs * d;
          float* q_bar = mean + d;
          float* k_bar = q_bar + p.q_blocks * d;
          float* logits = k_bar + d * ld;
          pool_blocks(p.q, p.q.tensor.const_data_ptr<T>() + b * p.q.batch_stride + h * p.q.head_stride, size, p.s_q,
                      p.q_blocks, bs, d, load, tile, mean, q_bar, d, false);
          pool_blocks(p.k, p.k.tensor.const_data_ptr<T>() + b * p.k.batch_stride + h * p.k.head_stride, size,
                      p.s_kv, p.kv_blocks, bs, d, load, tile, mean, k_bar, ld, true);
          m.gemm(q_bar, d, k_bar, ld, logits, ld, p.q_blocks, ld, d, false);
          float* row = p.out.data_ptr<float>() + bh * p.q_blocks * p.kv_blocks;
          std::vector<double> z(static_cast<size_t>(p.kv_blocks));
          for (int64_t i = 0; i < p.q_blocks; ++i, row += p.kv_blocks) {
            double top = -std::numeric_limits<double>::infinity(), sum = 0.0;
            for (int64_t j = 0; j < p.kv_blocks; ++j) {
              z[j] = p.scale * logits[i * ld + j] + log_counts[j];
              top = std::max(top, z[j]);
            }
            for (int64_t j = 0; j < p.kv_blocks; ++j) sum += (z[j] = std::exp(z[j] - top));
            for (int64_t j = 0; j < p.kv_blocks; ++j) row[j] = static_cast<float>(z[j] / sum);
          }
        });
  });
  return p.out;
}

}  // namespace stepfuse
