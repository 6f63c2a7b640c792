#pragma once
// dst += src, elementwise: the one arithmetic op the communication pairs need (their backward
// nodes accumulate into the input gradients). Any mix of f32 and bf16 (computed in fp32, rounded
// once), or f64 with f64; CPU loop or CUDA kernel by device. If kernels/ grows a general elementwise
// add, this moves there.
#include "core/tensor.h"

namespace helix {

// dst and src: same numel (shapes may differ, e.g. a flat bucket slot), same device, contiguous.
void accumulate(const Tensor& dst, const Tensor& src, const Stream& stream);

namespace detail {
#if HELIX_WITH_CUDA
void accumulate_cuda(const Tensor& dst, const Tensor& src, const Stream& stream);
#endif
}  // namespace detail

}  // namespace helix
