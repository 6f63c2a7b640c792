#pragma once
// The GELU formulas shared by the CPU reference and the CUDA kernels (fp32, erf form). The op order
// follows Hugging Face's ESM `gelu`: x * 0.5 * (1 + erf(x / sqrt(2))), evaluated in fp32.
#include <cmath>

#include "core/convert.h"  // HELIX_HD

namespace helix::gelu_math {

inline constexpr float kSqrt2 = 1.41421356237309504880f;
inline constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

HELIX_HD float value(float x) { return x * 0.5f * (1.f + erff(x / kSqrt2)); }

// d gelu / dx = Phi(x) + x * phi(x), with Phi the normal CDF and phi its density.
HELIX_HD float grad(float x) {
  const float cdf = 0.5f * (1.f + erff(x / kSqrt2));
  const float pdf = expf(-0.5f * x * x) * kInvSqrt2Pi;
  return cdf + x * pdf;
}

}  // namespace helix::gelu_math
