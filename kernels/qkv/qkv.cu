// QKV split / gradient join on CUDA: one thread per element of q (k, v), grid-stride, 256 threads per
// block. Memory-bound copies; the join accumulates in f32 and rounds once, as the CPU reference does.
// When h is a multiple of 16 bytes' worth of elements and every pointer is 16-byte aligned, each
// thread moves 16-byte packs (8 bf16 or 4 f32) instead of single elements.
// With the fused rotary a block takes 8 tokens, stages their positions and cos/sin per frequency in
// shared memory (as rotary.cu does), and each thread moves the pair of packs at columns c and
// c + D/2 of one head of q and k (rotated with rotary_math.h, so the bits equal rotary_fwd's /
// rotary_bwd's) and of v, so every element is read and written once.
#include <algorithm>
#include <vector>

#include "core/cuda_check.h"
#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/qkv/qkv.h"
#include "kernels/rotary/rotary_math.h"

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

// ---- Fused rotary -----------------------------------------------------------------------------
constexpr int kRopeTokens = 8;     // tokens per block
constexpr int kRopeThreads = 256;  // threads per block
constexpr int kRopeMaxHalf = 128;  // D <= 256

struct RopeArgs {
  int64_t tokens;  // T
  int64_t h;       // H = heads * D
  int half;        // D / 2
  const int32_t* positions;   // [T] or null
  const int32_t* cu_seqlens;  // [num_seqs + 1] or null
  int num_seqs;
  float sin_sign;             // +1 split (rotate), -1 join (rotate back)
  float inv_freq[kRopeMaxHalf];
};

struct RopeShared {
  float cos[kRopeTokens][kRopeMaxHalf];
  float sin[kRopeTokens][kRopeMaxHalf];
  int32_t pos[kRopeTokens];
};

// Fills sh with the positions and cos/sin of the block's tokens [t0, t0 + nt); called by the whole
// block. Returns nt.
__device__ int stage_rope(const RopeArgs& a, int64_t t0, RopeShared& sh) {
  const int64_t left = a.tokens - t0;
  const int nt = left < kRopeTokens ? static_cast<int>(left) : kRopeTokens;
  if (static_cast<int>(threadIdx.x) < nt)
    sh.pos[threadIdx.x] = static_cast<int32_t>(
        rotary::position_of(a.positions, a.cu_seqlens, a.num_seqs, t0 + threadIdx.x));
  __syncthreads();
  for (int i = threadIdx.x; i < nt * a.half; i += blockDim.x) {
    const int tok = i / a.half, f = i - tok * a.half;
    rotary::cos_sin(sh.pos[tok], a.inv_freq[f], a.sin_sign, &sh.cos[tok][f], &sh.sin[tok][f]);
  }
  __syncthreads();
  return nt;
}

// Grid: ceil(T / 8) blocks of 256 threads. Work item (token, head, vector vv of kVec frequencies):
// columns c1 = head * D + vv * kVec and c2 = c1 + D/2 of q, k and v; consecutive threads take
// consecutive vectors of one head. D/2 % kVec == 0 and all bases are kVec-element aligned, so every
// pack is an aligned access.
template <typename T, int kVec>
__global__ void split_rotary_kernel(const T* __restrict__ qkv, T* __restrict__ q, T* __restrict__ k,
                                    T* __restrict__ v, RopeArgs a) {
  using P = elem::Pack<T, kVec>;
  __shared__ RopeShared sh;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRopeTokens;
  const int nt = stage_rope(a, t0, sh);
  const int vecs = a.half / kVec;
  const int slots = static_cast<int>(a.h / (2 * kVec));  // heads * vecs
  const int64_t h = a.h;
  for (int i = threadIdx.x; i < nt * slots; i += blockDim.x) {
    const int tok = i / slots, j = i - tok * slots;
    const int head = j / vecs, vv = j - head * vecs;
    const int64_t t = t0 + tok;
    const int64_t c1 = static_cast<int64_t>(head) * 2 * a.half + vv * kVec, c2 = c1 + a.half;
    const T* row = qkv + t * 3 * h;
    P q1 = *reinterpret_cast<const P*>(row + c1), q2 = *reinterpret_cast<const P*>(row + c2);
    P k1 = *reinterpret_cast<const P*>(row + h + c1), k2 = *reinterpret_cast<const P*>(row + h + c2);
    const P v1 = *reinterpret_cast<const P*>(row + 2 * h + c1);
    const P v2 = *reinterpret_cast<const P*>(row + 2 * h + c2);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float c = sh.cos[tok][vv * kVec + e], s = sh.sin[tok][vv * kVec + e];
      rotary::rotate_pair(q1.v[e], q2.v[e], c, s);
      rotary::rotate_pair(k1.v[e], k2.v[e], c, s);
    }
    const int64_t o = t * h;
    *reinterpret_cast<P*>(q + o + c1) = q1;
    *reinterpret_cast<P*>(q + o + c2) = q2;
    *reinterpret_cast<P*>(k + o + c1) = k1;
    *reinterpret_cast<P*>(k + o + c2) = k2;
    *reinterpret_cast<P*>(v + o + c1) = v1;
    *reinterpret_cast<P*>(v + o + c2) = v2;
  }
}

