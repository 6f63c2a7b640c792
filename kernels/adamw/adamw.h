#pragma once
// AdamW over many tensors in one launch (multi-tensor apply): the tensors of an optimizer are
// checked and put into a device table of per-tensor pointers and sizes once (AdamWTensorList);
// every step is a single kernel whose blocks each update one chunk of one tensor. fp32 master
// weights and state, an optional bf16 model copy, a per-tensor weight-decay mask, a grad scale
// (host and/or device factor, e.g. the clip coefficient) and a device non-finite flag that turns
// the whole step into a no-op.
//
// The math is PyTorch's torch.optim.AdamW step (foreach=False, amsgrad=False, maximize=False), one
// fp32 operation at a time in the order ATen evaluates it for f32 tensors. Scalars are computed on
// the host in double, as Python does, and rounded to f32 once (f32(.) below). With t = step and
// w = f32(1 - beta1), per element:
//   g = grad * s                      s = grad_scale [* grad_scale_tensor]
//   p = p * f32(1 - lr*wd)            param.mul_(1 - lr * weight_decay), apply_weight_decay only
//   m = fma(w, g - m, m)              exp_avg.lerp_(grad, 1 - beta1) for w < 0.5, and
//       fma(w - 1, g - m, g)          for w >= 0.5 (ATen's vectorised CPU and CUDA lerp form)
//   v = v * f32(beta2)                exp_avg_sq.mul_(beta2)
//   v = v + (f32(1 - beta2) * g) * g    .addcmul_(grad, grad, value=1 - beta2)
//   d = sqrt(v) / f32(sqrt(1 - beta2^t)) + f32(eps)          denom
//   p = p + (f32(-lr / (1 - beta1^t)) * m) / d               param.addcdiv_(exp_avg, denom,
//                                                                           value=-step_size)
//   p_bf16 = bf16(p)                  round to nearest even
// The CUDA kernel uses the same operations with explicit round-to-nearest intrinsics (no fma
// contraction), so CPU and CUDA results are bitwise equal.
//
// Skipped steps: when nonfinite_flag is nonzero nothing is written (parameters, moments and the
// bf16 copy keep their values). PyTorch does not count a skipped step in state['step']; neither
// should the caller: `step` is the number of applied updates including this one.
#include <cstdint>
#include <vector>

#include "core/device.h"
#include "core/tensor.h"
#include "kernels/elementwise/multi_tensor.h"

namespace helix {

// One parameter and its optimizer state. All tensors contiguous, on one device, with the same
// shape.
struct AdamWTensor {
  Tensor param;       // [...] f32 master weight, updated in place
  Tensor grad;        // [...] f32, read only
  Tensor exp_avg;     // [...] f32 first moment, updated in place
  Tensor exp_avg_sq;  // [...] f32 second moment, updated in place
  Tensor param_bf16;  // [...] bf16 model copy written from the updated master, or undefined
  bool apply_weight_decay = true;  // false for biases and LayerNorm weights
};

namespace detail {
// Row of the device table of an AdamWTensorList.
struct AdamWTensorDesc {
  float* param;
  const float* grad;
  float* exp_avg;
  float* exp_avg_sq;
  bf16_t* param_bf16;  // nullptr when there is no bf16 copy
  int64_t numel;
  int32_t apply_weight_decay;  // 1: apply decoupled weight decay
  int32_t vec4;  // 1: f32 pointers 16-byte and bf16 pointer 8-byte aligned (vector access)
};
}  // namespace detail

// The tensors of one optimizer, validated once; on CUDA also uploaded once as a multi-tensor table.
class AdamWTensorList {
 public:
  static constexpr int64_t kDefaultChunkSize = 16384;  // elements per block

  AdamWTensorList() = default;
  explicit AdamWTensorList(std::vector<AdamWTensor> tensors,
                           int64_t chunk_size = kDefaultChunkSize);

  Device device() const { return device_; }
  const std::vector<AdamWTensor>& tensors() const { return tensors_; }
  const MultiTensorTable& table() const { return table_; }  // CUDA lists only
  int64_t numel() const { return numel_; }

 private:
  std::vector<AdamWTensor> tensors_;
  MultiTensorTable table_;
  Device device_;
  int64_t numel_ = 0;
};

struct AdamWParams {
  const AdamWTensorList* tensors = nullptr;
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;  // decoupled; only tensors with apply_weight_decay
  int64_t step = 1;         // 1-based count of applied updates, this one included (bias correction)
  float grad_scale = 1.0f;  // grads are multiplied by this ...
  Tensor grad_scale_tensor;  // [1] f32 on the list's device, or undefined: ... and by this
  Tensor nonfinite_flag;     // [1] i32 or f32 on the list's device, or undefined: nonzero = skip
};

// One AdamW step over every tensor of p.tensors (CPU reference or one CUDA launch).
void adamw_step(const AdamWParams& p, const Stream& s);

namespace detail {
// The f32 scalars of one step, computed on the host in double and rounded once (shared by both
// paths).
struct AdamWScalars {
  float grad_scale;     // host factor
  float decay;          // 1 - lr * weight_decay
  float lerp_w;         // 1 - beta1
  float lerp_w_minus1;  // f32(1 - beta1) - 1
  int32_t lerp_small;   // |lerp_w| < 0.5
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
};
AdamWScalars adamw_scalars(const AdamWParams& p);

#if HELIX_WITH_CUDA
void adamw_step_cuda(const AdamWParams& p, const AdamWScalars& k, const Stream& s);
#endif
}  // namespace detail

}  // namespace helix
