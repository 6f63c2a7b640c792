#pragma once
// Global gradient norm over many tensors in one launch (multi-tensor apply over a device table
// built once per list): each block sums the squares of one chunk in fp32 into its own partial, then
// a one-block kernel adds the partials in a fixed order (in double). No float atomics: the result
// is bitwise the same on every run. The output is the sum of squares, f32 [1]; the caller
// all-reduces it across ranks and takes the square root. grad_clip_coef turns the reduced sum into
// the clip coefficient on the device, so clipping needs no host synchronisation:
//   grad_norm_sumsq -> (all-reduce SUM of sumsq, all-reduce MAX of the flag) -> grad_clip_coef
//     -> adamw_step(grad_scale_tensor = clip_coef, nonfinite_flag = flag)
//
// Non-finite flag: set to 1 when the sum of squares is not finite, i.e. when any element is inf or
// NaN (squares are never negative, so nothing cancels) or the f32 sum overflows. The flag is only
// ever set, never cleared, so several checks (loss, gradients) can share it: zero it at the start
// of a step.
#include <cstdint>
#include <vector>

#include "core/device.h"
#include "core/tensor.h"
#include "kernels/elementwise/multi_tensor.h"

namespace helix {

namespace detail {
// Row of the device table of a GradNormTensorList.
struct GradNormTensorDesc {
  const void* data;
  int64_t numel;
  int32_t is_bf16;  // 0: f32 elements, 1: bf16 elements
  int32_t vec4;     // 1: pointer aligned for 4-element vector loads
};
}  // namespace detail

// Gradient tensors (f32 or bf16, contiguous, one device), validated once; on CUDA uploaded once.
class GradNormTensorList {
 public:
  static constexpr int64_t kDefaultChunkSize = 16384;  // elements per block

  GradNormTensorList() = default;
  explicit GradNormTensorList(std::vector<Tensor> grads, int64_t chunk_size = kDefaultChunkSize);

  Device device() const { return device_; }
  const std::vector<Tensor>& tensors() const { return grads_; }
  const MultiTensorTable& table() const { return table_; }  // CUDA lists only

 private:
  std::vector<Tensor> grads_;
  MultiTensorTable table_;
  Device device_;
};

struct GradNormParams {
  const GradNormTensorList* grads = nullptr;
  Tensor sumsq;           // [1] f32 out: sum over all elements of all tensors of x^2 (overwritten)
  Tensor nonfinite_flag;  // [1] i32 or f32, or undefined: set to 1 when sumsq is not finite
};
void grad_norm_sumsq(const GradNormParams& p, const Stream& s);

// PyTorch's clip_grad_norm_ coefficient from the (all-reduced) sum of squares, in f32:
//   norm = sqrt(sumsq); clip_coef = min(f32(max_norm) / (norm + f32(1e-6)), 1)
struct GradClipParams {
  Tensor sumsq;           // [1] f32 in: global sum of squares
  Tensor clip_coef;       // [1] f32 out: factor for the gradients (pass to adamw grad_scale_tensor)
  Tensor norm;            // [1] f32 out, optional: the global norm, for logging
  Tensor nonfinite_flag;  // [1] i32 or f32, or undefined: set to 1 when sumsq is not finite
  double max_norm = 1.0;
};
void grad_clip_coef(const GradClipParams& p, const Stream& s);

namespace detail {
#if HELIX_WITH_CUDA
void grad_norm_sumsq_cuda(const GradNormParams& p, const Stream& s);
void grad_clip_coef_cuda(const GradClipParams& p, const Stream& s);
#endif
}  // namespace detail

}  // namespace helix
