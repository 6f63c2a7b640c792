// CUDA FP8 delayed scaling: a block per 32 operands rolls their history columns in place, in
// row chunks (coalesced: a warp touches 32 consecutive operands of one history row), and computes
// the new scales; the amax canonicalisation is one grid-stride pass. Same math as fp8_scaling_cpu.cpp: IEEE division (helix
// never builds with fast-math), ldexpf by the integer margin (exact), NaN winning the history max.
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "core/cuda_check.h"
#include "kernels/fp8_scaling/fp8_scaling.h"

namespace helix {
namespace {

// A block owns kSlots adjacent operands (history columns; a warp reads one 128-byte row segment)
// and rolls their columns in place from the bottom up, kChunk rows at a time: every thread loads
// its rows of the chunk's sources (rows lo-1 .. hi-1), the block synchronises, then stores them one
// row down. One thread per operand rolling 1024 rows serially took ~0.4 ms a step on an H100.
constexpr int kSlots = 32;
constexpr int kRowLanes = 8;
constexpr int kRowsPerThread = 16;
constexpr int kChunk = kRowLanes * kRowsPerThread;
constexpr int kThreads = kSlots * kRowLanes;

// max in which NaN wins, then +inf (the CPU's order; which NaN survives does not matter).
__device__ __forceinline__ float nan_max(float a, float h) { return (isnan(a) || !(isnan(h) || h > a)) ? a : h; }

// grid: ceil(n / kSlots) blocks of kThreads; lane x = operand, lane y = row lane.
__global__ void __launch_bounds__(kThreads)
    fp8_scaling_update_kernel(float* __restrict__ amax, float* __restrict__ hist, float* __restrict__ scale,
                              float* __restrict__ scale_inv, const float* __restrict__ fp8_max, int64_t n,
                              int64_t len, bool use_max, int margin) {
  __shared__ float red[kRowLanes][kSlots];
  const int tx = threadIdx.x % kSlots, ty = threadIdx.x / kSlots;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSlots + tx;
  const bool ok = i < n;
  const float newest = ok ? amax[i] : 0.f;
  float m = newest;  // max over the new history: newest and old rows 0 .. len-2
  for (int64_t hi = len - 1; hi >= 1; hi -= kChunk) {  // write rows lo .. hi from rows lo-1 .. hi-1
    const int64_t lo = hi - kChunk + 1 > 1 ? hi - kChunk + 1 : 1;
    float v[kRowsPerThread];
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t j = lo + ty + k * kRowLanes;
      if (ok && j <= hi) {
        v[k] = hist[(j - 1) * n + i];
        m = nan_max(m, v[k]);
      }
    }
    __syncthreads();  // every source of this chunk is read before any row moves down
#pragma unroll
    for (int k = 0; k < kRowsPerThread; ++k) {
      const int64_t j = lo + ty + k * kRowLanes;
      if (ok && j <= hi) hist[j * n + i] = v[k];
    }
    __syncthreads();  // this chunk's top source row is overwritten only by the next chunk
  }
  red[ty][tx] = m;
  __syncthreads();
  if (ty != 0 || !ok) return;
  float a = newest;
  if (use_max)
    for (int r = 0; r < kRowLanes; ++r) a = nan_max(a, red[r][tx]);
  hist[i] = newest;
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
  const unsigned grid = static_cast<unsigned>((n + kSlots - 1) / kSlots);
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
