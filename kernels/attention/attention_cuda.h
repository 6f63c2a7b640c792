#pragma once
// Internal to kernels/attention (CUDA builds): the launch helpers the forward, backward and merge
// translation units share. The kernel argument struct itself lives in attention_tiles.cuh.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/attention/attention.h"
#include "kernels/attention/attention_tiles.cuh"

namespace helix::detail {

// Device pointers of q, k, cu_seqlens and offsets, strides and scales; the caller fills the rest.
attention_tiles::AttnArgs make_attn_args(const Tensor& q, const Tensor& k,
                                         const ThdAttentionLayout& b, float scale,
                                         AttentionMask mask);

// Tensors whose gap rows (rows in no sequence) are zeroed; null entries are skipped.
struct GapTargets {
  __nv_bfloat16* x0 = nullptr;  // [T, H, D]
  __nv_bfloat16* x1 = nullptr;  // [T, H, D]
  __nv_bfloat16* x2 = nullptr;  // [T, H, D]
  float* lse = nullptr;         // [H, T], set to -inf in the gaps
};

// Zeroes the gap rows of one side (q or kv) of the batch; launches nothing when there are none.
void zero_gap_rows_cuda(const CuSeqlens& cu, const CuSeqlens& padded, int64_t total_rows,
                        int64_t row_elems, const GapTargets& targets, int heads,
                        const Stream& stream);

// The dK/dV kernel of AttentionBwdTiling::kTiled2D (attention_bwd_2d.cu; head dims 16, 24, 32,
// 64, 128): 8-warp CTAs with 2-D warp partitions, P^T and dS^T through shared memory; in atomic
// mode it also adds dQ into a.dq_accum (deterministic mode: the caller runs the dQ pass). `a` as
// the backward fills it (delta computed, dq_accum zeroed in atomic mode).
void launch_bwd_tiled2d(const attention_tiles::AttnArgs& a, const ThdAttentionLayout& layout,
                        int heads, int head_dim, AttentionBwdMode mode, const Stream& stream);

// Hopper wgmma kernels (attention_sm90.cu). wgmma_supported: head dim 64 or 128 on a compute
// capability 9.0 device (the kernels are built for sm_90a). The launchers take `a` as the forward /
// backward fill it (tk: rows of K and V, for the forward's TMA tensor maps); the backward one runs
// dK/dV and, when atomic_dq, adds dQ into a.dq_accum, and returns whether it used the head-major
// swizzled accumulator layout (then dq_convert_head_major_kernel turns it into dQ).
bool wgmma_supported(Device device, int head_dim);
void launch_fwd_wgmma(const attention_tiles::AttnArgs& a, int64_t tk, int max_seqlen_q, int heads,
                      int head_dim, int batch, cudaStream_t stream);
bool launch_bwd_wgmma(const attention_tiles::AttnArgs& a, int max_seqlen_kv, int heads,
                      int head_dim, int batch, bool atomic_dq, cudaStream_t stream);

}  // namespace helix::detail
