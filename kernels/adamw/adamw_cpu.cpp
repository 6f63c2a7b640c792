// AdamW: tensor-list validation and table upload, the host scalars, the CPU reference (PyTorch's
// f32 operation order, see adamw.h) and the public function that dispatches on the list's device.
#include <cmath>
#include <cstdint>

#include "kernels/adamw/adamw.h"

// The reference must round after every operation, as ATen does: no fused multiply-add contraction
// (GCC contracts by default in C++ modes on targets with FMA, e.g. aarch64).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace helix {
namespace {

void check_member(size_t i, const Tensor& param, const Tensor& t, const char* name, DType dtype) {
  HELIX_CHECK(t.defined(), "AdamWTensorList: tensor {}: {} is undefined", i, name);
  HELIX_CHECK(t.dtype() == dtype && t.shape() == param.shape(),
              "AdamWTensorList: tensor {}: expected {} {}{}, got {}", i, name, dtype_name(dtype),
              param.shape().str(), t.str());
  HELIX_CHECK(t.device() == param.device(), "AdamWTensorList: tensor {}: expected {} on {}, got {}",
              i, name, param.device().str(), t.str());
  HELIX_CHECK(t.is_contiguous(), "AdamWTensorList: tensor {}: expected a contiguous {}, got {}", i,
              name, t.str());
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

bool flag_set_cpu(const Tensor& flag) {
  if (!flag.defined()) return false;
  return flag.dtype() == DType::kI32 ? flag.data<int32_t>()[0] != 0 : flag.data<float>()[0] != 0.0f;
}

void adamw_step_cpu(const AdamWParams& p, const detail::AdamWScalars& k) {
  if (flag_set_cpu(p.nonfinite_flag)) return;
  const float gs = p.grad_scale_tensor.defined()
                       ? k.grad_scale * p.grad_scale_tensor.data<float>()[0]
                       : k.grad_scale;
  for (const AdamWTensor& t : p.tensors->tensors()) {
    float* param = t.param.data<float>();
    const float* grad = t.grad.data<float>();
    float* exp_avg = t.exp_avg.data<float>();
    float* exp_avg_sq = t.exp_avg_sq.data<float>();
    bf16_t* model = t.param_bf16.defined() ? t.param_bf16.data<bf16_t>() : nullptr;
    const int64_t n = t.param.numel();
    for (int64_t i = 0; i < n; ++i) {
      const float g = grad[i] * gs;
      float w = param[i];
      if (t.apply_weight_decay) w = w * k.decay;
      const float diff = g - exp_avg[i];
      const float m =
          k.lerp_small ? std::fma(k.lerp_w, diff, exp_avg[i]) : std::fma(k.lerp_w_minus1, diff, g);
      float v = exp_avg_sq[i] * k.beta2;
      const float gg = k.one_minus_beta2 * g;
      const float ggg = gg * g;
      v = v + ggg;
      const float root = std::sqrt(v);
      const float scaled = root / k.bc2_sqrt;
      const float denom = scaled + k.eps;
      const float num = k.neg_step_size * m;
      const float upd = num / denom;
      w = w + upd;
      param[i] = w;
      exp_avg[i] = m;
      exp_avg_sq[i] = v;
      if (model) model[i] = bf16_t::from_float(w);
    }
  }
}

}  // namespace

AdamWTensorList::AdamWTensorList(std::vector<AdamWTensor> tensors, int64_t chunk_size)
    : tensors_(std::move(tensors)) {
  std::vector<detail::AdamWTensorDesc> descs;
  std::vector<int64_t> numels;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    const AdamWTensor& t = tensors_[i];
    HELIX_CHECK(t.param.defined() && t.param.dtype() == DType::kF32,
                "AdamWTensorList: tensor {}: expected an f32 param, got {}", i, t.param.str());
    if (i == 0) device_ = t.param.device();
    HELIX_CHECK(t.param.device() == device_,
                "AdamWTensorList: tensor {}: expected param on {}, got {}", i, device_.str(),
                t.param.str());
    check_member(i, t.param, t.param, "param", DType::kF32);
    check_member(i, t.param, t.grad, "grad", DType::kF32);
    check_member(i, t.param, t.exp_avg, "exp_avg", DType::kF32);
    check_member(i, t.param, t.exp_avg_sq, "exp_avg_sq", DType::kF32);
    if (t.param_bf16.defined()) check_member(i, t.param, t.param_bf16, "param_bf16", DType::kBF16);
    numel_ += t.param.numel();
    numels.push_back(t.param.numel());
    detail::AdamWTensorDesc d{};
    d.param = t.param.data<float>();
    d.grad = t.grad.data<float>();
    d.exp_avg = t.exp_avg.data<float>();
    d.exp_avg_sq = t.exp_avg_sq.data<float>();
    d.param_bf16 = t.param_bf16.defined() ? t.param_bf16.data<bf16_t>() : nullptr;
    d.numel = t.param.numel();
    d.apply_weight_decay = t.apply_weight_decay ? 1 : 0;
    d.vec4 = aligned(d.param, 16) && aligned(d.grad, 16) && aligned(d.exp_avg, 16) &&
             aligned(d.exp_avg_sq, 16) && (d.param_bf16 == nullptr || aligned(d.param_bf16, 8));
    descs.push_back(d);
  }
  if (device_.is_cuda()) table_ = MultiTensorTable::build(descs, numels, chunk_size, device_);
}

