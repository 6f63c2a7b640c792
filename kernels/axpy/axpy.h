#pragma once
// axpy: y += alpha * x, elementwise over tensors of equal numel (f32 or bf16 each, mixed allowed;
// math in f32). The accumulate step of the autograd contract when a kernel can only overwrite (e.g.
// cuBLASLt's bias-gradient epilogue) and the residual-gradient pass-through.
#include "core/device.h"
#include "core/tensor.h"

namespace helix {

void axpy(float alpha, const Tensor& x, const Tensor& y, const Stream& stream);

namespace detail {
#if HELIX_WITH_CUDA
void axpy_cuda(float alpha, const Tensor& x, const Tensor& y, const Stream& stream);
#endif
}  // namespace detail

}  // namespace helix
