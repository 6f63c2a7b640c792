#include "core/cuda_check.h"
#include "core/tensor.h"
#include "parallel/accumulate.h"

namespace helix::detail {
namespace {

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const bf16_t* p, int64_t i) { return p[i].to_float(); }
__device__ __forceinline__ double load(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ void add_to(float* p, int64_t i, float v) { p[i] += v; }
__device__ __forceinline__ void add_to(bf16_t* p, int64_t i, float v) {
  p[i] = bf16_t::from_float(p[i].to_float() + v);
}
__device__ __forceinline__ void add_to(double* p, int64_t i, double v) { p[i] += v; }

// Grid-stride loop: grid = min(ceil(n / 256), 4096) blocks of 256 threads, one element per step.
template <typename D, typename S>
__global__ void accumulate_kernel(D* dst, const S* src, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    add_to(dst, i, load(src, i));
}

template <typename D, typename S>
void launch(const Tensor& dst, const Tensor& src, const Stream& stream) {
  const int64_t n = dst.numel();
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 4096);
  accumulate_kernel<D, S>
      <<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream.handle())>>>(
          static_cast<D*>(dst.data_ptr()), static_cast<const S*>(src.data_ptr()), n);
  HELIX_LAUNCH_CHECK();
}

}  // namespace

// Validated by accumulate(): same numel, device, contiguous; dtypes f32/bf16 mix or f64.
void accumulate_cuda(const Tensor& dst, const Tensor& src, const Stream& stream) {
  const DType d = dst.dtype(), s = src.dtype();
  if (d == DType::kF64) return launch<double, double>(dst, src, stream);
  if (d == DType::kF32)
    return s == DType::kF32 ? launch<float, float>(dst, src, stream)
                            : launch<float, bf16_t>(dst, src, stream);
  return s == DType::kF32 ? launch<bf16_t, float>(dst, src, stream)
                          : launch<bf16_t, bf16_t>(dst, src, stream);
}

}  // namespace helix::detail
