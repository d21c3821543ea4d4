// Header-only math of the fused solver step, shared by the CPU and CUDA kernels.
//
// A step program (python/stepfuse/solvers/program.py) is a short list of rows
//   target_r = sum_c coeffs[r][c] * operand[c]
// over the operands (x, model_output, history[0..R-1], noise).  Rows run in order;
// a row whose target is a history slot overwrites it, the last row is the next
// sample.  All coefficients come from the host in float64 and are rounded to fp32
// once; accumulation is fp32.
#pragma once

#include <cstdint>

#include "stepfuse/philox.h"

namespace stepfuse {

constexpr int kMaxSlots = 8;
constexpr int kMaxRows = 4;
constexpr int kMaxWidth = kMaxSlots + 3;

// Passed to kernels by value (well under the 4 KiB kernel-parameter limit).
struct StepProgram {
  int num_slots;
  int num_rows;
  int targets[kMaxRows];          // slot index, or -1 for the next sample (last row)
  float coeffs[kMaxRows * kMaxWidth];  // padded layout, row stride kMaxWidth
  uint32_t load_mask;             // slots whose stored value some row reads before overwriting
  uint32_t store_mask;            // slots some row writes
  uint32_t reread_rows;           // rows whose written slot a later row reads
  bool reads_model_output;
  bool reads_sample;
  bool uses_noise;
  uint64_t seed;
  uint64_t offset;
};

// Padded column layout used on the device side: x, model output, kMaxSlots slots,
// noise.  The host remaps the compact (3 + R)-wide rows into it, so every column
// index in the kernels is a compile-time constant.
constexpr int kSampleColumn = 0;
constexpr int kModelOutputColumn = 1;
constexpr int kNoiseColumn = kMaxWidth - 1;
SF_HOST_DEVICE constexpr int slot_column(int slot) { return 2 + slot; }

// Evaluates all rows for one element.  `v` holds the operands a kernel built for at
// most kSlots slots keeps: x, model output, kSlots slot values (as loaded where
// load_mask says so), noise.  Slot entries are updated as rows write them, passing
// through `round_slot` so later rows see the stored value.  Fully unrolled over
// compile-time bounds: with run-time trip counts a CUDA register array would be
// demoted to local memory.
template <int kSlots, typename RoundSlot>
SF_HOST_DEVICE inline float evaluate_rows(const StepProgram& p, float (&v)[kSlots + 3], RoundSlot round_slot) {
  float result = 0.f;
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
    if (r < p.num_rows) {
      const float* c = p.coeffs + r * kMaxWidth;
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < kSlots + 2; ++k) acc = SF_FMA(c[k], v[k], acc);
      acc = SF_FMA(c[kNoiseColumn], v[kSlots + 2], acc);
      const int target = p.targets[r];
      if (target < 0) {
        result = acc;
      } else {
#pragma unroll
        for (int s = 0; s < kSlots; ++s)
          if (s == target) v[slot_column(s)] = round_slot(acc);
      }
    }
  }
  return result;
}

}  // namespace stepfuse
