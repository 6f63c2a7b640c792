// LayerNorm: parameter validation, device dispatch and the CPU reference (fp32 math, double sums).
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <utility>
#include <vector>

#include "kernels/layernorm/layernorm.h"

namespace helix {
namespace {

template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return v.to_float();
}
template <typename T>
T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return T::from_float(v);
}

// Calls f(tag) with a value of the C++ type of a float dtype.
template <typename F>
void visit_float(DType t, const char* what, F&& f) {
  switch (t) {
    case DType::kF32: f(float{}); return;
    case DType::kBF16: f(bf16_t{}); return;
    default: HELIX_FAIL("layernorm: {} must be f32 or bf16, got {}", what, dtype_name(t));
  }
}
template <typename F>
void visit_output(DType t, F&& f) {
  switch (t) {
    case DType::kF32: f(float{}); return;
    case DType::kBF16: f(bf16_t{}); return;
    case DType::kE4M3: f(e4m3_t{}); return;
    case DType::kE5M2: f(e5m2_t{}); return;
    default: HELIX_FAIL("layernorm: y must be f32, bf16, e4m3 or e5m2, got {}", dtype_name(t));
  }
}

using NamedTensors = std::initializer_list<std::pair<const Tensor*, const char*>>;

// Every defined tensor on x's device and contiguous.
void check_devices(const Tensor& ref, NamedTensors tensors) {
  for (const auto& [t, name] : tensors) {
    if (!t->defined()) continue;
    HELIX_CHECK(t->device() == ref.device(), "layernorm: expected {} on {}, got {}", name,
                ref.device().str(), t->str());
    HELIX_CHECK(t->is_contiguous(), "layernorm: expected {} contiguous, got {}", name, t->str());
  }
}

void check_rows(const Tensor& t, const char* name, int64_t rows, int64_t cols, DType dtype) {
  HELIX_CHECK(t.ndim() == 2 && t.dim(0) == rows && t.dim(1) == cols,
              "layernorm: expected {} of shape [{}, {}], got {}", name, rows, cols, t.str());
  HELIX_CHECK(t.dtype() == dtype, "layernorm: expected {} of dtype {}, got {}", name,
              dtype_name(dtype), t.str());
}
void check_vec(const Tensor& t, const char* name, int64_t n, DType dtype) {
  HELIX_CHECK(t.ndim() == 1 && t.dim(0) == n, "layernorm: expected {} of shape [{}], got {}", name,
              n, t.str());
  HELIX_CHECK(t.dtype() == dtype, "layernorm: expected {} of dtype {}, got {}", name,
              dtype_name(dtype), t.str());
}

void validate(const LayerNormFwdParams& p) {
  HELIX_CHECK(p.x.defined() && p.x.ndim() == 2, "layernorm_fwd: expected x of shape [T, C], got {}",
              p.x.str());
  const int64_t T = p.x.dim(0), C = p.x.dim(1);
  const DType xt = p.x.dtype();
  HELIX_CHECK(xt == DType::kF32 || xt == DType::kBF16, "layernorm_fwd: expected x f32 or bf16, got {}",
              p.x.str());
  HELIX_CHECK(C > 0, "layernorm_fwd: expected C > 0, got x {}", p.x.str());
  check_devices(p.x, {{&p.residual, "residual"}, {&p.residual_out, "residual_out"},
                      {&p.gamma, "gamma"}, {&p.beta, "beta"}, {&p.y, "y"}, {&p.y_scale, "y_scale"},
                      {&p.y_amax, "y_amax"}, {&p.mean, "mean"}, {&p.rstd, "rstd"}});
  HELIX_CHECK(p.residual.defined() == p.residual_out.defined(),
              "layernorm_fwd: expected residual and residual_out both defined or both undefined, "
              "got residual {} and residual_out {}", p.residual.str(), p.residual_out.str());
  if (p.residual.defined()) {
    check_rows(p.residual, "residual", T, C, xt);
    check_rows(p.residual_out, "residual_out", T, C, xt);
  }
  HELIX_CHECK(p.gamma.defined() && p.beta.defined(), "layernorm_fwd: expected gamma and beta, got {} and {}",
              p.gamma.str(), p.beta.str());
  HELIX_CHECK(p.gamma.dtype() == DType::kF32 || p.gamma.dtype() == DType::kBF16,
              "layernorm_fwd: expected gamma f32 or bf16, got {}", p.gamma.str());
  check_vec(p.gamma, "gamma", C, p.gamma.dtype());
  check_vec(p.beta, "beta", C, p.gamma.dtype());
  HELIX_CHECK(p.y.defined(), "layernorm_fwd: expected an output y [{}, {}], got undefined", T, C);
  HELIX_CHECK(p.y.ndim() == 2 && p.y.dim(0) == T && p.y.dim(1) == C,
              "layernorm_fwd: expected y of shape [{}, {}], got {}", T, C, p.y.str());
  visit_output(p.y.dtype(), [](auto) {});
  if (dtype_is_fp8(p.y.dtype())) {
    HELIX_CHECK(p.y_scale.defined(), "layernorm_fwd: fp8 output {} needs y_scale [1] f32, got undefined",
                p.y.str());
    check_vec(p.y_scale, "y_scale", 1, DType::kF32);
  } else {
    HELIX_CHECK(!p.y_scale.defined(), "layernorm_fwd: y_scale applies to fp8 outputs only, got y {}",
                p.y.str());
  }
  if (p.y_amax.defined()) check_vec(p.y_amax, "y_amax", 1, DType::kF32);
  if (p.mean.defined()) check_vec(p.mean, "mean", T, DType::kF32);
  if (p.rstd.defined()) check_vec(p.rstd, "rstd", T, DType::kF32);
  HELIX_CHECK(p.eps >= 0.f, "layernorm_fwd: expected eps >= 0, got {}", p.eps);
}

