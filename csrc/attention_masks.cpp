// Shape-only block masks for video tokens (csrc/attention.h): radial / spatial / temporal
// bands over frames, and Sliding Tile Attention windows.  Host work on a few hundred
// blocks; the vectorised PyTorch versions they replace are the references in
// python/stepfuse/ref/attention.py.
//
// Both builders mark, for every query block, the key blocks holding a token its tokens may
// attend, as intervals of key positions: a query block's video tokens split into pieces (the
// part inside one frame, or one tile), and every piece's allowed key set is a union of
// contiguous position ranges (per key frame, the in-frame band; per key tile, the tile).  The
// ranges land in a difference array over key blocks, so a row costs O(pieces x ranges + blocks)
// instead of a scan over block pairs.
#include "attention.h"

#include <algorithm>
#include <vector>

namespace stepfuse {
namespace {

// One self-attention sequence of video tokens plus prompt tokens before or after them, cut into
// blocks of block_size tokens.
struct Sequence {
  int64_t video, prompt, total, block_size, blocks, video_start;

  Sequence(const char* op, int64_t video_tokens, int64_t prompt_tokens, bool prompt_last, int64_t block_size_)
      : video(video_tokens), prompt(prompt_tokens), total(video_tokens + prompt_tokens), block_size(block_size_) {
    TORCH_CHECK_VALUE(video >= 1, op, ": the grid must hold at least one token, got ", video);
    TORCH_CHECK_VALUE(prompt >= 0, op, ": prompt_tokens must be >= 0, got ", prompt);
    TORCH_CHECK_VALUE(block_size >= 1, op, ": block_size must be >= 1, got ", block_size);
    blocks = (total + block_size - 1) / block_size;
    video_start = prompt_last ? 0 : prompt;
  }