// dqkv packs at (column dst) += the packs g (already rotated back and rounded to T).
template <typename T, int kVec>
__device__ __forceinline__ void add_packs(T* dst, const elem::Pack<T, kVec>& g) {
  using P = elem::Pack<T, kVec>;
  P o = *reinterpret_cast<const P*>(dst);
#pragma unroll
  for (int e = 0; e < kVec; ++e) add_to(&o.v[e], g.v[e]);
  *reinterpret_cast<P*>(dst) = o;
}

// Same grid and work items as split_rotary_kernel; a.sin_sign = -1 (the inverse rotation).
template <typename T, int kVec>
__global__ void join_rotary_kernel(const T* __restrict__ dq, const T* __restrict__ dk,
                                   const T* __restrict__ dv, T* __restrict__ dqkv, RopeArgs a) {
  using P = elem::Pack<T, kVec>;
  __shared__ RopeShared sh;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kRopeTokens;
  const int nt = stage_rope(a, t0, sh);
  const int vecs = a.half / kVec;
  const int slots = static_cast<int>(a.h / (2 * kVec));
  const int64_t h = a.h;
  for (int i = threadIdx.x; i < nt * slots; i += blockDim.x) {
    const int tok = i / slots, j = i - tok * slots;
    const int head = j / vecs, vv = j - head * vecs;
    const int64_t t = t0 + tok;
    const int64_t c1 = static_cast<int64_t>(head) * 2 * a.half + vv * kVec, c2 = c1 + a.half;
    const int64_t o = t * h;
    P q1 = *reinterpret_cast<const P*>(dq + o + c1), q2 = *reinterpret_cast<const P*>(dq + o + c2);
    P k1 = *reinterpret_cast<const P*>(dk + o + c1), k2 = *reinterpret_cast<const P*>(dk + o + c2);
    const P v1 = *reinterpret_cast<const P*>(dv + o + c1);
    const P v2 = *reinterpret_cast<const P*>(dv + o + c2);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const float c = sh.cos[tok][vv * kVec + e], s = sh.sin[tok][vv * kVec + e];
      rotary::rotate_pair(q1.v[e], q2.v[e], c, s);
      rotary::rotate_pair(k1.v[e], k2.v[e], c, s);
    }
    T* row = dqkv + t * 3 * h;
    add_packs<T, kVec>(row + c1, q1);
    add_packs<T, kVec>(row + c2, q2);
    add_packs<T, kVec>(row + h + c1, k1);
    add_packs<T, kVec>(row + h + c2, k2);
    add_packs<T, kVec>(row + 2 * h + c1, v1);
    add_packs<T, kVec>(row + 2 * h + c2, v2);
  }
}

