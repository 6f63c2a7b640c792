// Fill and dtype conversion kernels for Tensor::fill / Tensor::to(DType). Rounding goes through the
// same convert.h functions as the CPU path, so CPU and GPU conversions agree bit for bit.
#include "core/convert.h"
#include "core/cuda_check.h"
#include "core/element.h"
#include "core/tensor_cuda.h"

namespace helix::detail {
namespace {

// Grid-stride loops; grid = min(ceil(n/256), 65535*4) blocks of 256 threads.
__global__ void fill_kernel(void* dst, DType t, int64_t n, double v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_element(dst, t, i, v);
}

__global__ void convert_kernel(const void* src, DType st, void* dst, DType dt, int64_t n, bool via_float) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    double v = load_element(src, st, i);
    if (via_float) v = static_cast<float>(v);
    store_element(dst, dt, i, v);
  }
}

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + 255) / 256;
  return static_cast<unsigned>(blocks < 262140 ? (blocks > 0 ? blocks : 1) : 262140);
}

}  // namespace

void cuda_fill(void* dst, DType dtype, int64_t n, double value, void* stream) {
  if (n == 0) return;
  fill_kernel<<<grid_for(n), 256, 0, static_cast<cudaStream_t>(stream)>>>(dst, dtype, n, value);
  HELIX_LAUNCH_CHECK();
}

void cuda_convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n, void* stream) {
  if (n == 0) return;
  const bool via_float = dtype_is_float(src_dtype) && src_dtype != DType::kF64 && dst_dtype != DType::kF64;
  convert_kernel<<<grid_for(n), 256, 0, static_cast<cudaStream_t>(stream)>>>(src, src_dtype, dst, dst_dtype, n, via_float);
  HELIX_LAUNCH_CHECK();
}

}  // namespace helix::detail
