// Gradient norm: list validation and table upload, CPU reference (squares and sum in double) and
// the public functions that dispatch on the device.
#include <cmath>
#include <cstdint>

#include "kernels/grad_norm/grad_norm.h"

namespace helix {
namespace {

void check_scalar(const char* op, const Tensor& t, const char* name, Device dev, bool flag) {
  if (flag) {
    HELIX_CHECK(
        t.defined() && (t.dtype() == DType::kI32 || t.dtype() == DType::kF32) && t.numel() == 1,
        "{}: expected {} i32[1] or f32[1], got {}", op, name, t.str());
  } else {
    HELIX_CHECK(t.defined() && t.dtype() == DType::kF32 && t.numel() == 1,
                "{}: expected {} f32[1], got {}", op, name, t.str());
  }
  HELIX_CHECK(t.device() == dev, "{}: expected {} on {}, got {}", op, name, dev.str(), t.str());
}

void set_flag_cpu(const Tensor& flag) {
  if (flag.dtype() == DType::kI32)
    flag.data<int32_t>()[0] = 1;
  else
    flag.data<float>()[0] = 1.0f;
}

void grad_norm_sumsq_cpu(const GradNormParams& p) {
  double acc = 0;
  for (const Tensor& t : p.grads->tensors()) {
    const int64_t n = t.numel();
    if (t.dtype() == DType::kF32) {
      const float* x = t.data<float>();
      for (int64_t i = 0; i < n; ++i) acc += static_cast<double>(x[i]) * x[i];
    } else {
      const bf16_t* x = t.data<bf16_t>();
      for (int64_t i = 0; i < n; ++i) {
        const double v = x[i].to_float();
        acc += v * v;
      }
    }
  }
  const float sumsq = static_cast<float>(acc);
  p.sumsq.data<float>()[0] = sumsq;
  if (p.nonfinite_flag.defined() && !std::isfinite(sumsq)) set_flag_cpu(p.nonfinite_flag);
}

void grad_clip_coef_cpu(const GradClipParams& p) {
  const float sumsq = p.sumsq.data<float>()[0];
  const float norm = std::sqrt(sumsq);
  const float denom = norm + static_cast<float>(1e-6);
  const float coef = (1.0f / denom) * static_cast<float>(p.max_norm);  // max_norm / tensor in torch
  p.clip_coef.data<float>()[0] = coef > 1.0f ? 1.0f : coef;  // clamp(max=1), NaN stays NaN
  if (p.norm.defined()) p.norm.data<float>()[0] = norm;
  if (p.nonfinite_flag.defined() && !std::isfinite(sumsq)) set_flag_cpu(p.nonfinite_flag);
}

}  // namespace

GradNormTensorList::GradNormTensorList(std::vector<Tensor> grads, int64_t chunk_size)
    : grads_(std::move(grads)) {
  std::vector<detail::GradNormTensorDesc> descs;
  std::vector<int64_t> numels;
  for (size_t i = 0; i < grads_.size(); ++i) {
    const Tensor& t = grads_[i];
    HELIX_CHECK(t.defined() && (t.dtype() == DType::kF32 || t.dtype() == DType::kBF16),
                "GradNormTensorList: tensor {}: expected f32 or bf16, got {}", i, t.str());
    if (i == 0) device_ = t.device();
    HELIX_CHECK(t.device() == device_, "GradNormTensorList: tensor {}: expected it on {}, got {}",
                i, device_.str(), t.str());
    HELIX_CHECK(t.is_contiguous(), "GradNormTensorList: tensor {}: expected contiguous, got {}", i,
                t.str());
    const bool bf16 = t.dtype() == DType::kBF16;
    const uintptr_t align = bf16 ? 8 : 16;
    descs.push_back({t.data_ptr(), t.numel(), bf16 ? 1 : 0,
                     reinterpret_cast<uintptr_t>(t.data_ptr()) % align == 0 ? 1 : 0});
    numels.push_back(t.numel());
  }
  if (device_.is_cuda()) table_ = MultiTensorTable::build(descs, numels, chunk_size, device_);
}

void grad_norm_sumsq(const GradNormParams& p, const Stream& s) {
  const char* op = "grad_norm_sumsq";
  HELIX_CHECK(p.grads != nullptr, "{}: expected a gradient list, got none", op);
  const Device dev = p.grads->tensors().empty() ? p.sumsq.device() : p.grads->device();
  check_scalar(op, p.sumsq, "sumsq", dev, false);
  if (p.nonfinite_flag.defined()) check_scalar(op, p.nonfinite_flag, "nonfinite_flag", dev, true);
  if (dev.is_cpu()) {
    grad_norm_sumsq_cpu(p);
    return;
  }
#if HELIX_WITH_CUDA
  detail::grad_norm_sumsq_cuda(p, s);
#else
  HELIX_FAIL("{}: tensors on {}, but helix was built without CUDA", op, dev.str());
#endif
}

void grad_clip_coef(const GradClipParams& p, const Stream& s) {
  const char* op = "grad_clip_coef";
  HELIX_CHECK(p.sumsq.defined(), "{}: expected sumsq f32[1], got undefined", op);
  const Device dev = p.sumsq.device();
  check_scalar(op, p.sumsq, "sumsq", dev, false);
  check_scalar(op, p.clip_coef, "clip_coef", dev, false);
  if (p.norm.defined()) check_scalar(op, p.norm, "norm", dev, false);
  if (p.nonfinite_flag.defined()) check_scalar(op, p.nonfinite_flag, "nonfinite_flag", dev, true);
  HELIX_CHECK(p.max_norm > 0, "{}: expected max_norm > 0, got {}", op, p.max_norm);
  if (dev.is_cpu()) {
    grad_clip_coef_cpu(p);
    return;
  }
#if HELIX_WITH_CUDA
  detail::grad_clip_coef_cuda(p, s);
#else
  HELIX_FAIL("{}: tensors on {}, but helix was built without CUDA", op, dev.str());
#endif
}

}  // namespace helix
