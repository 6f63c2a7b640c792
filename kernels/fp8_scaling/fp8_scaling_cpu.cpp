// FP8 delayed scaling: validation and dispatch (both devices), and the CPU reference of the update
// and of the amax canonicalisation (plain loops over the flat buffer).
#include <cmath>
#include <limits>

#include "kernels/common/checks.h"
#include "kernels/fp8_scaling/fp8_scaling.h"

namespace helix {

float detail::fp8_scale_from_amax(float amax, float fp8_max, int margin, float previous) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return previous;
  const float s = std::ldexp(fp8_max / amax, -margin);
  return std::isfinite(s) ? s : std::numeric_limits<float>::max();
}

void detail::fp8_scaling_update_cpu(const Fp8ScalingUpdateParams& p) {
  const int64_t n = p.amax.numel(), len = p.history.dim(0);
  float* amax = p.amax.data<float>();
  float* hist = p.history.data<float>();
  float* scale = p.scale.data<float>();
  float* scale_inv = p.scale_inv.data<float>();
  const float* fmax = p.fp8_max.data<float>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = len - 1; j >= 1; --j) hist[j * n + i] = hist[(j - 1) * n + i];
    hist[i] = amax[i];
    float a = hist[i];
    if (p.algo == Fp8AmaxAlgo::kMax)
      for (int64_t j = 1; j < len; ++j) {  // NaN wins, then +inf, then the largest number
        const float h = hist[j * n + i];
        if (std::isnan(h) || h > a) a = std::isnan(a) ? a : h;
      }
    const float s = fp8_scale_from_amax(a, fmax[i], p.margin, scale[i]);
    scale[i] = s;
    scale_inv[i] = 1.0f / s;
    amax[i] = 0.0f;
  }
}

void detail::fp8_amax_canonicalize_cpu(const Tensor& amax) {
  float* a = amax.data<float>();
  for (int64_t i = 0; i < amax.numel(); ++i)
    a[i] = std::isnan(a[i]) ? std::numeric_limits<float>::infinity() : std::fabs(a[i]);
}

namespace {
void check_vec(const Tensor& t, const char* name, int64_t n) {
  checks::shape_dtype("fp8_scaling_update", t, name, Shape{n}, DType::kF32);
}
}  // namespace

void fp8_scaling_update(const Fp8ScalingUpdateParams& p, const Stream& stream) {
  const char* op = "fp8_scaling_update";
  HELIX_CHECK(p.amax.defined() && p.amax.ndim() == 1 && p.amax.dtype() == DType::kF32,
              "{}: expected amax f32 [n], got {}", op, p.amax.defined() ? p.amax.str() : "undefined");
  const int64_t n = p.amax.numel();
  HELIX_CHECK(p.history.defined() && p.history.ndim() == 2 && p.history.dim(1) == n &&
                  p.history.dim(0) >= 1 && p.history.dtype() == DType::kF32,
              "{}: expected history f32 [len >= 1, {}], got {}", op, n,
              p.history.defined() ? p.history.str() : "undefined");
  check_vec(p.scale, "scale", n);
  check_vec(p.scale_inv, "scale_inv", n);
  check_vec(p.fp8_max, "fp8_max", n);
  HELIX_CHECK(p.margin >= 0 && p.margin <= 64, "{}: expected margin in [0, 64], got {}", op, p.margin);
  checks::same_device_contiguous(op, p.amax,
                                 {{&p.history, "history"}, {&p.scale, "scale"}, {&p.scale_inv, "scale_inv"},
                                  {&p.fp8_max, "fp8_max"}});
  if (p.amax.is_cpu()) return detail::fp8_scaling_update_cpu(p);
#if HELIX_WITH_CUDA
  HELIX_CHECK(stream.device() == p.amax.device(), "{}: expected a stream on {}, got one on {}", op,
              p.amax.device().str(), stream.device().str());
  detail::fp8_scaling_update_cuda(p, stream);
#else
  (void)stream;
  HELIX_FAIL("fp8_scaling_update: CUDA tensors given, but helix was built without CUDA");
#endif
}

void fp8_amax_canonicalize(const Tensor& amax, const Stream& stream) {
  HELIX_CHECK(amax.defined() && amax.ndim() == 1 && amax.dtype() == DType::kF32 && amax.is_contiguous(),
              "fp8_amax_canonicalize: expected amax f32 [n] contiguous, got {}",
              amax.defined() ? amax.str() : "undefined");
  if (amax.is_cpu()) return detail::fp8_amax_canonicalize_cpu(amax);
#if HELIX_WITH_CUDA
  detail::fp8_amax_canonicalize_cuda(amax, stream);
#else
  (void)stream;
  HELIX_FAIL("fp8_amax_canonicalize: CUDA tensors given, but helix was built without CUDA");
#endif
}

}  // namespace helix
