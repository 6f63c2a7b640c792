// QKV split / gradient join on CUDA: one thread per element of q (k, v), grid-stride, 256 threads per
// block. Memory-bound copies; the join accumulates in f32 and rounds once, as the CPU reference does.
// When h is a multiple of 16 bytes' worth of elements and every pointer is 16-byte aligned, each
// thread moves 16-byte packs (8 bf16 or 4 f32) instead of single elements.
#include "core/cuda_check.h"
#include "kernels/common/elem.h"
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

// Packed variants. Grid: grid(t * h / kVec) blocks of 256 threads, grid-stride over packs of kVec
// elements of q; h % kVec == 0, so a pack never crosses a row and every access is 16-byte aligned.
template <typename T, int kVec>
__global__ void split_vec_kernel(const T* __restrict__ qkv, T* __restrict__ q, T* __restrict__ k,
                                 T* __restrict__ v, int64_t t, int64_t h) {
  using P = elem::Pack<T, kVec>;
  const int64_t n = t * h / kVec;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * kVec, r = e / h, c = e - r * h;
    const T* row = qkv + r * 3 * h;
    reinterpret_cast<P*>(q)[i] = *reinterpret_cast<const P*>(row + c);
    reinterpret_cast<P*>(k)[i] = *reinterpret_cast<const P*>(row + h + c);
    reinterpret_cast<P*>(v)[i] = *reinterpret_cast<const P*>(row + 2 * h + c);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void add_pack_to(T* o, const T* g) {
  using P = elem::Pack<T, kVec>;
  P a = *reinterpret_cast<const P*>(o);
  const P b = *reinterpret_cast<const P*>(g);
#pragma unroll
  for (int e = 0; e < kVec; ++e) add_to(&a.v[e], b.v[e]);
  *reinterpret_cast<P*>(o) = a;
}

template <typename T, int kVec>
__global__ void join_vec_kernel(const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv,
                                T* __restrict__ dqkv, int64_t t, int64_t h) {
  const int64_t n = t * h / kVec;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = i * kVec, r = e / h, c = e - r * h;
    T* row = dqkv + r * 3 * h;
    add_pack_to<T, kVec>(row + c, dq + e);
    add_pack_to<T, kVec>(row + h + c, dk + e);
    add_pack_to<T, kVec>(row + 2 * h + c, dv + e);
  }
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

unsigned grid(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 16384))); }

}  // namespace

void detail::qkv_split_cuda(const QkvSplitParams& p, const Stream& stream) {
  const int64_t t = p.qkv.dim(0), h = p.qkv.dim(1) / 3;
  if (t * h == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const bool f32 = p.qkv.dtype() == DType::kF32;
  const int vec = f32 ? 4 : 8;
  if (h % vec == 0 && aligned16(p.qkv) && aligned16(p.q) && aligned16(p.k) && aligned16(p.v)) {
    if (f32)
      split_vec_kernel<float, 4><<<grid(t * h / 4), 256, 0, st>>>(p.qkv.data<float>(), p.q.data<float>(), p.k.data<float>(), p.v.data<float>(), t, h);
    else
      split_vec_kernel<bf16_t, 8><<<grid(t * h / 8), 256, 0, st>>>(p.qkv.data<bf16_t>(), p.q.data<bf16_t>(), p.k.data<bf16_t>(), p.v.data<bf16_t>(), t, h);
  } else if (f32)
    split_kernel<<<grid(t * h), 256, 0, st>>>(p.qkv.data<float>(), p.q.data<float>(), p.k.data<float>(), p.v.data<float>(), t, h);
  else
    split_kernel<<<grid(t * h), 256, 0, st>>>(p.qkv.data<bf16_t>(), p.q.data<bf16_t>(), p.k.data<bf16_t>(), p.v.data<bf16_t>(), t, h);
  HELIX_LAUNCH_CHECK();
}

void detail::qkv_join_grad_cuda(const QkvJoinGradParams& p, const Stream& stream) {
  const int64_t t = p.dqkv.dim(0), h = p.dqkv.dim(1) / 3;
  if (t * h == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const bool f32 = p.dqkv.dtype() == DType::kF32;
  const int vec = f32 ? 4 : 8;
  if (h % vec == 0 && aligned16(p.dqkv) && aligned16(p.dq) && aligned16(p.dk) && aligned16(p.dv)) {
    if (f32)
      join_vec_kernel<float, 4><<<grid(t * h / 4), 256, 0, st>>>(p.dq.data<float>(), p.dk.data<float>(), p.dv.data<float>(), p.dqkv.data<float>(), t, h);
    else
      join_vec_kernel<bf16_t, 8><<<grid(t * h / 8), 256, 0, st>>>(p.dq.data<bf16_t>(), p.dk.data<bf16_t>(), p.dv.data<bf16_t>(), p.dqkv.data<bf16_t>(), t, h);
  } else if (f32)
    join_kernel<<<grid(t * h), 256, 0, st>>>(p.dq.data<float>(), p.dk.data<float>(), p.dv.data<float>(), p.dqkv.data<float>(), t, h);
  else
    join_kernel<<<grid(t * h), 256, 0, st>>>(p.dq.data<bf16_t>(), p.dk.data<bf16_t>(), p.dv.data<bf16_t>(), p.dqkv.data<bf16_t>(), t, h);
  HELIX_LAUNCH_CHECK();
}

}  // namespace helix
