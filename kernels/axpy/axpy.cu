// axpy on CUDA: grid-stride loop, 256 threads per block, 4 elements per thread per iteration when
// both tensors are 16-byte aligned f32 (the gradient case), 8 elements (one 16-byte access per bf16
// side) when a bf16 tensor is involved and both are aligned to 8 elements, scalar otherwise.
#include "core/cuda_check.h"
#include "kernels/axpy/axpy.h"
#include "kernels/common/elem.h"

namespace helix {
namespace {

template <typename T>
__device__ __forceinline__ float load(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, bf16_t>) return p[i].to_float(); else return p[i];
}
template <typename T>
__device__ __forceinline__ void store(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, bf16_t>) p[i] = bf16_t::from_float(v); else p[i] = v;
}

template <typename X, typename Y>
__global__ void axpy_kernel(float alpha, const X* __restrict__ x, Y* __restrict__ y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store(y, i, __fadd_rn(load(y, i), __fmul_rn(alpha, load(x, i))));  // no fma: CPU rounding
}

__global__ void axpy_f32x4_kernel(float alpha, const float4* __restrict__ x, float4* __restrict__ y, int64_t n4) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    const float4 a = x[i];
    float4 b = y[i];
    b.x = __fadd_rn(b.x, __fmul_rn(alpha, a.x));
    b.y = __fadd_rn(b.y, __fmul_rn(alpha, a.y));
    b.z = __fadd_rn(b.z, __fmul_rn(alpha, a.z));
    b.w = __fadd_rn(b.w, __fmul_rn(alpha, a.w));
    y[i] = b;
  }
}

// Grid: grid(n / 8) blocks of 256 threads; thread i handles the 8-element groups i, i + stride, ...
// (Pack loads: one 16-byte access for bf16, two for f32), then the n % 8 tail elements scalar.
template <typename X, typename Y>
__global__ void axpy_x8_kernel(float alpha, const X* __restrict__ x, Y* __restrict__ y, int64_t n) {
  const int64_t n8 = n / 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t i = tid; i < n8; i += stride) {
    float a[8], b[8];
    elem::load_floats(x + i * 8, a);
    elem::load_floats(y + i * 8, b);
#pragma unroll
    for (int e = 0; e < 8; ++e) b[e] = __fadd_rn(b[e], __fmul_rn(alpha, a[e]));  // no fma
    elem::store_floats(y + i * 8, b);
  }
  for (int64_t i = n8 * 8 + tid; i < n; i += stride)
    store(y, i, __fadd_rn(load(y, i), __fmul_rn(alpha, load(x, i))));
}

unsigned grid(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 8192))); }

}  // namespace

void detail::axpy_cuda(float alpha, const Tensor& x, const Tensor& y, const Stream& stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const int64_t n = x.numel();
  const bool xf = x.dtype() == DType::kF32, yf = y.dtype() == DType::kF32;
  if (xf && yf && n % 4 == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
      reinterpret_cast<uintptr_t>(y.data_ptr()) % 16 == 0) {
    axpy_f32x4_kernel<<<grid(n / 4), 256, 0, st>>>(alpha, static_cast<const float4*>(x.data_ptr()),
                                                  static_cast<float4*>(y.data_ptr()), n / 4);
  } else if (!(xf && yf) && n >= 8 && reinterpret_cast<uintptr_t>(x.data_ptr()) % (xf ? 32 : 16) == 0 &&
             reinterpret_cast<uintptr_t>(y.data_ptr()) % (yf ? 32 : 16) == 0) {
    const unsigned g = grid(n / 8);
    if (xf)
      axpy_x8_kernel<<<g, 256, 0, st>>>(alpha, x.data<float>(), y.data<bf16_t>(), n);
    else if (yf)
      axpy_x8_kernel<<<g, 256, 0, st>>>(alpha, x.data<bf16_t>(), y.data<float>(), n);
    else
      axpy_x8_kernel<<<g, 256, 0, st>>>(alpha, x.data<bf16_t>(), y.data<bf16_t>(), n);
  } else if (xf && yf) {
    axpy_kernel<<<grid(n), 256, 0, st>>>(alpha, x.data<float>(), y.data<float>(), n);
  } else if (xf) {
    axpy_kernel<<<grid(n), 256, 0, st>>>(alpha, x.data<float>(), y.data<bf16_t>(), n);
  } else if (yf) {
    axpy_kernel<<<grid(n), 256, 0, st>>>(alpha, x.data<bf16_t>(), y.data<float>(), n);
  } else {
    axpy_kernel<<<grid(n), 256, 0, st>>>(alpha, x.data<bf16_t>(), y.data<bf16_t>(), n);
  }
  HELIX_LAUNCH_CHECK();
}

}  // namespace helix
