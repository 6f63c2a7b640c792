#pragma once
// The per-element arithmetic of the rotary embedding, shared by rotary (CPU and CUDA) and the
// rotary fused into qkv_split / qkv_join_grad, so that their bits cannot drift: the token's
// position, cos/sin of the fp32 angle position * inv_freq (in double, then rounded), and the
// rotation of one (i, i + D/2) pair with one rounding to the storage type. On the device every
// product and sum is an explicit _rn intrinsic (nothing fused into an FMA).
#include <cmath>
#include <cstdint>

#include "core/convert.h"  // HELIX_HD
#include "kernels/common/elem.h"
#include "kernels/common/thd.h"

namespace helix::rotary {

// Position of token t: positions[t] when given, else t minus the start of its cu_seqlens
// [num_seqs + 1] sequence (tokens at or past cu[num_seqs], padding, count from cu[num_seqs]).
HELIX_HD int64_t position_of(const int32_t* positions, const int32_t* cu_seqlens, int64_t num_seqs,
                             int64_t t) {
  return positions ? positions[t] : t - cu_seqlens[thd::sequence_of(cu_seqlens, num_seqs, t)];
}

// cos and sin_sign * sin of the fp32 angle fp32(pos) * inv_freq (HF's fp32 outer product),
// evaluated in double and rounded to float. sin_sign = +1 rotates, -1 rotates back.
HELIX_HD void cos_sin(int64_t pos, float inv_freq, float sin_sign, float* c, float* s) {
#if defined(__CUDA_ARCH__)
  const float angle = __fmul_rn(static_cast<float>(pos), inv_freq);
  double sd, cd;
  sincos(static_cast<double>(angle), &sd, &cd);
#else
  const float angle = static_cast<float>(pos) * inv_freq;
  const double cd = std::cos(static_cast<double>(angle)), sd = std::sin(static_cast<double>(angle));
#endif
  *c = static_cast<float>(cd);
  *s = sin_sign * static_cast<float>(sd);
}

// (x1, x2) <- (x1 c - x2 s, x2 c + x1 s) in fp32, one rounding to T.
template <typename T>
HELIX_HD void rotate_pair(T& x1, T& x2, float c, float s) {
  const float u1 = elem::to_float(x1), u2 = elem::to_float(x2);
#if defined(__CUDA_ARCH__)
  x1 = elem::from_float<T>(__fsub_rn(__fmul_rn(u1, c), __fmul_rn(u2, s)));
  x2 = elem::from_float<T>(__fadd_rn(__fmul_rn(u2, c), __fmul_rn(u1, s)));
#else
  x1 = elem::from_float<T>(u1 * c - u2 * s);
  x2 = elem::from_float<T>(u2 * c + u1 * s);
#endif
}

}  // namespace helix::rotary
