#pragma once
// Counter-based RNG: Philox4x32-10 (Salmon et al., SC'11). A (key, counter) pair maps to four 32-bit
// words with no state, so the same seed and offset give the same numbers on the CPU and the GPU and
// any element can be drawn independently (MLM masking, weight init, dropout-free but reproducible).
// Addressing used throughout helix: key = seed, counter = {offset lo, offset hi, subsequence lo, hi},
// where element i of a stream takes word i % 4 of the block at offset i / 4.
#include <cstdint>

#include "core/convert.h"  // HELIX_HD

namespace helix {

struct U32x4 {
  uint32_t v[4];
};

HELIX_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

HELIX_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, ctr.v[0], hi0, lo0);
    philox_mulhilo(kM1, ctr.v[2], hi1, lo1);
    ctr = U32x4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    k0 += kW0;
    k1 += kW1;
  }
  return ctr;
}

// Block `offset` of stream (seed, subsequence).
HELIX_HD U32x4 philox_block(uint64_t seed, uint64_t subsequence, uint64_t offset) {
  const U32x4 ctr{{static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                   static_cast<uint32_t>(subsequence), static_cast<uint32_t>(subsequence >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Element i of stream (seed, subsequence).
HELIX_HD uint32_t philox_u32(uint64_t seed, uint64_t subsequence, uint64_t i) {
  return philox_block(seed, subsequence, i >> 2).v[i & 3];
}

// Uniform in [0, 1) with 24 random bits (exactly representable in float).
HELIX_HD float u32_to_uniform(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }

}  // namespace helix
