#pragma once
// The GELU formulas shared by the CPU reference and the CUDA kernels (fp32, erf form). The op order
// follows Hugging Face's ESM `gelu`, x * 0.5 * (1 + erf(x / sqrt(2))), evaluated in fp32, except
// that x / sqrt(2) is x * (1 / sqrt(2)): an IEEE division is a multi-instruction sequence on the
// GPU, where these kernels are bound by arithmetic, and the two differ by at most one ulp of erf's
// argument.
#include <cmath>

#include "core/convert.h"  // HELIX_HD

namespace helix::gelu_math {

inline constexpr float kInvSqrt2 = 0.70710678118654752440f;    // 1 / sqrt(2)
inline constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)

HELIX_HD float value(float x) { return x * 0.5f * (1.f + erff(x * kInvSqrt2)); }

// d gelu / dx = Phi(x) + x * phi(x), with Phi the normal CDF and phi its density.
HELIX_HD float grad(float x) {
  const float cdf = 0.5f * (1.f + erff(x * kInvSqrt2));
  const float pdf = expf(-0.5f * x * x) * kInvSqrt2Pi;
  return cdf + x * pdf;
}

}  // namespace helix::gelu_math
