#pragma once
// GELU in the exact erf form ESM-2 uses, gelu(x) = x/2 * (1 + erf(x/sqrt(2))), forward and backward
// (dx (+)= dy * gelu'(x)). Elementwise over any shape; the forward can write FP8 (scale in, amax
// out) so that it feeds an FP8 GEMM directly. Design: CUDA is a grid-stride loop over 16-byte
// vectors plus a scalar tail; the math (gelu_math.h) is shared with the CPU: fp32, one rounding per
// output.
#include "core/device.h"
#include "core/tensor.h"

namespace helix {

struct GeluFwdParams {
  Tensor x;        // [...] f32 or bf16
  Tensor y;        // [...] x's shape; f32, bf16, e4m3 or e5m2
  Tensor y_scale;  // [1] f32; fp8 y only (required there): y = fp8(gelu(x) * scale)
  Tensor y_amax;   // [1] f32; optional: OVERWRITTEN with max |gelu(x)| before scaling (NaN wins)
};

struct GeluBwdParams {
  Tensor x;                   // [...] f32 or bf16: the forward's input
  Tensor dy;                  // [...] x's shape and dtype
  Tensor dx;                  // [...] x's shape and dtype
  bool accumulate_dx = true;  // true: dx += dy * gelu'(x) (the autograd contract); false: dx = ...
};

// Dispatch on the tensors' device; CUDA work is ordered on `stream`.
void gelu_fwd(const GeluFwdParams& p, const Stream& stream);
void gelu_bwd(const GeluBwdParams& p, const Stream& stream);

namespace detail {
void gelu_fwd_cpu(const GeluFwdParams& p);
void gelu_bwd_cpu(const GeluBwdParams& p);
#if HELIX_WITH_CUDA
void gelu_fwd_cuda(const GeluFwdParams& p, const Stream& stream);
void gelu_bwd_cuda(const GeluBwdParams& p, const Stream& stream);
#endif
}  // namespace detail

}  // namespace helix
