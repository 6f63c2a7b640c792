// QKV split / gradient join on CUDA: one thread per element of q (k, v), grid-stride, 256 threads per
// block. Memory-bound copies; the join accumulates in f32 and rounds once, as the CPU reference does.
#include "core/cuda_check.h"
#include "kernels/qkv/qkv.h"

namespace helix {
namespace {

template <typename T>
__global__ void split_kernel(const T* __restrict__ qkv, T* __restrict__ q, T* __restrict__ k, T* __restrict__ v,
                             int64_t t, int64_t h) {
  const int64_t n = t * h;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / h, c = i - r * h;
    const T* row = qkv + r * 3 * h;
    q[i] = row[c];
    k[i] = row[h + c];
    v[i] = row[2 * h + c];
  }
}

template <typename T>
__device__ __forceinline__ void add_to(T* o, const T& g) {
  if constexpr (std::is_same_v<T, bf16_t>) *o = bf16_t::from_float(__fadd_rn(o->to_float(), g.to_float()));
  else *o = __fadd_rn(*o, g);
}

template <typename T>
__global__ void join_kernel(const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv,
                            T* __restrict__ dqkv, int64_t t, int64_t h) {
  const int64_t n = t * h;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / h, c = i - r * h;
    T* row = dqkv + r * 3 * h;
    add_to(row + c, dq[i]);
    add_to(row + h + c, dk[i]);
    add_to(row + 2 * h + c, dv[i]);
  }
}

unsigned grid(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 16384))); }

}  // namespace

void detail::qkv_split_cuda(const QkvSplitParams& p, const Stream& stream) {
  const int64_t t = p.qkv.dim(0), h = p.qkv.dim(1) / 3;
  if (t * h == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  if (p.qkv.dtype() == DType::kF32)
    split_kernel<<<grid(t * h), 256, 0, st>>>(p.qkv.data<float>(), p.q.data<float>(), p.k.data<float>(), p.v.data<float>(), t, h);
  else
    split_kernel<<<grid(t * h), 256, 0, st>>>(p.qkv.data<bf16_t>(), p.q.data<bf16_t>(), p.k.data<bf16_t>(), p.v.data<bf16_t>(), t, h);
  HELIX_LAUNCH_CHECK();
}

void detail::qkv_join_grad_cuda(const QkvJoinGradParams& p, const Stream& stream) {
  const int64_t t = p.dqkv.dim(0), h = p.dqkv.dim(1) / 3;
  if (t * h == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  if (p.dqkv.dtype() == DType::kF32)
    join_kernel<<<grid(t * h), 256, 0, st>>>(p.dq.data<float>(), p.dk.data<float>(), p.dv.data<float>(), p.dqkv.data<float>(), t, h);
  else
    join_kernel<<<grid(t * h), 256, 0, st>>>(p.dq.data<bf16_t>(), p.dk.data<bf16_t>(), p.dv.data<bf16_t>(), p.dqkv.data<bf16_t>(), t, h);
  HELIX_LAUNCH_CHECK();
}

}  // namespace helix
