// GELU: parameter validation, device dispatch and the CPU reference (the fp32 formulas of
// gelu_math.h, one rounding per output).
#include <algorithm>

#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/gelu/gelu.h"
#include "kernels/gelu/gelu_math.h"

namespace helix {
namespace {

using elem::from_float;
using elem::to_float;

constexpr const char* kFwd = "gelu_fwd";
constexpr const char* kBwd = "gelu_bwd";

void validate(const GeluFwdParams& p) {
  HELIX_CHECK(p.x.defined(), "{}: expected an input x, got undefined", kFwd);
  elem::visit_f32_bf16(p.x.dtype(), kFwd, "x", [](auto) {});
  checks::same_device_contiguous(
      kFwd, p.x, {{&p.x, "x"}, {&p.y, "y"}, {&p.y_scale, "y_scale"}, {&p.y_amax, "y_amax"}});
  HELIX_CHECK(p.y.defined() && p.y.shape() == p.x.shape(), "{}: expected y of shape {}, got {}",
              kFwd, p.x.shape().str(), p.y.str());
  elem::visit_output(p.y.dtype(), kFwd, "y", [](auto) {});
  if (dtype_is_fp8(p.y.dtype())) {
    checks::shape_dtype(kFwd, p.y_scale, "y_scale (needed by an fp8 y)", {1}, DType::kF32);
  } else {
    HELIX_CHECK(!p.y_scale.defined(), "{}: expected no y_scale for a {} y, got {}", kFwd,
                dtype_name(p.y.dtype()), p.y_scale.str());
  }
  if (p.y_amax.defined()) checks::shape_dtype(kFwd, p.y_amax, "y_amax", {1}, DType::kF32);
}

void validate(const GeluBwdParams& p) {
  HELIX_CHECK(p.x.defined(), "{}: expected an input x, got undefined", kBwd);
  elem::visit_f32_bf16(p.x.dtype(), kBwd, "x", [](auto) {});
  checks::same_device_contiguous(kBwd, p.x, {{&p.x, "x"}, {&p.dy, "dy"}, {&p.dx, "dx"}});
  checks::shape_dtype(kBwd, p.dy, "dy", p.x.shape(), p.x.dtype());
  checks::shape_dtype(kBwd, p.dx, "dx", p.x.shape(), p.x.dtype());
}

template <typename X, typename Y>
void fwd_cpu(const GeluFwdParams& p) {
  const int64_t n = p.x.numel();
  const X* x = p.x.data<X>();
  Y* y = p.y.data<Y>();
  const float scale = p.y_scale.defined() ? p.y_scale.data<float>()[0] : 1.f;
  uint32_t amax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float g = gelu_math::value(to_float(x[i]));
    amax = std::max(amax, elem::abs_bits(g));
    y[i] = from_float<Y>(elem::kIsFp8<Y> ? g * scale : g);
  }
  if (p.y_amax.defined()) p.y_amax.data<float>()[0] = bits_float(amax);
}

template <typename X>
void bwd_cpu(const GeluBwdParams& p) {
  const int64_t n = p.x.numel();
  const X* x = p.x.data<X>();
  const X* dy = p.dy.data<X>();
  X* dx = p.dx.data<X>();
  for (int64_t i = 0; i < n; ++i) {
    float v = to_float(dy[i]) * gelu_math::grad(to_float(x[i]));
    if (p.accumulate_dx) v += to_float(dx[i]);
    dx[i] = from_float<X>(v);
  }
}

}  // namespace

void detail::gelu_fwd_cpu(const GeluFwdParams& p) {
  elem::visit_f32_bf16(p.x.dtype(), kFwd, "x", [&](auto xt) {
    elem::visit_output(p.y.dtype(), kFwd, "y",
                       [&](auto yt) { fwd_cpu<decltype(xt), decltype(yt)>(p); });
  });
}

void detail::gelu_bwd_cpu(const GeluBwdParams& p) {
  elem::visit_f32_bf16(p.x.dtype(), kBwd, "x", [&](auto xt) { bwd_cpu<decltype(xt)>(p); });
}

void gelu_fwd(const GeluFwdParams& p, const Stream& stream) {
  validate(p);
  if (p.x.is_cpu()) return detail::gelu_fwd_cpu(p);
#if HELIX_WITH_CUDA
  detail::gelu_fwd_cuda(p, stream);
#else
  HELIX_FAIL("{}: x is on {}, but helix was built without CUDA", kFwd, p.x.device().str());
#endif
}

void gelu_bwd(const GeluBwdParams& p, const Stream& stream) {
  validate(p);
  if (p.x.is_cpu()) return detail::gelu_bwd_cpu(p);
#if HELIX_WITH_CUDA
  detail::gelu_bwd_cuda(p, stream);
#else
  HELIX_FAIL("{}: x is on {}, but helix was built without CUDA", kBwd, p.x.device().str());
#endif
}

}  // namespace helix
