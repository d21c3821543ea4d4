// Counter-based normal noise: Philox4x32-10 (Salmon et al., SC 2011) + Box-Muller.
// Element i of a draw uses counter block (offset + i / 4), lane i % 4, so CPU and
// GPU produce the same stream for the same (seed, offset), independent of how the
// work is split.  Reference: python/stepfuse/ref/philox.py.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SF_HOST_DEVICE __host__ __device__
#else
#define SF_HOST_DEVICE
#endif

// fmaf is a slow library call on x86 hosts without FMA; the device has it natively.
#if defined(__CUDA_ARCH__)
#define SF_FMA(a, b, c) fmaf((a), (b), (c))
#else
#define SF_FMA(a, b, c) ((a) * (b) + (c))
#endif

namespace stepfuse {

// Functions here are `static inline`: each translation unit (the CPU kernel is built
// once per instruction set) keeps its own copy instead of sharing one through the linker.
struct Normal4 {
  float v[4];
};

SF_HOST_DEVICE static inline void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

SF_HOST_DEVICE static inline void philox4x32_10(uint64_t block, uint64_t seed, uint32_t (&out)[4]) {
  uint32_t c0 = static_cast<uint32_t>(block), c1 = static_cast<uint32_t>(block >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Four standard normals from one counter block.  24-bit uniforms: u1 in (0, 1]
// keeps the logarithm finite, u2 in [0, 1) is the angle.
SF_HOST_DEVICE static inline Normal4 philox_normal4(uint64_t block, uint64_t seed) {
  uint32_t w[4];
  philox4x32_10(block, seed, w);
  constexpr float kInv24 = 1.0f / 16777216.0f;
  constexpr float kTwoPi = 6.283185307179586f;
  Normal4 z;
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = (static_cast<float>(w[2 * pair] >> 8) + 1.0f) * kInv24;
    const float u2 = static_cast<float>(w[2 * pair + 1] >> 8) * kInv24;
    const float radius = sqrtf(-2.0f * logf(u1));
    float s, c;
#if defined(__CUDA_ARCH__)
    sincosf(kTwoPi * u2, &s, &c);
#else
    s = std::sin(kTwoPi * u2);
    c = std::cos(kTwoPi * u2);
#endif
    z.v[2 * pair] = radius * c;
    z.v[2 * pair + 1] = radius * s;
  }
  return z;
}

}  // namespace stepfuse
