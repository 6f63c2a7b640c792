#pragma once
// Internal: the per-element random value shared by the CPU and CUDA random fills.
#include <cmath>

#include "core/philox.h"

namespace helix::detail {

HELIX_HD float random_value(uint64_t seed, uint64_t subsequence, uint64_t i, float a, float b, bool normal) {
  if (!normal) return a + (b - a) * u32_to_uniform(philox_u32(seed, subsequence, i));
  const U32x4 blk = philox_block(seed, subsequence, i >> 1);
  // u1 in (0, 1] so the log is finite.
  const float u1 = (static_cast<float>(blk.v[0] >> 8) + 1.0f) * (1.0f / 16777216.0f);
  const float u2 = u32_to_uniform(blk.v[1]);
  const float r = sqrtf(-2.0f * logf(u1));
  const float th = 6.2831853071795864f * u2;
  return a + b * ((i & 1) ? r * sinf(th) : r * cosf(th));
}

}  // namespace helix::detail
