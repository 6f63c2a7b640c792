// CUDA LSE merge of partial attention outputs (context parallelism's ring), forward and backward.
// Memory-bound: one warp per (token, head) row, lanes striding over the head dim; the weights
// w_i = exp(lse_i - lse) are computed once per row in registers (partials unrolled up to the max).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "core/cuda_check.h"
#include "kernels/attention/attention.h"

namespace helix {
namespace {

constexpr int kMaxParts = kMaxLseMergeParts;

struct MergeArgs {
  const void* outs[kMaxParts];   // n x [T, H, D], bf16 when parts_bf16 else f32
  const float* lses[kMaxParts];  // n x [H, T]
  void* d_outs[kMaxParts];       // backward: n x [T, H, D], dtype of outs
  float* d_lses[kMaxParts];      // backward: n x [H, T]
  int n;
  bool parts_bf16;
  void* out;  // forward: merged [T, H, D]
  bool out_bf16;
  float* lse;         // forward: merged [H, T]
  const void* d_out;  // backward: [T, H, D]
  bool d_out_bf16;
  const float* d_lse;  // backward: [H, T] or nullptr
  int64_t rows, heads, dim;
};

__device__ __forceinline__ float load_elem(const void* p, bool bf16, int64_t i) {
  return bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i])
              : static_cast<const float*>(p)[i];
}
__device__ __forceinline__ void store_elem(void* p, bool bf16, int64_t i, float v) {
  if (bf16)
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else
    static_cast<float*>(p)[i] = v;
}

// Merged LSE of entry li and the weights w_i (all zero when every part is -inf).
__device__ __forceinline__ float merge_weights(const MergeArgs& a, int64_t li,
                                               float (&w)[kMaxParts]) {
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxParts; ++i)
    if (i < a.n) mx = fmaxf(mx, a.lses[i][li]);
  if (mx == -INFINITY) {
#pragma unroll
    for (int i = 0; i < kMaxParts; ++i) w[i] = 0.f;
    return -INFINITY;
  }
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxParts; ++i)
    if (i < a.n) sum += expf(a.lses[i][li] - mx);
  const float lse = mx + logf(sum);
#pragma unroll
  for (int i = 0; i < kMaxParts; ++i) w[i] = i < a.n ? expf(a.lses[i][li] - lse) : 0.f;
  return lse;
}

// grid (ceil(T * H / 8)), block 256: warp = one (token, head) row.
__global__ void merge_fwd_kernel(const MergeArgs a) {
  const int64_t row = int64_t{blockIdx.x} * 8 + threadIdx.x / 32;
  if (row >= a.rows * a.heads) return;
  const int lane = threadIdx.x & 31;
  const int64_t token = row / a.heads, head = row % a.heads, li = head * a.rows + token;
  float w[kMaxParts];
  const float lse = merge_weights(a, li, w);
  for (int64_t d = lane; d < a.dim; d += 32) {
    const int64_t e = row * a.dim + d;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxParts; ++i)
      if (w[i] != 0.f) acc += w[i] * load_elem(a.outs[i], a.parts_bf16, e);  // skip empty parts
    store_elem(a.out, a.out_bf16, e, acc);
  }
  if (lane == 0) a.lse[li] = lse;
}

// grid (ceil(T * H / 8)), block 256: warp = one (token, head) row.
__global__ void merge_bwd_kernel(const MergeArgs a) {
  const int64_t row = int64_t{blockIdx.x} * 8 + threadIdx.x / 32;
  if (row >= a.rows * a.heads) return;
  const int lane = threadIdx.x & 31;
  const int64_t token = row / a.heads, head = row % a.heads, li = head * a.rows + token;
  float w[kMaxParts], dot[kMaxParts];
  merge_weights(a, li, w);
#pragma unroll
  for (int i = 0; i < kMaxParts; ++i) dot[i] = 0.f;
  for (int64_t d = lane; d < a.dim; d += 32) {
    const int64_t e = row * a.dim + d;
    const float g = load_elem(a.d_out, a.d_out_bf16, e);
#pragma unroll
    for (int i = 0; i < kMaxParts; ++i) {
      if (i >= a.n) continue;
      if (w[i] != 0.f) dot[i] += g * load_elem(a.outs[i], a.parts_bf16, e);
      store_elem(a.d_outs[i], a.parts_bf16, e, w[i] == 0.f ? 0.f : w[i] * g);  // empty part: 0
    }
  }
  float dot_merged = 0.f;  // d_out . out with out = sum_i w_i out_i
#pragma unroll
  for (int i = 0; i < kMaxParts; ++i) {
#pragma unroll
    for (int s = 16; s >= 1; s >>= 1) dot[i] += __shfl_xor_sync(0xffffffffu, dot[i], s);
    dot_merged += w[i] * dot[i];
  }
  if (lane == 0) {
    const float g = a.d_lse ? a.d_lse[li] : 0.f;
#pragma unroll
    for (int i = 0; i < kMaxParts; ++i)
      if (i < a.n) a.d_lses[i][li] = w[i] * (dot[i] - dot_merged + g);
  }
}

MergeArgs make_args(const std::vector<Tensor>& outs, const std::vector<Tensor>& lses) {
  MergeArgs a{};
  a.n = static_cast<int>(outs.size());
  for (int i = 0; i < a.n; ++i) {
    a.outs[i] = outs[i].data_ptr();
    a.lses[i] = lses[i].data<float>();
  }
  a.parts_bf16 = outs[0].dtype() == DType::kBF16;
  a.rows = outs[0].dim(0);
  a.heads = outs[0].dim(1);
  a.dim = outs[0].dim(2);
  return a;
}

unsigned merge_blocks(const MergeArgs& a) {
  return static_cast<unsigned>((a.rows * a.heads + 7) / 8);
}

}  // namespace

namespace detail {

void lse_merge_fwd_cuda(const LseMergeFwdParams& p, const Stream& stream) {
  MergeArgs a = make_args(p.outs, p.lses);
  a.out = p.out.data_ptr();
  a.out_bf16 = p.out.dtype() == DType::kBF16;
  a.lse = p.lse.data<float>();
  if (a.rows * a.heads == 0) return;
  merge_fwd_kernel<<<merge_blocks(a), 256, 0, static_cast<cudaStream_t>(stream.handle())>>>(a);
  HELIX_LAUNCH_CHECK();
}

void lse_merge_bwd_cuda(const LseMergeBwdParams& p, const Stream& stream) {
  MergeArgs a = make_args(p.outs, p.lses);
  for (int i = 0; i < a.n; ++i) {
    a.d_outs[i] = p.d_outs[i].data_ptr();
    a.d_lses[i] = p.d_lses[i].data<float>();
  }
  a.d_out = p.d_out.data_ptr();
  a.d_out_bf16 = p.d_out.dtype() == DType::kBF16;
  a.d_lse = p.d_lse.defined() ? p.d_lse.data<float>() : nullptr;
  if (a.rows * a.heads == 0) return;
  merge_bwd_kernel<<<merge_blocks(a), 256, 0, static_cast<cudaStream_t>(stream.handle())>>>(a);
  HELIX_LAUNCH_CHECK();
}

}  // namespace detail
}  // namespace helix
