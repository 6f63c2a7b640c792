// GELU CUDA kernels: grid-stride loops over kVec-element vectors (16-byte loads when the pointers
// allow), a scalar tail, fp8 output with a block-reduced amax (one atomicMax per block).
#include <algorithm>

#include "core/cuda_check.h"
#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/gelu/gelu.h"
#include "kernels/gelu/gelu_math.h"

namespace helix {
namespace {

using elem::load_floats;
using elem::store_floats;

constexpr int kThreads = 256;

// Grid: min(ceil(n / (kVec * 256)), 8 blocks per SM) blocks of 256 threads, grid-stride over the
// n / kVec vectors; block 0 also takes the n % kVec tail elements, one per thread.
template <typename X, typename Y, int kVec>
__global__ void gelu_fwd_kernel(const X* x, Y* y, int64_t n, const float* scale, unsigned* amax) {
  __shared__ unsigned red[32];
  constexpr bool kFp8 = elem::kIsFp8<Y>;
  const float s = kFp8 ? *scale : 1.f;
  unsigned m = 0;
  const int64_t nvec = n / kVec;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[kVec];
    load_floats(x + i * kVec, v);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float g = gelu_math::value(v[e]);
      m = max(m, elem::abs_bits(g));
      v[e] = kFp8 ? g * s : g;
    }
    store_floats(y + i * kVec, v);
  }
  const int64_t tail = nvec * kVec + threadIdx.x;
  if (blockIdx.x == 0 && tail < n) {
    const float g = gelu_math::value(elem::to_float(x[tail]));
    m = max(m, elem::abs_bits(g));
    y[tail] = elem::from_float<Y>(kFp8 ? g * s : g);
  }
  if (amax) elem::block_amax(m, red, amax);
}

// Grid and tail as gelu_fwd_kernel.
template <typename X, int kVec>
__global__ void gelu_bwd_kernel(const X* x, const X* dy, X* dx, int64_t n, bool accumulate) {
  const int64_t nvec = n / kVec;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float xv[kVec], d[kVec], out[kVec];
    load_floats(x + i * kVec, xv);
    load_floats(dy + i * kVec, d);
    if (accumulate) load_floats(dx + i * kVec, out);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float g = d[e] * gelu_math::grad(xv[e]);
      out[e] = accumulate ? out[e] + g : g;
    }
    store_floats(dx + i * kVec, out);
  }
  const int64_t tail = nvec * kVec + threadIdx.x;
  if (blockIdx.x == 0 && tail < n) {
    float g = elem::to_float(dy[tail]) * gelu_math::grad(elem::to_float(x[tail]));
    if (accumulate) g += elem::to_float(dx[tail]);
    dx[tail] = elem::from_float<X>(g);
  }
}

unsigned grid_for(int64_t nvec, int device) {
  const int64_t blocks = std::max<int64_t>(1, (nvec + kThreads - 1) / kThreads);
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t{8} * elem::sm_count(device)));
}

}  // namespace

void detail::gelu_fwd_cuda(const GeluFwdParams& p, const Stream& stream) {
  const int64_t n = p.x.numel();
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  unsigned* amax = p.y_amax.defined() ? static_cast<unsigned*>(p.y_amax.data_ptr()) : nullptr;
  if (amax) CUDA_CHECK(cudaMemsetAsync(amax, 0, sizeof(unsigned), st));
  if (n == 0) return;
  const float* scale = p.y_scale.defined() ? p.y_scale.data<float>() : nullptr;
  elem::visit_f32_bf16(p.x.dtype(), "gelu_fwd", "x", [&](auto xt) {
    using X = decltype(xt);
    elem::visit_output(p.y.dtype(), "gelu_fwd", "y", [&](auto yt) {
      using Y = decltype(yt);
      constexpr int kVec = 16 / sizeof(X);
      const X* x = static_cast<const X*>(p.x.data_ptr());
      Y* y = static_cast<Y*>(p.y.data_ptr());
      if (checks::aligned_to(p.x, 16) && checks::aligned_to(p.y, kVec * sizeof(Y))) {
        gelu_fwd_kernel<X, Y, kVec>
            <<<grid_for(n / kVec, p.x.device().index), kThreads, 0, st>>>(x, y, n, scale, amax);
      } else {
        gelu_fwd_kernel<X, Y, 1>
            <<<grid_for(n, p.x.device().index), kThreads, 0, st>>>(x, y, n, scale, amax);
      }
      HELIX_LAUNCH_CHECK();
    });
  });
}

void detail::gelu_bwd_cuda(const GeluBwdParams& p, const Stream& stream) {
  const int64_t n = p.x.numel();
  if (n == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  elem::visit_f32_bf16(p.x.dtype(), "gelu_bwd", "x", [&](auto xt) {
    using X = decltype(xt);
    constexpr int kVec = 16 / sizeof(X);
    const X* x = static_cast<const X*>(p.x.data_ptr());
    const X* dy = static_cast<const X*>(p.dy.data_ptr());
    X* dx = static_cast<X*>(p.dx.data_ptr());
    if (checks::aligned_to(p.x, 16) && checks::aligned_to(p.dy, 16) &&
        checks::aligned_to(p.dx, 16)) {
      gelu_bwd_kernel<X, kVec><<<grid_for(n / kVec, p.x.device().index), kThreads, 0, st>>>(
          x, dy, dx, n, p.accumulate_dx);
    } else {
      gelu_bwd_kernel<X, 1>
          <<<grid_for(n, p.x.device().index), kThreads, 0, st>>>(x, dy, dx, n, p.accumulate_dx);
    }
    HELIX_LAUNCH_CHECK();
  });
}

}  // namespace helix
