#pragma once
// FP8 delayed scaling, the per-step update of every operand's amax history and scale in one launch
// (TransformerEngine's recipe/delayed_scaling), plus the amax canonicalisation that runs before the
// amax all-reduce. All operands live in one flat f32 buffer owned by Fp8ScalingManager, so the whole
// model costs one collective and two kernels per step. CPU reference and CUDA agree bit for bit
// (IEEE division, exact power-of-two margin, no fast-math).
//
// Update, for every operand i (n of them), with amax[i] the step's (reduced) amax:
//   history[j][i] = history[j-1][i] for j = len-1 .. 1;  history[0][i] = amax[i]   (roll)
//   a = max_j history[j][i] (kMax; NaN wins, then +inf) or history[0][i] (kMostRecent)
//   if a > 0 and a finite:  s = ldexp(fp8_max[i] / a, -margin), clamped to FLT_MAX if it overflows
//   else                    s = the previous scale (amax 0, inf or NaN keep the scale)
//   scale[i] = s; scale_inv[i] = 1 / s; amax[i] = 0 (the next step accumulates into it)
// Histories start at 0, so the update after the first step calibrates from that step's amax alone.
#include <cstdint>

#include "core/device.h"
#include "core/tensor.h"

namespace helix {

enum class Fp8AmaxAlgo : uint8_t { kMax, kMostRecent };

struct Fp8ScalingUpdateParams {
  Tensor amax;       // [n] f32: the step's amaxes (after the all-reduce); zeroed by the update
  Tensor history;    // [len, n] f32: row 0 the most recent step
  Tensor scale;      // [n] f32: in the previous scales, out the new ones
  Tensor scale_inv;  // [n] f32: out 1 / scale
  Tensor fp8_max;    // [n] f32: largest finite value of each operand's format (448 or 57344)
  Fp8AmaxAlgo algo = Fp8AmaxAlgo::kMax;
  int margin = 0;  // scale divided by 2^margin
};
void fp8_scaling_update(const Fp8ScalingUpdateParams& p, const Stream& stream);

// Before the amax all-reduce(MAX): NaN -> +inf and -0/negatives -> |x| in place, so that MAX is
// well defined and order-independent on every backend (MPI and NCCL treat NaN differently), and the
// reduced buffer is bitwise the same on every rank. The update treats inf and NaN alike.
void fp8_amax_canonicalize(const Tensor& amax, const Stream& stream);  // amax [n] f32

namespace detail {
void fp8_scaling_update_cpu(const Fp8ScalingUpdateParams& p);
void fp8_amax_canonicalize_cpu(const Tensor& amax);
void fp8_scaling_update_cuda(const Fp8ScalingUpdateParams& p, const Stream& stream);
void fp8_amax_canonicalize_cuda(const Tensor& amax, const Stream& stream);
// The scale rule above for one operand (shared by both devices' reasoning and by the tests).
float fp8_scale_from_amax(float amax, float fp8_max, int margin, float previous);
}  // namespace detail

}  // namespace helix