RopeArgs rope_args(const QkvRotary& r, int64_t t, int64_t h, float sin_sign, const char* op) {
  const int64_t half = r.head_dim / 2;
  HELIX_CHECK(half <= kRopeMaxHalf, "{}: expected rotary head_dim <= {}, got {}", op, 2 * kRopeMaxHalf,
              r.head_dim);
  HELIX_CHECK(kRopeTokens * (h / 2) < (int64_t{1} << 31), "{}: expected H < {}, got {}", op,
              (int64_t{1} << 31) / (kRopeTokens / 2), h);
  const int64_t num_seqs = r.pos.cu_seqlens.defined() ? r.pos.cu_seqlens.dim(0) - 1 : 0;
  HELIX_CHECK(num_seqs < (int64_t{1} << 31), "{}: too many sequences in {}", op, r.pos.cu_seqlens.str());
  RopeArgs a{};
  a.tokens = t;
  a.h = h;
  a.half = static_cast<int>(half);
  a.positions = r.pos.positions.defined() ? r.pos.positions.data<int32_t>() : nullptr;
  a.cu_seqlens = r.pos.cu_seqlens.defined() ? r.pos.cu_seqlens.data<int32_t>() : nullptr;
  a.num_seqs = static_cast<int>(num_seqs);
  a.sin_sign = sin_sign;
  const std::vector<float> inv = rotary_inv_freq(r.head_dim, r.base);
  std::copy(inv.begin(), inv.end(), a.inv_freq);
  return a;
}

// Calls launch(Vec{}) with the widest vector (up to 16 bytes) that divides D/2 and every base
// address; element offsets are multiples of it since H and 3H are multiples of D.
template <typename E, typename F>
void with_rope_vec(int64_t half, std::initializer_list<const Tensor*> ts, F&& launch) {
  auto fits = [&](int vec) {
    if (half % vec != 0) return false;
    for (const Tensor* t : ts)
      if (!checks::aligned_to(*t, vec * sizeof(E))) return false;
    return true;
  };
  if constexpr (sizeof(E) == 2) {
    if (fits(8)) return launch(std::integral_constant<int, 8>{});
  }
  if (fits(4)) return launch(std::integral_constant<int, 4>{});
  if (fits(2)) return launch(std::integral_constant<int, 2>{});
  launch(std::integral_constant<int, 1>{});
}

unsigned rope_grid(int64_t t) { return static_cast<unsigned>((t + kRopeTokens - 1) / kRopeTokens); }

void split_rotary(const QkvSplitParams& p, cudaStream_t st) {
  const int64_t t = p.qkv.dim(0), h = p.qkv.dim(1) / 3;
  const RopeArgs args = rope_args(p.rotary, t, h, 1.f, "qkv_split");
  elem::visit_f32_bf16(p.qkv.dtype(), "qkv_split", "qkv", [&](auto tag) {
    using E = decltype(tag);
    with_rope_vec<E>(args.half, {&p.qkv, &p.q, &p.k, &p.v}, [&](auto vec) {
      split_rotary_kernel<E, decltype(vec)::value><<<rope_grid(t), kRopeThreads, 0, st>>>(
          p.qkv.data<E>(), p.q.data<E>(), p.k.data<E>(), p.v.data<E>(), args);
    });
  });
  HELIX_LAUNCH_CHECK();
}

void join_rotary(const QkvJoinGradParams& p, cudaStream_t st) {
  const int64_t t = p.dqkv.dim(0), h = p.dqkv.dim(1) / 3;
  const RopeArgs args = rope_args(p.rotary, t, h, -1.f, "qkv_join_grad");
  elem::visit_f32_bf16(p.dqkv.dtype(), "qkv_join_grad", "dqkv", [&](auto tag) {
    using E = decltype(tag);
    with_rope_vec<E>(args.half, {&p.dqkv, &p.dq, &p.dk, &p.dv}, [&](auto vec) {
      join_rotary_kernel<E, decltype(vec)::value><<<rope_grid(t), kRopeThreads, 0, st>>>(
          p.dq.data<E>(), p.dk.data<E>(), p.dv.data<E>(), p.dqkv.data<E>(), args);
    });
  });
  HELIX_LAUNCH_CHECK();
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

unsigned grid(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 16384))); }

}  // namespace

void detail::qkv_split_cuda(const QkvSplitParams& p, const Stream& stream) {
  const int64_t t = p.qkv.dim(0), h = p.qkv.dim(1) / 3;
  if (t * h == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  if (p.rotary.enabled()) return split_rotary(p, st);
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
  if (p.rotary.enabled()) return join_rotary(p, st);
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
