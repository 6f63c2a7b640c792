#pragma once
// The fused QKV projection writes [T, 3H] = [q | k | v] per token; attention wants three contiguous
// [T, H] tensors. qkv_split copies the three column blocks out; qkv_join_grad accumulates the three
// gradients back into the [T, 3H] gradient (+=, the autograd contract). f32 or bf16, same dtype.
// Optionally the rotary embedding is fused in (QkvRotary): the split rotates q and k while copying
// them out, the join rotates dq and dk back while accumulating, bit-identical to split-then-
// rotary_fwd and rotary_bwd-then-join (same rotary_math.h arithmetic), saving rotary's read+write.
#include "core/device.h"
#include "core/tensor.h"
#include "kernels/rotary/rotary.h"

namespace helix {

// Rotary embedding fused into the split / join. Off when head_dim == 0. When on, q and k (dq, dk)
// are viewed as [T, H/D, D] heads and rotated exactly as rotary_fwd (split) or rotary_bwd (join)
// would with the same positions and base; every rotary_fwd check applies.
struct QkvRotary {
  int64_t head_dim = 0;  // D: even, <= 256, dividing H; 0 = no rotation
  RotaryPositions pos;   // cu_seqlens [b+1] i32 or positions [T] i32 (exactly one), on qkv's device
  float base = 10000.f;
  bool enabled() const { return head_dim != 0; }
};

struct QkvSplitParams {
  Tensor qkv;  // [T, 3H]
  Tensor q;    // [T, H] written (rotated when rotary is on)
  Tensor k;    // [T, H] written (rotated when rotary is on)
  Tensor v;    // [T, H] written
  QkvRotary rotary = {};  // optional: q = R q_in, k = R k_in
};
void qkv_split(const QkvSplitParams& p, const Stream& stream);

struct QkvJoinGradParams {
  Tensor dq;    // [T, H] (gradient w.r.t. the rotated q when rotary is on; not modified)
  Tensor dk;    // [T, H] (likewise for k)
  Tensor dv;    // [T, H]
  Tensor dqkv;  // [T, 3H] accumulated: dqkv[:, 0:H] += dq, [H:2H] += dk, [2H:3H] += dv
                // (with rotary: += R^T dq, R^T dk, each rounded to the dtype before the add)
  QkvRotary rotary = {};  // optional inverse rotation of dq, dk
};
void qkv_join_grad(const QkvJoinGradParams& p, const Stream& stream);

namespace detail {
#if HELIX_WITH_CUDA
void qkv_split_cuda(const QkvSplitParams& p, const Stream& stream);
void qkv_join_grad_cuda(const QkvJoinGradParams& p, const Stream& stream);
#endif
}  // namespace detail

}  // namespace helix