void validate(const LayerNormBwdParams& p) {
  HELIX_CHECK(p.x.defined() && p.x.ndim() == 2, "layernorm_bwd: expected x of shape [T, C], got {}",
              p.x.str());
  const int64_t T = p.x.dim(0), C = p.x.dim(1);
  const DType xt = p.x.dtype();
  HELIX_CHECK(xt == DType::kF32 || xt == DType::kBF16, "layernorm_bwd: expected x f32 or bf16, got {}",
              p.x.str());
  HELIX_CHECK(C > 0, "layernorm_bwd: expected C > 0, got x {}", p.x.str());
  check_devices(p.x, {{&p.gamma, "gamma"}, {&p.mean, "mean"}, {&p.rstd, "rstd"}, {&p.dy, "dy"},
                      {&p.dx, "dx"}, {&p.dgamma, "dgamma"}, {&p.dbeta, "dbeta"}});
  HELIX_CHECK(p.gamma.defined() && p.mean.defined() && p.rstd.defined() && p.dy.defined(),
              "layernorm_bwd: expected gamma, mean, rstd and dy, got {}, {}, {}, {}", p.gamma.str(),
              p.mean.str(), p.rstd.str(), p.dy.str());
  HELIX_CHECK(p.gamma.dtype() == DType::kF32 || p.gamma.dtype() == DType::kBF16,
              "layernorm_bwd: expected gamma f32 or bf16, got {}", p.gamma.str());
  check_vec(p.gamma, "gamma", C, p.gamma.dtype());
  check_vec(p.mean, "mean", T, DType::kF32);
  check_vec(p.rstd, "rstd", T, DType::kF32);
  check_rows(p.dy, "dy", T, C, xt);
  if (p.dx.defined()) check_rows(p.dx, "dx", T, C, xt);
  if (p.dgamma.defined()) check_vec(p.dgamma, "dgamma", C, DType::kF32);
  if (p.dbeta.defined()) check_vec(p.dbeta, "dbeta", C, DType::kF32);
}

// |v| as ordered bits: for non-negative floats the unsigned order is the float order and NaN
// (0x7FC00000 and up) sorts above +inf, so a max over these bits propagates NaN, as the CUDA
// kernels' atomicMax does.
uint32_t abs_bits(float v) { return float_bits(v) & 0x7FFFFFFFu; }

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
      if constexpr (std::is_same_v<Y, float> || std::is_same_v<Y, bf16_t>) y[o + c] = from_float<Y>(v);
      else y[o + c] = Y::from_float(v * scale);
    }
    if (p.mean.defined()) p.mean.data<float>()[t] = mean;
    if (p.rstd.defined()) p.rstd.data<float>()[t] = rstd;
  }
  if (p.y_amax.defined()) p.y_amax.data<float>()[0] = bits_float(amax);
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
  visit_float(p.x.dtype(), "x", [&](auto xt) {
    visit_float(p.gamma.dtype(), "gamma", [&](auto wt) {
      visit_output(p.y.dtype(), [&](auto yt) {
        fwd_cpu<decltype(xt), decltype(wt), decltype(yt)>(p);
      });
    });
  });
}

void detail::layernorm_bwd_cpu(const LayerNormBwdParams& p) {
  visit_float(p.x.dtype(), "x", [&](auto xt) {
    visit_float(p.gamma.dtype(), "gamma", [&](auto wt) { bwd_cpu<decltype(xt), decltype(wt)>(p); });
  });
}

void layernorm_fwd(const LayerNormFwdParams& p, const Stream& stream) {
  validate(p);
  if (p.x.is_cpu()) return detail::layernorm_fwd_cpu(p);
#if HELIX_WITH_CUDA
  detail::layernorm_fwd_cuda(p, stream);
#else
  HELIX_FAIL("layernorm_fwd: x is on {}, but helix was built without CUDA", p.x.device().str());
#endif
}

void layernorm_bwd(const LayerNormBwdParams& p, const Stream& stream) {
  validate(p);
  if (p.x.is_cpu()) return detail::layernorm_bwd_cpu(p);
#if HELIX_WITH_CUDA
  detail::layernorm_bwd_cuda(p, stream);
#else
  HELIX_FAIL("layernorm_bwd: x is on {}, but helix was built without CUDA", p.x.device().str());
#endif
}

}  // namespace helix
