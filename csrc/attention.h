// Block-sparse attention and block scoring (DESIGN.md, "sparse block attention").
//
// The sparsity is described as FlexAttention's block mask is: for every (batch, head, query
// block) kv_num_blocks[b, h, i] counts the key/value blocks it attends to and the first that
// many entries of kv_indices[b, h, i, :] list them.  Blocks are block_size tokens; the last
// block of either sequence may be partial; a query block with no key block gives zeros.
// Host glue (input checks, strided views) in csrc/attention.cpp; kernels in
// csrc/cpu/attention_kernel.cpp; references in python/stepfuse/ref/attention.py; the GPU
// path is Triton (python/stepfuse/attention/triton_kernel.py).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace stepfuse {

// One of q, k, v or the output, read through (batch, head, sequence) element strides
// whatever the layout; the head dim is contiguous.
struct AttentionOperand {
  at::Tensor tensor;
  int64_t batch_stride, head_stride, seq_stride;
};

// block_sparse_attention's operands, checked (csrc/attention.cpp).
struct BlockSparseProblem {
  AttentionOperand q, k, v, out;
  at::Tensor kv_num_blocks, kv_indices;  // int32, contiguous, values checked
  int64_t batch, heads, head_dim, s_q, s_kv, block_size, q_blocks, kv_blocks, max_blocks;
  double scale;
};

// attention_block_scores' operands, checked; out is float32 contiguous (B, H, Qb, Kb).
struct BlockScoresProblem {
  AttentionOperand q, k;
  at::Tensor out;
  int64_t batch, heads, head_dim, s_q, s_kv, block_size, q_blocks, kv_blocks;
  double scale;
};

BlockSparseProblem block_sparse_attention_prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                                  int64_t block_size, double scale, bool bshd);
BlockScoresProblem attention_block_scores_prepare(const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                                                  double scale, bool bshd);

at::Tensor block_sparse_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const at::Tensor& kv_num_blocks, const at::Tensor& kv_indices,
                                      int64_t block_size, double scale, bool bshd);
at::Tensor attention_block_scores_cpu(const at::Tensor& q, const at::Tensor& k, int64_t block_size, double scale,
                                      bool bshd);

// Shape-only block masks of one self-attention sequence: video tokens (natural (t, h, w) order
// for the frame bands, TileLayout order for the tiles) with prompt_tokens before them (or after,
// prompt_last) whose rows and columns stay dense, plus the first `sinks` blocks' worth of video
// keys.  Returns (kv_num_blocks (Qb,), kv_indices (Qb, widest row)), int32, on the CPU
// (csrc/attention_masks.cpp).
//
// frame_band_block_mask: a query token keeps a key token d frames away whose in-frame position
// lies closer than band[d] (radial attention's decaying window, Sparse VideoGen's spatial and
// temporal heads).
std::tuple<at::Tensor, at::Tensor> frame_band_block_mask(int64_t frames, int64_t frame_tokens, at::IntArrayRef band,
                                                         int64_t block_size, int64_t prompt_tokens, bool prompt_last,
                                                         int64_t sinks);
// sliding_tile_block_mask: query tile c keeps the key tiles of a window[a]-tile box around it
// along every axis, shifted inside the grid at the borders (Sliding Tile Attention).
std::tuple<at::Tensor, at::Tensor> sliding_tile_block_mask(at::IntArrayRef grid, at::IntArrayRef tile,
                                                           at::IntArrayRef window, int64_t block_size,
                                                           int64_t prompt_tokens, bool prompt_last, int64_t sinks);

}  // namespace stepfuse
