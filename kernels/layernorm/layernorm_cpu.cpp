// LayerNorm: parameter validation, device dispatch and the CPU reference (fp32 math, double sums).
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/layernorm/layernorm.h"

namespace helix {
namespace {

using elem::abs_bits;
using elem::from_float;
using elem::to_float;

constexpr const char* kFwd = "layernorm_fwd";
constexpr const char* kBwd = "layernorm_bwd";

void validate(const LayerNormFwdParams& p) {
  HELIX_CHECK(p.x.defined() && p.x.ndim() == 2, "{}: expected x of shape [T, C], got {}", kFwd,
              p.x.str());
  const int64_t T = p.x.dim(0), C = p.x.dim(1);
  const DType xt = p.x.dtype();
  elem::visit_f32_bf16(xt, kFwd, "x", [](auto) {});
  HELIX_CHECK(C > 0, "{}: expected C > 0, got x {}", kFwd, p.x.str());
  checks::same_device_contiguous(kFwd, p.x,
                                 {{&p.x, "x"},
                                  {&p.residual, "residual"},
                                  {&p.residual_out, "residual_out"},
                                  {&p.gamma, "gamma"},
                                  {&p.beta, "beta"},
                                  {&p.y, "y"},
                                  {&p.y_scale, "y_scale"},
                                  {&p.y_amax, "y_amax"},
                                  {&p.y_t, "y_t"},
                                  {&p.mean, "mean"},
                                  {&p.rstd, "rstd"}});
  HELIX_CHECK(
      p.residual.defined() == p.residual_out.defined(),
      "{}: expected residual and residual_out both defined or both undefined, got {} and {}", kFwd,
      p.residual.str(), p.residual_out.str());
  if (p.residual.defined()) {
    checks::shape_dtype(kFwd, p.residual, "residual", {T, C}, xt);
    checks::shape_dtype(kFwd, p.residual_out, "residual_out", {T, C}, xt);
  }
  HELIX_CHECK(p.gamma.defined(), "{}: expected gamma [{}], got undefined", kFwd, C);
  elem::visit_f32_bf16(p.gamma.dtype(), kFwd, "gamma", [](auto) {});
  checks::shape_dtype(kFwd, p.gamma, "gamma", {C}, p.gamma.dtype());
  checks::shape_dtype(kFwd, p.beta, "beta", {C}, p.gamma.dtype());
  HELIX_CHECK(p.y.defined() && p.y.shape() == Shape({T, C}),
              "{}: expected y of shape [{}, {}], got {}", kFwd, T, C, p.y.str());
  elem::visit_output(p.y.dtype(), kFwd, "y", [](auto) {});
  if (dtype_is_fp8(p.y.dtype())) {
    checks::shape_dtype(kFwd, p.y_scale, "y_scale (needed by an fp8 y)", {1}, DType::kF32);
  } else {
    HELIX_CHECK(!p.y_scale.defined(), "{}: expected no y_scale for a {} y, got {}", kFwd,
                dtype_name(p.y.dtype()), p.y_scale.str());
  }
  if (p.y_amax.defined()) checks::shape_dtype(kFwd, p.y_amax, "y_amax", {1}, DType::kF32);
  if (p.y_t.defined()) {
    HELIX_CHECK(dtype_is_fp8(p.y.dtype()), "{}: expected y_t only with an fp8 y, got y {}", kFwd, p.y.str());
    checks::shape_dtype(kFwd, p.y_t, "y_t", {C, T}, p.y.dtype());
  }
  if (p.mean.defined()) checks::shape_dtype(kFwd, p.mean, "mean", {T}, DType::kF32);
  if (p.rstd.defined()) checks::shape_dtype(kFwd, p.rstd, "rstd", {T}, DType::kF32);
  HELIX_CHECK(p.eps >= 0.f, "{}: expected eps >= 0, got {}", kFwd, p.eps);
}

void validate(const LayerNormBwdParams& p) {
  HELIX_CHECK(p.x.defined() && p.x.ndim() == 2, "{}: expected x of shape [T, C], got {}", kBwd,
              p.x.str());
  const int64_t T = p.x.dim(0), C = p.x.dim(1);
  const DType xt = p.x.dtype();
  elem::visit_f32_bf16(xt, kBwd, "x", [](auto) {});
  HELIX_CHECK(C > 0, "{}: expected C > 0, got x {}", kBwd, p.x.str());
  checks::same_device_contiguous(kBwd, p.x,
                                 {{&p.x, "x"},
                                  {&p.gamma, "gamma"},
                                  {&p.mean, "mean"},
                                  {&p.rstd, "rstd"},
                                  {&p.dy, "dy"},
                                  {&p.dx, "dx"},
                                  {&p.dgamma, "dgamma"},
                                  {&p.dbeta, "dbeta"}});
  HELIX_CHECK(p.gamma.defined(), "{}: expected gamma [{}], got undefined", kBwd, C);
  elem::visit_f32_bf16(p.gamma.dtype(), kBwd, "gamma", [](auto) {});
  checks::shape_dtype(kBwd, p.gamma, "gamma", {C}, p.gamma.dtype());
  checks::shape_dtype(kBwd, p.mean, "mean", {T}, DType::kF32);
  checks::shape_dtype(kBwd, p.rstd, "rstd", {T}, DType::kF32);
  checks::shape_dtype(kBwd, p.dy, "dy", {T, C}, xt);
  if (p.dx.defined()) checks::shape_dtype(kBwd, p.dx, "dx", {T, C}, xt);
  if (p.dgamma.defined()) checks::shape_dtype(kBwd, p.dgamma, "dgamma", {C}, DType::kF32);
  if (p.dbeta.defined()) checks::shape_dtype(kBwd, p.dbeta, "dbeta", {C}, DType::kF32);
}

template <typename X, typename W, typename Y>
void fwd_cpu(const LayerNormFwdParams& p) {
  const int64_t T = p.x.dim(0), C = p.x.dim(1);
  const X* x = p.x.data<X>();
  const X* r = p.residual.defined() ? p.residual.data<X>() : nullptr;
  X* s_out = p.residual_out.defined() ? p.residual_out.data<X>() : nullptr;
  const W* g = p.gamma.data<W>();
  const W* b = p.beta.data<W>();
  Y* y = p.y.data<Y>();
  const float scale = p.y_scale.defined() ? p.y_scale.data<float>()[0] : 1.f;
  uint32_t amax = 0;
  std::vector<float> s(static_cast<size_t>(C));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * C;
    double sum = 0;
    for (int64_t c = 0; c < C; ++c) {
      float v = to_float(x[o + c]);
      if (r) {
        const X sv = from_float<X>(v + to_float(r[o + c]));
        s_out[o + c] = sv;
        v = to_float(sv);
      }
      s[c] = v;
      sum += v;
    }
    const double mean_d = sum / static_cast<double>(C);
    double sq = 0;
    for (int64_t c = 0; c < C; ++c) sq += (s[c] - mean_d) * (s[c] - mean_d);
    const float mean = static_cast<float>(mean_d);
    const float rstd = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(C) + p.eps));
    for (int64_t c = 0; c < C; ++c) {
      const float v = (s[c] - mean) * rstd * to_float(g[c]) + to_float(b[c]);
      amax = std::max(amax, abs_bits(v));
      y[o + c] = from_float<Y>(elem::kIsFp8<Y> ? v * scale : v);
    }
    if (p.mean.defined()) p.mean.data<float>()[t] = mean;
    if (p.rstd.defined()) p.rstd.data<float>()[t] = rstd;
  }
  if (p.y_t.defined()) {
    Y* yt = p.y_t.data<Y>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) yt[c * T + t] = y[t * C + c];
  }
  if (p.y_amax.defined()) {
    float* out = p.y_amax.data<float>();
    out[0] = bits_float(p.accumulate_amax ? std::max(amax, float_bits(out[0])) : amax);
  }
}

