// Gradient norm CUDA kernels: a multi-tensor pass writes one fp32 partial sum of squares per chunk,
// then one block adds the partials in a fixed order in double. Both reductions have a fixed shape
// (per-thread strides, butterfly within warps, warps in order), so results are bitwise
// reproducible.
#include <cuda_runtime.h>

#include "core/cuda_check.h"
#include "kernels/grad_norm/grad_norm.h"

namespace helix {
namespace {

constexpr int kThreads = 256;
constexpr int kFinishThreads = 1024;

__device__ __forceinline__ float sq_bf16(unsigned short bits, float acc) {
  const float v = bf16_t{bits}.to_float();
  return __fmaf_rn(v, v, acc);
}

// Grid: one block of kThreads threads per chunk of the table; block b writes partials[b]. Vector
// loads (float4, or 4 x bf16) when the tensor's pointer allows, since chunk starts are multiples
// of 4.
__global__ void __launch_bounds__(kThreads)
    sumsq_chunks_kernel(const detail::GradNormTensorDesc* descs, const MultiTensorChunk* chunks,
                        int64_t chunk_size, float* partials) {
  const MultiTensorChunk c = chunks[blockIdx.x];
  const detail::GradNormTensorDesc d = descs[c.tensor];
  const int64_t end = min(c.begin + chunk_size, d.numel);
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
  int64_t scalar_begin = c.begin;
  if (d.vec4) {
    const int64_t groups = (end - c.begin) / 4;
    if (d.is_bf16) {
      const unsigned short* x = static_cast<const unsigned short*>(d.data);
      for (int64_t i = threadIdx.x; i < groups; i += kThreads) {
        const ushort4 v = *reinterpret_cast<const ushort4*>(x + c.begin + 4 * i);
        a0 = sq_bf16(v.x, a0);
        a1 = sq_bf16(v.y, a1);
        a2 = sq_bf16(v.z, a2);
        a3 = sq_bf16(v.w, a3);
      }
    } else {
      const float* x = static_cast<const float*>(d.data);
      for (int64_t i = threadIdx.x; i < groups; i += kThreads) {
        const float4 v = *reinterpret_cast<const float4*>(x + c.begin + 4 * i);
        a0 = __fmaf_rn(v.x, v.x, a0);
        a1 = __fmaf_rn(v.y, v.y, a1);
        a2 = __fmaf_rn(v.z, v.z, a2);
        a3 = __fmaf_rn(v.w, v.w, a3);
      }
    }
    scalar_begin = c.begin + 4 * groups;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    if (d.is_bf16) {
      a0 = sq_bf16(static_cast<const unsigned short*>(d.data)[i], a0);
    } else {
      const float v = static_cast<const float*>(d.data)[i];
      a0 = __fmaf_rn(v, v, a0);
    }
  }
  float acc = __fadd_rn(__fadd_rn(a0, a1), __fadd_rn(a2, a3));
  for (int off = 16; off > 0; off >>= 1)
    acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, off));
  __shared__ float warp_sums[kThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = warp_sums[0];
    for (int w = 1; w < kThreads / 32; ++w) total = __fadd_rn(total, warp_sums[w]);
    partials[blockIdx.x] = total;
  }
}

__device__ __forceinline__ void set_flag(void* flag, int flag_is_f32) {
  if (flag_is_f32)
    *static_cast<float*>(flag) = 1.0f;
  else
    *static_cast<int32_t*>(flag) = 1;
}

// Grid: one block of kFinishThreads threads. Thread i adds partials i, i + kFinishThreads, ... in
// double; warps reduce by butterfly; thread 0 adds the warp sums in order and writes the result.
__global__ void __launch_bounds__(kFinishThreads)
    sumsq_finish_kernel(const float* partials, int64_t n, float* sumsq, void* flag,
                        int flag_is_f32) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kFinishThreads) acc += partials[i];
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  __shared__ double warp_sums[kFinishThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kFinishThreads / 32; ++w) total += warp_sums[w];
    const float r = static_cast<float>(total);
    *sumsq = r;
    if (flag != nullptr && !isfinite(r)) set_flag(flag, flag_is_f32);
  }
}

// Grid: one thread. PyTorch's clip_grad_norm_ coefficient in f32 (see grad_norm.h).
__global__ void clip_coef_kernel(const float* sumsq, float* coef, float* norm, float max_norm,
                                 void* flag, int flag_is_f32) {
  const float s = *sumsq;
  const float n = __fsqrt_rn(s);
  const float c = __fmul_rn(__fdiv_rn(1.0f, __fadd_rn(n, 1e-6f)), max_norm);
  *coef = c > 1.0f ? 1.0f : c;
  if (norm != nullptr) *norm = n;
  if (flag != nullptr && !isfinite(s)) set_flag(flag, flag_is_f32);
}

void* flag_ptr(const Tensor& flag) { return flag.defined() ? flag.data_ptr() : nullptr; }
int flag_is_f32(const Tensor& flag) {
  return flag.defined() && flag.dtype() == DType::kF32 ? 1 : 0;
}

}  // namespace

void detail::grad_norm_sumsq_cuda(const GradNormParams& p, const Stream& s) {
  cudaStream_t st = static_cast<cudaStream_t>(s.handle());
  const MultiTensorTable& table = p.grads->table();
  const int64_t chunks = table.defined() ? table.num_chunks() : 0;
  Tensor partials = Tensor::empty(Shape{chunks > 0 ? chunks : 1}, DType::kF32, p.sumsq.device(), s);
  if (chunks > 0) {
    sumsq_chunks_kernel<<<static_cast<unsigned>(chunks), kThreads, 0, st>>>(
        static_cast<const GradNormTensorDesc*>(table.descs()), table.chunks(), table.chunk_size(),
        partials.data<float>());
    HELIX_LAUNCH_CHECK();
  }
  sumsq_finish_kernel<<<1, kFinishThreads, 0, st>>>(
      partials.data<float>(), chunks, p.sumsq.data<float>(), flag_ptr(p.nonfinite_flag),
      flag_is_f32(p.nonfinite_flag));
  HELIX_LAUNCH_CHECK();
}

void detail::grad_clip_coef_cuda(const GradClipParams& p, const Stream& s) {
  clip_coef_kernel<<<1, 1, 0, static_cast<cudaStream_t>(s.handle())>>>(
      p.sumsq.data<float>(), p.clip_coef.data<float>(),
      p.norm.defined() ? p.norm.data<float>() : nullptr, static_cast<float>(p.max_norm),
      flag_ptr(p.nonfinite_flag), flag_is_f32(p.nonfinite_flag));
  HELIX_LAUNCH_CHECK();
}

}  // namespace helix