  // The first and last video position (0-based within the video) of block i; first > last when none.
  std::pair<int64_t, int64_t> video_span(int64_t i) const {
    const int64_t start = i * block_size, end = std::min(start + block_size, total);
    return {std::max(start, video_start) - video_start, std::min(end, video_start + video) - 1 - video_start};
  }
  bool has_prompt(int64_t i) const {
    auto [g0, g1] = video_span(i);
    const int64_t tokens = std::min((i + 1) * block_size, total) - i * block_size;
    return tokens > std::max<int64_t>(g1 - g0 + 1, 0);
  }
  // Key blocks covering video positions [p0, p1].
  std::pair<int64_t, int64_t> blocks_of(int64_t p0, int64_t p1) const {
    return {(video_start + p0) / block_size, (video_start + p1) / block_size};
  }
};

// Row by row: `mark(i, add)` calls add(first, last) for the key-block ranges video block i
// attends; prompt rows and columns and the first `sinks` blocks' worth of video keys are kept
// whatever the pattern.  Returns (kv_num_blocks (Qb,), kv_indices (Qb, widest row)), int32.
template <typename Mark>
std::tuple<at::Tensor, at::Tensor> collect(const Sequence& seq, int64_t sinks, Mark mark) {
  const int64_t n = seq.blocks;
  std::vector<uint8_t> forced_col(n);
  for (int64_t j = 0; j < n; ++j) {
    auto [g0, g1] = seq.video_span(j);
    forced_col[j] = seq.has_prompt(j) || (g0 <= g1 && g0 < sinks * seq.block_size);
  }
  std::vector<std::vector<int32_t>> rows(n);
  std::vector<int32_t> diff(n + 1);
  size_t width = 1;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int32_t>& row = rows[i];
    if (seq.has_prompt(i)) {
      row.resize(n);
      for (int64_t j = 0; j < n; ++j) row[j] = static_cast<int32_t>(j);
    } else {
      std::fill(diff.begin(), diff.end(), 0);
      mark(i, [&](int64_t first, int64_t last) {
        if (first > last) return;
        diff[first] += 1;
        diff[last + 1] -= 1;
      });
      int32_t covered = 0;
      for (int64_t j = 0; j < n; ++j) {
        covered += diff[j];
        if (covered > 0 || forced_col[j]) row.push_back(static_cast<int32_t>(j));
      }
    }
    width = std::max(width, row.size());
  }
  at::Tensor num = at::empty({n}, at::kInt);
  at::Tensor idx = at::zeros({n, static_cast<int64_t>(width)}, at::kInt);
  int32_t* num_p = num.data_ptr<int32_t>();
  int32_t* idx_p = idx.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    num_p[i] = static_cast<int32_t>(rows[i].size());
    std::copy(rows[i].begin(), rows[i].end(), idx_p + i * static_cast<int64_t>(width));
  }
  return {num, idx};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> frame_band_block_mask(int64_t frames, int64_t frame_tokens,
                                                         at::IntArrayRef band, int64_t block_size,
                                                         int64_t prompt_tokens, bool prompt_last, int64_t sinks) {
  const char* op = "frame_band_block_mask";
  TORCH_CHECK_VALUE(frames >= 1 && frame_tokens >= 1, op, ": frames and frame_tokens must be >= 1, got ", frames,
                    " and ", frame_tokens);
  TORCH_CHECK_VALUE(static_cast<int64_t>(band.size()) == frames, op, ": band must hold one width per frame distance (",
                    frames, "), got ", band.size());
  TORCH_CHECK_VALUE(sinks >= 0, op, ": sinks must be >= 0, got ", sinks);
  const Sequence seq(op, frames * frame_tokens, prompt_tokens, prompt_last, block_size);
  return collect(seq, sinks, [&](int64_t i, auto add) {
    auto [g0, g1] = seq.video_span(i);
    if (g0 > g1) return;
    // Each frame the block touches is a piece [p0, p1] of in-frame positions; a key token at
    // frame distance d is kept when its in-frame position lies within band[d] - 1 of the piece.
    for (int64_t f = g0 / frame_tokens; f <= g1 / frame_tokens; ++f) {
      const int64_t p0 = std::max(g0 - f * frame_tokens, int64_t{0});
      const int64_t p1 = std::min(g1 - f * frame_tokens, frame_tokens - 1);
      for (int64_t key_frame = 0; key_frame < frames; ++key_frame) {
        const int64_t reach = band[std::abs(key_frame - f)] - 1;
        if (reach < 0) continue;
        const int64_t lo = std::max(p0 - reach, int64_t{0}), hi = std::min(p1 + reach, frame_tokens - 1);
        auto [first, last] = seq.blocks_of(key_frame * frame_tokens + lo, key_frame * frame_tokens + hi);
        add(first, last);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sliding_tile_block_mask(at::IntArrayRef grid, at::IntArrayRef tile,
                                                           at::IntArrayRef window, int64_t block_size,
                                                           int64_t prompt_tokens, bool prompt_last, int64_t sinks) {
  const char* op = "sliding_tile_block_mask";
  TORCH_CHECK_VALUE(grid.size() == 3 && tile.size() == 3 && window.size() == 3, op,
                    ": grid, tile and window must be (t, h, w) triples");
  int64_t tiles[3];
  for (int a = 0; a < 3; ++a) {
    TORCH_CHECK_VALUE(grid[a] >= 1 && tile[a] >= 1 && window[a] >= 1, op,
                      ": grid, tile and window entries must be >= 1, got ", grid, ", ", tile, " and ", window);
    tiles[a] = (grid[a] + tile[a] - 1) / tile[a];
  }
  TORCH_CHECK_VALUE(sinks >= 0, op, ": sinks must be >= 0, got ", sinks);
  const Sequence seq(op, grid[0] * grid[1] * grid[2], prompt_tokens, prompt_last, block_size);
  // Tiles in (t, h, w) order, each contiguous in the token order (stepfuse.attention.TileLayout);
  // edge tiles are cut by the grid.  start[id] is the first position of tile id.
  const int64_t n_tiles = tiles[0] * tiles[1] * tiles[2];
  std::vector<int64_t> start(n_tiles + 1, 0);
  for (int64_t id = 0; id < n_tiles; ++id) {
    const int64_t c[3] = {id / (tiles[1] * tiles[2]), id / tiles[2] % tiles[1], id % tiles[2]};
    int64_t volume = 1;
    for (int a = 0; a < 3; ++a) volume *= std::min(tile[a], grid[a] - c[a] * tile[a]);
    start[id + 1] = start[id] + volume;
  }
  auto tile_at = [&](int64_t position) {  // the tile holding a video position
    return static_cast<int64_t>(std::upper_bound(start.begin(), start.end(), position) - start.begin()) - 1;
  };
  // The window of tile coordinate c along an axis of n tiles: w tiles starting w // 2 before c,
  // shifted back inside the grid at the borders (STA, Sec. 3).
  auto window_start = [](int64_t c, int64_t n, int64_t w) {
    return std::clamp(c - w / 2, int64_t{0}, std::max(n - w, int64_t{0}));
  };
  return collect(seq, sinks, [&](int64_t i, auto add) {
    auto [g0, g1] = seq.video_span(i);
    if (g0 > g1) return;
    for (int64_t id = tile_at(g0), last_tile = tile_at(g1); id <= last_tile; ++id) {
      const int64_t c[3] = {id / (tiles[1] * tiles[2]), id / tiles[2] % tiles[1], id % tiles[2]};
      int64_t lo[3], hi[3];
      for (int a = 0; a < 3; ++a) {
        lo[a] = window_start(c[a], tiles[a], window[a]);
        hi[a] = std::min(lo[a] + window[a], tiles[a]) - 1;
      }
      // Along w the window's tiles are consecutive ids, so each (t, h) row of it is one position range.
      for (int64_t t = lo[0]; t <= hi[0]; ++t)
        for (int64_t h = lo[1]; h <= hi[1]; ++h) {
          const int64_t row = (t * tiles[1] + h) * tiles[2];
          auto [first, last] = seq.blocks_of(start[row + lo[2]], start[row + hi[2] + 1] - 1);
          add(first, last);
        }
    }
  });
}

}  // namespace stepfuse