template <typename X, typename W>
void bwd_cpu(const LayerNormBwdParams& p) {
  const int64_t T = p.x.dim(0), C = p.x.dim(1);
  const X* x = p.x.data<X>();
  const X* dy = p.dy.data<X>();
  X* dx = p.dx.defined() ? p.dx.data<X>() : nullptr;
  const W* g = p.gamma.data<W>();
  const float* mean = p.mean.data<float>();
  const float* rstd = p.rstd.data<float>();
  std::vector<double> dg(static_cast<size_t>(C), 0.0), db(static_cast<size_t>(C), 0.0);
  std::vector<float> xhat(static_cast<size_t>(C)), gdy(static_cast<size_t>(C));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t o = t * C;
    double s1 = 0, s2 = 0;
    for (int64_t c = 0; c < C; ++c) {
      const float d = to_float(dy[o + c]);
      xhat[c] = (to_float(x[o + c]) - mean[t]) * rstd[t];
      gdy[c] = d * to_float(g[c]);
      s1 += gdy[c];
      s2 += static_cast<double>(gdy[c]) * xhat[c];
      dg[c] += static_cast<double>(d) * xhat[c];
      db[c] += d;
    }
    if (!dx) continue;
    const float m1 = static_cast<float>(s1 / static_cast<double>(C));
    const float m2 = static_cast<float>(s2 / static_cast<double>(C));
    for (int64_t c = 0; c < C; ++c) {
      float v = rstd[t] * (gdy[c] - m1 - xhat[c] * m2);
      if (p.accumulate_dx) v += to_float(dx[o + c]);
      dx[o + c] = from_float<X>(v);
    }
  }
  if (p.dgamma.defined()) {
    float* out = p.dgamma.data<float>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<float>(out[c] + dg[c]);
  }
  if (p.dbeta.defined()) {
    float* out = p.dbeta.data<float>();
    for (int64_t c = 0; c < C; ++c) out[c] = static_cast<float>(out[c] + db[c]);
  }
}

}  // namespace

