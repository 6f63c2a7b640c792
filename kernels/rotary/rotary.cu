// Rotary embedding CUDA kernel: a block takes 8 tokens, stages their positions and the cos/sin of
// every frequency in shared memory (computed once per token and frequency, in double from the fp32
// angle, then rounded, as the CPU does), and rotates all heads of q and k in place with
// kVec-element vectors of each half. The arithmetic is rotary_math.h's (products and sums as
// __fmul_rn/__fadd_rn, nothing fused into an FMA): the kernel rounds exactly as the CPU reference,
// Hugging Face's unfused fp32 ops, and the rotary fused into qkv_split / qkv_join_grad.
#include <algorithm>

#include "core/cuda_check.h"
#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/rotary/rotary.h"
#include "kernels/rotary/rotary_math.h"

namespace helix {
namespace {

using elem::Pack;

constexpr int kTokensPerBlock = 8;
constexpr int kThreads = 256;
constexpr int kMaxHalf = 128;  // D <= 256

struct InvFreq {
  float v[kMaxHalf];
};

struct RotaryArgs {
  void* a;  // [T, ha, D] or null
  void* b;  // [T, hb, D] or null
  int64_t tokens;
  int ha, hb, half;
  const int32_t* positions;   // [T] or null
  const int32_t* cu_seqlens;  // [num_seqs + 1] or null
  int num_seqs;
  float sin_sign;
  InvFreq inv_freq;
};

// Grid: ceil(T / 8) blocks of 256 threads. Work items of a block are (token, head of a or b,
// vector of kVec pairs), consecutive threads on consecutive vectors of one head.
template <typename T, int kVec>
__global__ void rotary_kernel(RotaryArgs a) {
  __shared__ float cos_s[kTokensPerBlock][kMaxHalf];
  __shared__ float sin_s[kTokensPerBlock][kMaxHalf];
  __shared__ int32_t pos_s[kTokensPerBlock];
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock;
  const int64_t left = a.tokens - t0;
  const int nt = left < kTokensPerBlock ? static_cast<int>(left) : kTokensPerBlock;
  if (static_cast<int>(threadIdx.x) < nt) {
    const int64_t t = t0 + threadIdx.x;
    pos_s[threadIdx.x] =
        static_cast<int32_t>(rotary::position_of(a.positions, a.cu_seqlens, a.num_seqs, t));
  }
  __syncthreads();
  for (int i = threadIdx.x; i < nt * a.half; i += blockDim.x) {
    const int tok = i / a.half, f = i % a.half;
    rotary::cos_sin(pos_s[tok], a.inv_freq.v[f], a.sin_sign, &cos_s[tok][f], &sin_s[tok][f]);
  }
  __syncthreads();
  const int vecs = a.half / kVec;
  const int heads = a.ha + a.hb;
  const int D = 2 * a.half;
  const int items = nt * heads * vecs;
  for (int i = threadIdx.x; i < items; i += blockDim.x) {
    const int v = i % vecs;
    const int rest = i / vecs;
    const int h = rest % heads;
    const int tok = rest / heads;
    const int64_t t = t0 + tok;
    T* row = h < a.ha ? static_cast<T*>(a.a) + (t * a.ha + h) * D
                      : static_cast<T*>(a.b) + (t * a.hb + (h - a.ha)) * D;
    Pack<T, kVec>* p1 = reinterpret_cast<Pack<T, kVec>*>(row + v * kVec);
    Pack<T, kVec>* p2 = reinterpret_cast<Pack<T, kVec>*>(row + a.half + v * kVec);
    Pack<T, kVec> x1 = *p1, x2 = *p2;
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      rotary::rotate_pair(x1.v[e], x2.v[e], cos_s[tok][v * kVec + e], sin_s[tok][v * kVec + e]);
    *p1 = x1;
    *p2 = x2;
  }
}

template <typename T, int kVec>
void launch(const RotaryArgs& args, cudaStream_t st) {
  const unsigned grid =
      static_cast<unsigned>((args.tokens + kTokensPerBlock - 1) / kTokensPerBlock);
  rotary_kernel<T, kVec><<<grid, kThreads, 0, st>>>(args);
  HELIX_LAUNCH_CHECK();
}

}  // namespace

void detail::rotary_apply_cuda(const RotaryApply& p, const Stream& stream) {
  const Tensor& ref = p.a.defined() ? p.a : p.b;
  const int64_t T = ref.dim(0), D = ref.dim(2), half = D / 2;
  HELIX_CHECK(half <= kMaxHalf, "{}: expected D <= {}, got {}", p.op, 2 * kMaxHalf, ref.str());
  const int64_t ha = p.a.defined() ? p.a.dim(1) : 0, hb = p.b.defined() ? p.b.dim(1) : 0;
  HELIX_CHECK(kTokensPerBlock * (ha + hb) * half < (int64_t{1} << 31),
              "{}: expected fewer heads, got {} and {}", p.op, p.a.str(), p.b.str());
  const int64_t num_seqs = p.pos.cu_seqlens.defined() ? p.pos.cu_seqlens.dim(0) - 1 : 0;
  HELIX_CHECK(num_seqs < (int64_t{1} << 31), "{}: too many sequences in {}", p.op,
              p.pos.cu_seqlens.str());
  if (T == 0 || ha + hb == 0) return;
  RotaryArgs args{};
  args.a = p.a.defined() ? p.a.data_ptr() : nullptr;
  args.b = p.b.defined() ? p.b.data_ptr() : nullptr;
  args.tokens = T;
  args.ha = static_cast<int>(ha);
  args.hb = static_cast<int>(hb);
  args.half = static_cast<int>(half);
  args.positions = p.pos.positions.defined() ? p.pos.positions.data<int32_t>() : nullptr;
  args.cu_seqlens = p.pos.cu_seqlens.defined() ? p.pos.cu_seqlens.data<int32_t>() : nullptr;
  args.num_seqs = static_cast<int>(num_seqs);
  args.sin_sign = p.sin_sign;
  const std::vector<float> inv = rotary_inv_freq(D, p.base);
  std::copy(inv.begin(), inv.end(), args.inv_freq.v);
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  elem::visit_f32_bf16(ref.dtype(), p.op, "q", [&](auto tag) {
    using E = decltype(tag);
    // The widest vector (up to 16 bytes) that divides D/2 and the base addresses.
    auto fits = [&](int vec) {
      return half % vec == 0 && checks::aligned_to(p.a, vec * sizeof(E)) &&
             checks::aligned_to(p.b, vec * sizeof(E));
    };
    if constexpr (sizeof(E) == 2) {
      if (fits(8)) return launch<E, 8>(args, st);
    }
    if (fits(4)) return launch<E, 4>(args, st);
    if (fits(2)) return launch<E, 2>(args, st);
    launch<E, 1>(args, st);
  });
}

}  // namespace helix
