#pragma once
// Internal: the few CUDA kernels the Tensor itself needs (fill, dtype conversion). Performance
// casts with amax live in kernels/cast. In a CPU-only build these throw.
#include <cstdint>

#include "core/dtype.h"

namespace helix::detail {

void cuda_fill(void* dst, DType dtype, int64_t n, double value, void* stream);
void cuda_convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, void* stream);

}  // namespace helix::detail
