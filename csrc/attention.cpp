// Host-side glue of the attention ops (csrc/attention.h): input checks and strided views.
#include "attention.h"

#include <cmath>
#include <vector>

namespace stepfuse {
namespace {

constexpr int64_t kBlockSizes[] = {16, 32, 64, 128};

bool one_of(int64_t value, const int64_t (&allowed)[4]) {
  for (int64_t a : allowed)
    if (a == value) return true;
  return false;
}

// (batch, head, sequence) strides of a 4-D operand; a copy only when the head dim is strided.
AttentionOperand strided(const at::Tensor& t, bool bshd) {
  at::Tensor u = t.stride(3) == 1 ? t : t.contiguous();
  return {u, u.stride(0), u.stride(bshd ? 2 : 1), u.stride(bshd ? 1 : 2)};
}

struct Shape {
  int64_t batch, heads, head_dim, s_q, s_kv, q_blocks, kv_blocks;
};

// Checks shared by both ops: q and the key-side tensors (k, and v for attention).
Shape check_qk(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v, int64_t block_size,
               double scale, bool bshd) {
  const char* layout = bshd ? "(B, S, H, D) for bshd" : "(B, H, S, D) for bhsd";
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{v, "v"}}) {
    if (t == nullptr) continue;
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf ||
                         t->scalar_type() == at::kBFloat16,
                     op, ": ", name, " must be float32, float16 or bfloat16, got ", t->scalar_type());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have dtype ", q.scalar_type(),
                     " like q, got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": ", name, " must be on ", q.device(), " like q, got ",
                      t->device());
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must be 4-D ", layout, ", got shape ", t->sizes());
  }
  if (v != nullptr)
    TORCH_CHECK_VALUE(v->sizes() == k.sizes(), op, ": v must have the shape of k ", k.sizes(), ", got ", v->sizes());
  const int head_axis = bshd ? 2 : 1, seq_axis = bshd ? 1 : 2;
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(head_axis) == q.size(head_axis) && k.size(3) == q.size(3), op,
                    ": k must match q in batch, heads and head dim ", layout, ", got q ", q.sizes(), " and k ",
                    k.sizes());
  // The P V product walks the head dim in 16-wide column panels (csrc/cpu/attention_math.h).
  TORCH_CHECK_VALUE(q.size(3) % 16 == 0 && q.size(3) >= 16 && q.size(3) <= 128, op,
                    ": head dim (last axis of q) must be a multiple of 16 from 16 to 128, got ", q.size(3));
  TORCH_CHECK_VALUE(one_of(block_size, kBlockSizes), op, ": block_size must be 16, 32, 64 or 128, got ", block_size);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  Shape s{q.size(0), q.size(head_axis), q.size(3), q.size(seq_axis), k.size(seq_axis), 0, 0};
  s.q_blocks = (s.s_q + block_size - 1) / block_size;
  s.kv_blocks = (s.s_kv + block_size - 1) / block_size;
  return s;
}

// kv_num_blocks (B, H, Qb) in [0, max_blocks]; the used kv_indices in [0, Kb), distinct per row.
void check_block_mask(const char* op, const at::Tensor& counts, const at::Tensor& indices, const at::Tensor& q,
                      const Shape& s) {
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kInt, op, ": kv_num_blocks must be int32, got ",
                   counts.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, op, ": kv_indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(counts.device() == q.device() && indices.device() == q.device(), op,
                    ": kv_num_blocks and kv_indices must be on ", q.device(), " like q, got ", counts.device(),
                    " and ", indices.device());
  const std::vector<int64_t> rows{s.batch, s.heads, s.q_blocks};
  TORCH_CHECK_VALUE(counts.sizes() == at::IntArrayRef(rows), op, ": kv_num_blocks must have shape ",
                    at::IntArrayRef(rows), " (B, H, ceil(S_q / block_size)), got ", counts.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 4 && indices.sizes().slice(0, 3) == at::IntArrayRef(rows), op,
                    ": kv_indices must have shape ", at::IntArrayRef(rows), " + (max_blocks,), got ",
                    indices.sizes());
  if (!counts.device().is_cpu()) return;  // values are checked where they can be read cheaply
  const int64_t max_blocks = indices.size(3), n_rows = s.batch * s.heads * s.q_blocks;
  const int32_t* c = counts.const_data_ptr<int32_t>();
  const int32_t* idx = indices.const_data_ptr<int32_t>();
  std::vector<int64_t> seen(static_cast<size_t>(s.kv_blocks), -1);
  for (int64_t row = 0; row < n_rows; ++row) {
    TORCH_CHECK_VALUE(c[row] >= 0 && c[row] <= max_blocks, op, ": kv_num_blocks must lie in [0, ", max_blocks,
                      "] (kv_indices.size(-1)), got ", c[row], " at flat position ", row);
    for (int64_t j = 0; j < c[row]; ++j) {
      const int32_t block = idx[row * max_blocks + j];
      TORCH_CHECK_VALUE(block >= 0 && block < s.kv_blocks, op, ": the used kv_indices must lie in [0, ", s.kv_blocks,
                        ") for a key sequence of ", s.s_kv, " tokens, got ", block, " in row ", row, " slot ", j);
      // A repeated block would be counted twice by the kernel but once by the mask it stands for.
      TORCH_CHECK_VALUE(seen[block] != row, op, ": the used kv_indices of a row must be distinct, block ", block,
                        " repeats in row ", row);
      seen[block] = row;
    }
  }
}

}  // namespace

BlockSparseProblem block_sparse_attention_prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                                  int64_t block_size, double scale, bool bshd) {
  constexpr const char* op = "block_sparse_attention";
  const Shape s = check_qk(op, q, k, &v, block_size, scale, bshd);
  const at::Tensor counts = kv_num_blocks.contiguous(), indices = kv_indices.contiguous();
  check_block_mask(op, counts, indices, q, s);
  const at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous in q's layout
  return {strided(q, bshd), strided(k, bshd), strided(v, bshd), strided(out, bshd), counts, indices, s.batch,
          s.heads, s.head_dim, s.s_q, s.s_kv, block_size, s.q_blocks, s.kv_blocks, indices.size(3), scale};
}

BlockScoresProblem attention_block_scores_prepare(const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                                                  double scale, bool bshd) {
  const Shape s = check_qk("attention_block_scores", q, k, nullptr, block_size, scale, bshd);
  return {strided(q, bshd), strided(k, bshd),
          at::empty({s.batch, s.heads, s.q_blocks, s.kv_blocks}, q.options().dtype(at::kFloat)),
          s.batch, s.heads, s.head_dim, s.s_q, s.s_kv, block_size, s.q_blocks, s.kv_blocks, scale};
}

}  // namespace stepfuse
