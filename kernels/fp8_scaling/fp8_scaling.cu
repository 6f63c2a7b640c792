// CUDA FP8 delayed scaling: one thread per operand rolls its history column (coalesced: threads
// of a warp touch consecutive operands of one history row) and computes the new scale; the amax
// canonicalisation is one grid-stride pass. Same math as fp8_scaling_cpu.cpp: IEEE division (helix
// never builds with fast-math), ldexpf by the integer margin (exact), NaN winning the history max.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "core/cuda_check.h"
#include "kernels/fp8_scaling/fp8_scaling.h"

namespace helix {
namespace {

constexpr int kThreads = 128;

// grid: ceil(n / kThreads) blocks of kThreads; thread i owns operand i.
__global__ void __launch_bounds__(kThreads)
    fp8_scaling_update_kernel(float* __restrict__ amax, float* __restrict__ hist, float* __restrict__ scale,
                              float* __restrict__ scale_inv, const float* __restrict__ fp8_max, int64_t n,
                              int64_t len, bool use_max, int margin) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  for (int64_t j = len - 1; j >= 1; --j) hist[j * n + i] = hist[(j - 1) * n + i];
  hist[i] = amax[i];
  float a = hist[i];
  if (use_max)
    for (int64_t j = 1; j < len; ++j) {  // NaN wins, then +inf, then the largest number
      const float h = hist[j * n + i];
      if (isnan(h) || h > a) a = isnan(a) ? a : h;
    }
  float s = scale[i];
  if (a > 0.0f && isfinite(a)) {
    s = ldexpf(__fdiv_rn(fp8_max[i], a), -margin);
    if (!isfinite(s)) s = FLT_MAX;
  }
  scale[i] = s;
  scale_inv[i] = __fdiv_rn(1.0f, s);
  amax[i] = 0.0f;
}

// grid-stride over n; NaN -> +inf, x -> |x|.
__global__ void __launch_bounds__(256) fp8_amax_canonicalize_kernel(float* __restrict__ amax, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = amax[i];
    amax[i] = isnan(a) ? __int_as_float(0x7f800000) : fabsf(a);
  }
}

cudaStream_t cuda_stream(const Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

}  // namespace

void detail::fp8_scaling_update_cuda(const Fp8ScalingUpdateParams& p, const Stream& stream) {
  const int64_t n = p.amax.numel(), len = p.history.dim(0);
  if (n == 0) return;
  const unsigned grid = static_cast<unsigned>((n + kThreads - 1) / kThreads);
  fp8_scaling_update_kernel<<<grid, kThreads, 0, cuda_stream(stream)>>>(
      p.amax.data<float>(), p.history.data<float>(), p.scale.data<float>(), p.scale_inv.data<float>(),
      p.fp8_max.data<float>(), n, len, p.algo == Fp8AmaxAlgo::kMax, p.margin);
  HELIX_LAUNCH_CHECK();
}

void detail::fp8_amax_canonicalize_cuda(const Tensor& amax, const Stream& stream) {
  const int64_t n = amax.numel();
  if (n == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 1024));
  fp8_amax_canonicalize_kernel<<<grid, 256, 0, cuda_stream(stream)>>>(amax.data<float>(), n);
  HELIX_LAUNCH_CHECK();
}

}  // namespace helix
