#pragma once
// Casts for FP8 training: f32/bf16 -> fp8 with a per-tensor scale and amax, the fp8 cast-transpose
// that feeds cuBLASLt's TN-only fp8 GEMMs (out [M,N] and out_t [N,M] from one read of the input),
// and bf16 <-> f32. Rounding is convert.h's (hardware cvt on the GPU, its bit-exact twin on the
// CPU), so CPU and CUDA outputs agree bit for bit. CUDA kernels are memory-bound: 16-byte vector
// loads, the transpose staged through shared memory tiles.
//
// amax ACCUMULATES: amax = max(amax, max |in|), an atomic max on the GPU. The caller zeroes the
// buffer once per step (the FP8 scaling manager does), so several casts (micro-batches, shards)
// feed one amax. The order is that of the float's bit pattern with the sign cleared: NaN beats
// every number (a NaN in the input shows up as a NaN amax), and amax must start non-negative.
// (The GEMM's c_amax is different: cuBLASLt overwrites it.)
//
// The cast-transpose also carries the FP8 MLP's elementwise neighbours, so that they cost no pass
// of their own: a GELU (forward: the value cast is gelu(in); backward: in * gelu'(pre)), rounded
// to in's dtype first exactly as gelu_fwd / gelu_bwd would store it, and the bias gradient
// (column sums of the value cast, in f32, in a fixed order: per-tile partial sums, then one
// reduction kernel, so dbias is bitwise reproducible).
#include <cstdint>

#include "core/device.h"
#include "core/tensor.h"

namespace helix {

struct CastFp8Params {
  Tensor in;     // [...] f32 or bf16
  Tensor out;    // [...] same shape, e4m3 or e5m2: out = fp8(in * scale), satfinite
  Tensor scale;  // [1] f32
  Tensor amax;   // [1] f32, optional: max(amax, max |in|), accumulated
};
void cast_fp8(const CastFp8Params& p, const Stream& stream);

// What cast_transpose_fp8 casts: v = in (kNone), v = gelu(in) (kGelu), v = in * gelu'(pre)
// (kGeluGrad), the last two rounded to in's dtype before the scale (gelu_math.h's formulas).
enum class CastActivation : uint8_t { kNone, kGelu, kGeluGrad };

struct CastTransposeFp8Params {
  Tensor in;     // [M, N] f32 or bf16
  Tensor out;    // [M, N] e4m3 or e5m2: fp8(v * scale)
  Tensor out_t;  // [N, M] same dtype as out: its transpose; optional (a forward that no backward
                 // follows, e.g. the first pass of a recomputed layer, needs no weight-gradient operand)
  Tensor scale;  // [1] f32
  Tensor amax;   // [1] f32, optional: max(amax, max |v|), accumulated
  CastActivation act = CastActivation::kNone;
  Tensor pre;    // [M, N] in's dtype: the GELU's input; kGeluGrad only (in is then dL/dgelu)
  Tensor dbias;  // [N] f32, optional: dbias += sum over rows of v (f32, fixed order)
};
void cast_transpose_fp8(const CastTransposeFp8Params& p, const Stream& stream);

struct CastParams {
  Tensor in;   // [...] f32 or bf16
  Tensor out;  // [...] same shape, the other one of bf16 / f32 (bf16 rounds to nearest even)
};
void cast(const CastParams& p, const Stream& stream);

namespace detail {
void cast_fp8_cpu(const CastFp8Params& p);
void cast_transpose_fp8_cpu(const CastTransposeFp8Params& p);
void cast_cpu(const CastParams& p);
void cast_fp8_cuda(const CastFp8Params& p, const Stream& stream);
void cast_transpose_fp8_cuda(const CastTransposeFp8Params& p, const Stream& stream);
void cast_cuda(const CastParams& p, const Stream& stream);
}  // namespace detail

}  // namespace helix