detail::AdamWScalars detail::adamw_scalars(const AdamWParams& p) {
  HELIX_CHECK(p.step >= 1, "adamw_step: expected step >= 1 (1-based), got {}", p.step);
  HELIX_CHECK(p.beta1 >= 0 && p.beta1 < 1 && p.beta2 >= 0 && p.beta2 < 1,
              "adamw_step: expected betas in [0, 1), got ({}, {})", p.beta1, p.beta2);
  HELIX_CHECK(p.lr >= 0 && p.eps >= 0 && p.weight_decay >= 0,
              "adamw_step: expected lr, eps, weight_decay >= 0, got {}, {}, {}", p.lr, p.eps,
              p.weight_decay);
  const double step = static_cast<double>(p.step);
  const double bias_correction1 = 1 - std::pow(p.beta1, step);
  const double bias_correction2 = 1 - std::pow(p.beta2, step);
  const double step_size = p.lr / bias_correction1;
  AdamWScalars k{};
  k.grad_scale = p.grad_scale;
  k.decay = static_cast<float>(1 - p.lr * p.weight_decay);
  k.lerp_w = static_cast<float>(1 - p.beta1);
  k.lerp_w_minus1 = k.lerp_w - 1.0f;
  k.lerp_small = std::abs(k.lerp_w) < 0.5f ? 1 : 0;
  k.beta2 = static_cast<float>(p.beta2);
  k.one_minus_beta2 = static_cast<float>(1 - p.beta2);
  k.bc2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  k.eps = static_cast<float>(p.eps);
  k.neg_step_size = static_cast<float>(-step_size);
  return k;
}

void adamw_step(const AdamWParams& p, const Stream& s) {
  HELIX_CHECK(p.tensors != nullptr, "adamw_step: expected a tensor list, got none");
  const Device dev = p.tensors->device();
  if (p.grad_scale_tensor.defined()) {
    HELIX_CHECK(p.grad_scale_tensor.dtype() == DType::kF32 && p.grad_scale_tensor.numel() == 1 &&
                    p.grad_scale_tensor.device() == dev,
                "adamw_step: expected grad_scale_tensor f32[1] on {}, got {}", dev.str(),
                p.grad_scale_tensor.str());
  }
  if (p.nonfinite_flag.defined()) {
    HELIX_CHECK(
        (p.nonfinite_flag.dtype() == DType::kI32 || p.nonfinite_flag.dtype() == DType::kF32) &&
            p.nonfinite_flag.numel() == 1 && p.nonfinite_flag.device() == dev,
        "adamw_step: expected nonfinite_flag i32[1] or f32[1] on {}, got {}", dev.str(),
        p.nonfinite_flag.str());
  }
  const detail::AdamWScalars k = detail::adamw_scalars(p);
  if (p.tensors->tensors().empty()) return;
  if (dev.is_cpu()) {
    adamw_step_cpu(p, k);
    return;
  }
#if HELIX_WITH_CUDA
  detail::adamw_step_cuda(p, k, s);
#else
  HELIX_FAIL("adamw_step: tensors on {}, but helix was built without CUDA", dev.str());
#endif
}

}  // namespace helix
