#pragma once
// LayerNorm over the last dimension of packed activations [T, C], with an optional fused residual
// add (s = x + r is written as the new residual stream, then y = LN(s)), bf16/f32 or FP8 output
// (scale in, amax out) optionally with its transpose (the two FP8 GEMM operands from one read of
// x), and a deterministic backward. Design: CUDA keeps each row in registers
// (16-byte loads, one warp or a few warps per row); dgamma/dbeta are reduced without float atomics,
// as per-block partial rows plus a fixed-order second pass, so two backward runs are bitwise equal
// on any GPU.
//
// Weights: gamma and beta are f32 or bf16 (both the same), read as float. helix passes the bf16
// model copy in mixed-precision training and the f32 master in f32 runs; either works, nothing is
// cast.
#include "core/device.h"
#include "core/tensor.h"

namespace helix {

struct LayerNormFwdParams {
  Tensor x;             // [T, C] f32 or bf16
  Tensor residual;      // [T, C] x's dtype; optional: when defined, s = x + residual is normalised
  Tensor residual_out;  // [T, C] x's dtype; required with residual: receives s rounded to x's
                        // dtype (LN uses the rounded s, so backward can take residual_out as x)
  Tensor gamma;         // [C] f32 or bf16
  Tensor beta;          // [C] gamma's dtype
  float eps = 1e-5f;
  Tensor y;        // [T, C] f32, bf16, e4m3 or e5m2
  Tensor y_scale;  // [1] f32; fp8 y only (required there): y = fp8(LN(s) * scale)
  Tensor y_amax;   // [1] f32; optional: OVERWRITTEN with max |LN(s)| before scaling; NaN wins
                   // (any NaN makes amax NaN, so the scaling manager keeps its old scale)
  bool accumulate_amax = false;  // true: y_amax = max(y_amax, max |LN(s)|), as the fp8 casts do
  Tensor y_t;      // [C, T] y's fp8 dtype; optional, fp8 y only: the transpose of y's codes (the
                   // weight-gradient operand of an FP8 GEMM), written from the same pass
  Tensor mean;     // [T] f32; optional: saved for backward
  Tensor rstd;     // [T] f32; optional: 1 / sqrt(var + eps), saved for backward
};

struct LayerNormBwdParams {
  Tensor x;      // [T, C] f32 or bf16: what was normalised (residual_out with a fused add)
  Tensor gamma;  // [C] f32 or bf16
  Tensor mean;   // [T] f32 from the forward
  Tensor rstd;   // [T] f32 from the forward
  Tensor dy;     // [T, C] x's dtype
  Tensor dx;     // [T, C] x's dtype; optional (skipped when undefined)
  bool accumulate_dx = true;  // true: dx += grad (the autograd contract); false: dx = grad
  Tensor dgamma;              // [C] f32; optional; accumulated: dgamma += sum_t dy * xhat
  Tensor dbeta;               // [C] f32; optional; accumulated: dbeta += sum_t dy
};

// Dispatch on the tensors' device (all must be on one device; CUDA work is ordered on `stream`).
// CUDA supports C <= 8192 (ESM-2 15B: 5120, the 98B configuration: 6144); the CPU any C.
void layernorm_fwd(const LayerNormFwdParams& p, const Stream& stream);
void layernorm_bwd(const LayerNormBwdParams& p, const Stream& stream);

namespace detail {
// Backends behind the dispatchers; they assume parameters validated by the dispatcher.
void layernorm_fwd_cpu(const LayerNormFwdParams& p);
void layernorm_bwd_cpu(const LayerNormBwdParams& p);
#if HELIX_WITH_CUDA
void layernorm_fwd_cuda(const LayerNormFwdParams& p, const Stream& stream);
void layernorm_bwd_cuda(const LayerNormBwdParams& p, const Stream& stream);
#endif
}  // namespace detail

}  // namespace helix
