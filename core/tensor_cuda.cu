// Fill and dtype conversion kernels for Tensor::fill / Tensor::to(DType). Rounding goes through the
// same convert.h functions as the CPU path, so CPU and GPU conversions agree bit for bit.
#include "core/convert.h"
#include "core/cuda_check.h"
#include "core/tensor_cuda.h"

namespace helix::detail {
namespace {

__device__ __forceinline__ double load_as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF64: return static_cast<const double*>(p)[i];
    case DType::kBF16: return static_cast<const bf16_t*>(p)[i].to_float();
    case DType::kE4M3: return static_cast<const e4m3_t*>(p)[i].to_float();
    case DType::kE5M2: return static_cast<const e5m2_t*>(p)[i].to_float();
    case DType::kI32: return static_cast<const int32_t*>(p)[i];
    case DType::kI64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::kU8: return static_cast<const uint8_t*>(p)[i];
  }
  return 0;
}

__device__ __forceinline__ void store_from_double(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::kF64: static_cast<double*>(p)[i] = v; break;
    case DType::kBF16: static_cast<bf16_t*>(p)[i] = bf16_t::from_float(static_cast<float>(v)); break;
    case DType::kE4M3: static_cast<e4m3_t*>(p)[i] = e4m3_t::from_float(static_cast<float>(v)); break;
    case DType::kE5M2: static_cast<e5m2_t*>(p)[i] = e5m2_t::from_float(static_cast<float>(v)); break;
    case DType::kI32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case DType::kI64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); break;
    case DType::kU8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
  }
}

// Grid-stride loops; grid = min(ceil(n/256), 65535*4) blocks of 256 threads.
__global__ void fill_kernel(void* dst, DType t, int64_t n, double v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_from_double(dst, t, i, v);
}

__global__ void convert_kernel(const void* src, DType st, void* dst, DType dt, int64_t n, bool via_float) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    double v = load_as_double(src, st, i);
    if (via_float) v = static_cast<float>(v);
    store_from_double(dst, dt, i, v);
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