void detail::layernorm_fwd_cpu(const LayerNormFwdParams& p) {
  elem::visit_f32_bf16(p.x.dtype(), kFwd, "x", [&](auto xt) {
    elem::visit_f32_bf16(p.gamma.dtype(), kFwd, "gamma", [&](auto wt) {
      elem::visit_output(p.y.dtype(), kFwd, "y",
                         [&](auto yt) { fwd_cpu<decltype(xt), decltype(wt), decltype(yt)>(p); });
    });
  });
}

void detail::layernorm_bwd_cpu(const LayerNormBwdParams& p) {
  elem::visit_f32_bf16(p.x.dtype(), kBwd, "x", [&](auto xt) {
    elem::visit_f32_bf16(p.gamma.dtype(), kBwd, "gamma",
                         [&](auto wt) { bwd_cpu<decltype(xt), decltype(wt)>(p); });
  });
}

void layernorm_fwd(const LayerNormFwdParams& p, const Stream& stream) {
  validate(p);
  if (p.x.is_cpu()) return detail::layernorm_fwd_cpu(p);
#if HELIX_WITH_CUDA
  detail::layernorm_fwd_cuda(p, stream);
#else
  HELIX_FAIL("{}: x is on {}, but helix was built without CUDA", kFwd, p.x.device().str());
#endif
}

void layernorm_bwd(const LayerNormBwdParams& p, const Stream& stream) {
  validate(p);
  if (p.x.is_cpu()) return detail::layernorm_bwd_cpu(p);
#if HELIX_WITH_CUDA
  detail::layernorm_bwd_cuda(p, stream);
#else
  HELIX_FAIL("{}: x is on {}, but helix was built without CUDA", kBwd, p.x.device().str());
#endif
}

}  // namespace helix
