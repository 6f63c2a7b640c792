#pragma once
// The fused QKV projection writes [T, 3H] = [q | k | v] per token; attention wants three contiguous
// [T, H] tensors. qkv_split copies the three column blocks out; qkv_join_grad accumulates the three
// gradients back into the [T, 3H] gradient (+=, the autograd contract). f32 or bf16, same dtype.
#include "core/device.h"
#include "core/tensor.h"

namespace helix {

struct QkvSplitParams {
  Tensor qkv;  // [T, 3H]
  Tensor q;    // [T, H] written
  Tensor k;    // [T, H] written
  Tensor v;    // [T, H] written
};
void qkv_split(const QkvSplitParams& p, const Stream& stream);

struct QkvJoinGradParams {
  Tensor dq;    // [T, H]
  Tensor dk;    // [T, H]
  Tensor dv;    // [T, H]
  Tensor dqkv;  // [T, 3H] accumulated: dqkv[:, 0:H] += dq, [H:2H] += dk, [2H:3H] += dv
};
void qkv_join_grad(const QkvJoinGradParams& p, const Stream& stream);

namespace detail {
#if HELIX_WITH_CUDA
void qkv_split_cuda(const QkvSplitParams& p, const Stream& stream);
void qkv_join_grad_cuda(const QkvJoinGradParams& p, const Stream& stream);
#endif
}  // namespace detail

}  // namespace helix
