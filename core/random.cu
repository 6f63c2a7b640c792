// CUDA random fills: grid-stride loop, 256 threads per block; each element calls the same
// random_value() as the CPU path.
#include "core/cuda_check.h"
#include "core/random.h"
#include "core/random_math.h"

namespace helix {
namespace {

template <typename T>
__global__ void fill_random_kernel(T* out, int64_t n, uint64_t seed, uint64_t sub, float a, float b, bool normal) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = detail::random_value(seed, sub, static_cast<uint64_t>(i), a, b, normal);
    if constexpr (std::is_same_v<T, bf16_t>) out[i] = bf16_t::from_float(v);
    else out[i] = static_cast<T>(v);
  }
}

}  // namespace

void detail::cuda_fill_random(Tensor& t, uint64_t seed, uint64_t sub, float a, float b, bool normal, void* stream) {
  const int64_t n = t.numel();
  if (n == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 262140));
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (t.dtype()) {
    case DType::kF32: fill_random_kernel<<<grid, 256, 0, st>>>(t.data<float>(), n, seed, sub, a, b, normal); break;
    case DType::kBF16: fill_random_kernel<<<grid, 256, 0, st>>>(t.data<bf16_t>(), n, seed, sub, a, b, normal); break;
    default: fill_random_kernel<<<grid, 256, 0, st>>>(t.data<double>(), n, seed, sub, a, b, normal); break;
  }
  HELIX_LAUNCH_CHECK();
}

}  // namespace helix
