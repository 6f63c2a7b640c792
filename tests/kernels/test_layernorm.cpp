// LayerNorm: the reference formulas against finite differences, the CPU reference against plain
// double loops (forward, fused residual add, fp8 output and amax, backward with and without
// accumulation), CUDA against the CPU reference on odd, aligned, misaligned and large shapes with
// poisoned outputs, bitwise determinism of the CUDA backward, and validation messages.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/layernorm/layernorm.h"

namespace helix {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::close_within;
using testing::doubles;
using testing::fresh_seed;
using testing::host;
using testing::kNaN;
using testing::near_doubles;
using testing::on;
using testing::on_misaligned;
using testing::poisoned;
using testing::random_tensor;
using testing::tolerance_for;

// ---- plain double-loop references --------------------------------------------------------------
struct RefFwd {
  std::vector<double> y, mean, rstd;
  double amax = 0;
};
RefFwd ref_fwd(const std::vector<double>& s, const std::vector<double>& g,
               const std::vector<double>& b, int64_t T, int64_t C, double eps) {
  RefFwd r;
  r.y.resize(static_cast<size_t>(T * C));
  for (int64_t t = 0; t < T; ++t) {
    double mean = 0, var = 0;
    for (int64_t c = 0; c < C; ++c) mean += s[t * C + c];
    mean /= C;
    for (int64_t c = 0; c < C; ++c) var += (s[t * C + c] - mean) * (s[t * C + c] - mean);
    var /= C;
    const double rstd = 1.0 / std::sqrt(var + eps);
    for (int64_t c = 0; c < C; ++c) {
      r.y[t * C + c] = (s[t * C + c] - mean) * rstd * g[c] + b[c];
      r.amax = std::max(r.amax, std::abs(r.y[t * C + c]));
    }
    r.mean.push_back(mean);
    r.rstd.push_back(rstd);
  }
  return r;
}
struct RefBwd {
  std::vector<double> dx, dgamma, dbeta, dgamma_abs, dbeta_abs;
};
RefBwd ref_bwd(const std::vector<double>& x, const std::vector<double>& g,
               const std::vector<double>& dy, int64_t T, int64_t C, double eps) {
  RefBwd r;
  r.dx.resize(static_cast<size_t>(T * C));
  r.dgamma.assign(C, 0);
  r.dbeta.assign(C, 0);
  r.dgamma_abs.assign(C, 0);
  r.dbeta_abs.assign(C, 0);
  for (int64_t t = 0; t < T; ++t) {
    double mean = 0, var = 0;
    for (int64_t c = 0; c < C; ++c) mean += x[t * C + c];
    mean /= C;
    for (int64_t c = 0; c < C; ++c) var += (x[t * C + c] - mean) * (x[t * C + c] - mean);
    const double rstd = 1.0 / std::sqrt(var / C + eps);
    double m1 = 0, m2 = 0;
    for (int64_t c = 0; c < C; ++c) {
      const double xh = (x[t * C + c] - mean) * rstd;
      m1 += dy[t * C + c] * g[c];
      m2 += dy[t * C + c] * g[c] * xh;
      r.dgamma[c] += dy[t * C + c] * xh;
      r.dbeta[c] += dy[t * C + c];
      r.dgamma_abs[c] += std::abs(dy[t * C + c] * xh);
      r.dbeta_abs[c] += std::abs(dy[t * C + c]);
    }
    m1 /= C;
    m2 /= C;
    for (int64_t c = 0; c < C; ++c) {
      const double xh = (x[t * C + c] - mean) * rstd;
      r.dx[t * C + c] = rstd * (dy[t * C + c] * g[c] - m1 - xh * m2);
    }
  }
  return r;
}

TEST(LayerNormRef, BackwardFormulaMatchesFiniteDifferences) {
  const int64_t T = 3, C = 7;
  std::mt19937_64 rng(fresh_seed());
  std::normal_distribution<double> n01;
  std::vector<double> x(T * C), g(C), b(C), w(T * C);
  for (auto& v : x) v = n01(rng);
  for (auto& v : g) v = 1 + 0.3 * n01(rng);
  for (auto& v : b) v = n01(rng);
  for (auto& v : w) v = n01(rng);
  const double eps = 1e-5, h = 1e-6;
  auto loss = [&](const std::vector<double>& xx, const std::vector<double>& gg,
                  const std::vector<double>& bb) {
    const RefFwd f = ref_fwd(xx, gg, bb, T, C, eps);
    double l = 0;
    for (size_t i = 0; i < w.size(); ++i) l += w[i] * f.y[i];
    return l;
  };
  const RefBwd r = ref_bwd(x, g, w, T, C, eps);
  for (size_t i = 0; i < x.size(); ++i) {
    auto xp = x, xm = x;
    xp[i] += h;
    xm[i] -= h;
    EXPECT_NEAR((loss(xp, g, b) - loss(xm, g, b)) / (2 * h), r.dx[i], 1e-6) << "dx " << i;
  }
  for (int64_t c = 0; c < C; ++c) {
    auto gp = g, gm = g, bp = b, bm = b;
    gp[c] += h;
    gm[c] -= h;
    bp[c] += h;
    bm[c] -= h;
    EXPECT_NEAR((loss(x, gp, b) - loss(x, gm, b)) / (2 * h), r.dgamma[c], 1e-6) << "dgamma " << c;
    EXPECT_NEAR((loss(x, g, bp) - loss(x, g, bm)) / (2 * h), r.dbeta[c], 1e-6) << "dbeta " << c;
  }
}

// ---- one forward configuration -----------------------------------------------------------------
struct FwdConfig {
  DType x, w, y;
  bool residual;
  bool amax;
};
std::string name(const FwdConfig& c) {
  return fmt::format("x {} w {} y {}{}{}", dtype_name(c.x), dtype_name(c.w), dtype_name(c.y),
                     c.residual ? " +residual" : "", c.amax ? " +amax" : "");
}

struct FwdInputs {
  Tensor x, r, g, b, scale;
  bool misaligned_x = false;  // place x one element into its storage on the device
};
FwdInputs make_fwd_inputs(const FwdConfig& c, int64_t T, int64_t C, uint64_t seed) {
  FwdInputs in;
  // An offset and spread per run, so that the mean matters and the variance is not 1.
  in.x = random_tensor({T, C}, c.x, seed, 0, -3.f, 5.f);
  if (c.residual) in.r = random_tensor({T, C}, c.x, seed, 1, -2.f, 2.f);
  in.g = random_tensor({C}, c.w, seed, 2, 0.5f, 1.5f);
  in.b = random_tensor({C}, c.w, seed, 3, -0.5f, 0.5f);
  if (dtype_is_fp8(c.y))
    in.scale = Tensor::from_floats({c.y == DType::kE4M3 ? 96.f : 4096.f}, {1}, DType::kF32);
  return in;
}

struct FwdOutputs {
  Tensor y, s, mean, rstd, amax;
};
FwdOutputs run_fwd(const FwdConfig& c, const FwdInputs& in, Device dev, float eps) {
  const int64_t T = in.x.dim(0), C = in.x.dim(1);
  FwdOutputs out;
  out.y = poisoned({T, C}, c.y, dev);
  out.mean = poisoned({T}, DType::kF32, dev);
  out.rstd = poisoned({T}, DType::kF32, dev);
  if (c.residual) out.s = poisoned({T, C}, c.x, dev);
  if (c.amax) out.amax = poisoned({1}, DType::kF32, dev);
  LayerNormFwdParams p;
  p.x = in.misaligned_x ? on_misaligned(in.x, dev) : on(in.x, dev);
  p.residual = on(in.r, dev);
  p.residual_out = out.s;
  p.gamma = on(in.g, dev);
  p.beta = on(in.b, dev);
  p.eps = eps;
  p.y = out.y;
  p.y_scale = on(in.scale, dev);
  p.y_amax = out.amax;
  p.mean = out.mean;
  p.rstd = out.rstd;
  const Stream stream = dev.is_cuda() ? Stream::create(dev) : Stream();
  layernorm_fwd(p, stream);
  stream.synchronize();
  return {host(out.y), host(out.s), host(out.mean), host(out.rstd), host(out.amax)};
}

TEST(LayerNormCpu, ForwardMatchesDoubleLoops) {
  const FwdConfig configs[] = {
      {DType::kF32, DType::kF32, DType::kF32, false, true},
      {DType::kBF16, DType::kF32, DType::kBF16, true, false},
      {DType::kBF16, DType::kBF16, DType::kBF16, false, true},
      {DType::kF32, DType::kBF16, DType::kF32, true, true},
      {DType::kBF16, DType::kF32, DType::kE4M3, true, true},
      {DType::kBF16, DType::kF32, DType::kE5M2, false, true},
  };
  for (const FwdConfig& c : configs) {
    for (auto [T, C] : {std::pair<int64_t, int64_t>{71, 229}, {1, 1}, {5, 2}, {3, 1280}}) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(fmt::format("{} T={} C={} seed={}", name(c), T, C, seed));
      const float eps = 1e-5f;
      const FwdInputs in = make_fwd_inputs(c, T, C, seed);
      const FwdOutputs out = run_fwd(c, in, Device::cpu(), eps);
      // The normalised tensor is s = x + r rounded to x's dtype.
      std::vector<double> s = doubles(in.x);
      if (c.residual) {
        const Tensor sum_f = Tensor::from_floats(
            [&] {
              std::vector<float> v = in.x.to_floats(), r = in.r.to_floats();
              for (size_t i = 0; i < v.size(); ++i) v[i] += r[i];
              return v;
            }(),
            {T, C}, c.x);
        s = doubles(sum_f);
        EXPECT_TRUE(all_close(out.s, sum_f, {0, 0}));
      }
      const RefFwd r = ref_fwd(s, doubles(in.g), doubles(in.b), T, C, eps);
      EXPECT_TRUE(near_doubles(out.mean, r.mean, tolerance_for(DType::kF32)));
      EXPECT_TRUE(near_doubles(out.rstd, r.rstd, tolerance_for(DType::kF32)));
      std::vector<double> y = r.y;
      // Error bound per element: |y| plus the f32 cancellation in s - mean, which is relative to
      // |s| + |mean|, not to |s - mean| (rows whose values barely differ, e.g. C = 2), times |g| rstd.
      const std::vector<double> g = doubles(in.g);
      std::vector<double> mag(y.size());
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < C; ++j) {
          const size_t i = static_cast<size_t>(t * C + j);
          mag[i] = std::abs(y[i]) + std::abs(g[j]) * r.rstd[t] * (std::abs(s[i]) + std::abs(r.mean[t]));
        }
      if (dtype_is_fp8(c.y)) {
        const double scale = in.scale.to_floats()[0];
        for (size_t i = 0; i < y.size(); ++i) {
          y[i] *= scale;
          mag[i] *= scale;
        }
      }
      EXPECT_TRUE(testing::close_within(out.y, y, mag, tolerance_for(c.y)));
      if (c.amax) EXPECT_TRUE(near_doubles(out.amax, {r.amax}, tolerance_for(DType::kF32)));
    }
  }
}

TEST(LayerNormCpu, BackwardMatchesDoubleLoops) {
  for (DType xt : {DType::kF32, DType::kBF16}) {
    for (bool accumulate : {false, true}) {
      for (auto [T, C] : {std::pair<int64_t, int64_t>{71, 229}, {1, 1}, {2, 3}, {4, 1280}}) {
        const uint64_t seed = fresh_seed();
        SCOPED_TRACE(fmt::format("x {} accumulate {} T={} C={} seed={}", dtype_name(xt), accumulate,
                                 T, C, seed));
        const FwdConfig c{xt, DType::kF32, xt, false, false};
        const FwdInputs in = make_fwd_inputs(c, T, C, seed);
        const FwdOutputs f = run_fwd(c, in, Device::cpu(), 1e-5f);
        const Tensor dy = random_tensor({T, C}, xt, seed, 5, -1.f, 1.f);
        const Tensor dx0 = random_tensor({T, C}, xt, seed, 6, -1.f, 1.f);
        const Tensor dg0 = random_tensor({C}, DType::kF32, seed, 7, -1.f, 1.f);
        const Tensor db0 = random_tensor({C}, DType::kF32, seed, 8, -1.f, 1.f);
        LayerNormBwdParams p;
        p.x = in.x;
        p.gamma = in.g;
        p.mean = f.mean;
        p.rstd = f.rstd;
        p.dy = dy;
        p.dx = accumulate ? dx0.clone() : poisoned({T, C}, xt, Device::cpu());
        p.accumulate_dx = accumulate;
        p.dgamma = dg0.clone();
        p.dbeta = db0.clone();
        layernorm_bwd(p, Stream());
        RefBwd r = ref_bwd(doubles(in.x), doubles(in.g), doubles(dy), T, C, 1e-5);
        if (accumulate) {
          const std::vector<double> base = doubles(dx0);
          for (size_t i = 0; i < r.dx.size(); ++i) r.dx[i] += base[i];
        }
        const std::vector<double> g0 = doubles(dg0), b0 = doubles(db0);
        for (int64_t i = 0; i < C; ++i) {
          r.dgamma[i] += g0[i];
          r.dbeta[i] += b0[i];
          r.dgamma_abs[i] += std::abs(g0[i]);
          r.dbeta_abs[i] += std::abs(b0[i]);
        }
        // dx: the cancellation in g*dy - m1 - xhat*m2 is bounded by the size of its terms (~|dy|).
        testing::Tolerance tol = tolerance_for(xt);
        tol.atol = std::max(tol.atol, 1e-5);
        EXPECT_TRUE(near_doubles(p.dx, r.dx, tol));
        EXPECT_TRUE(close_within(p.dgamma, r.dgamma, r.dgamma_abs, tolerance_for(DType::kF32)));
        EXPECT_TRUE(close_within(p.dbeta, r.dbeta, r.dbeta_abs, tolerance_for(DType::kF32)));
      }
    }
  }
}

TEST(LayerNormCpu, RejectsBadShapesNamingTheInput) {
  LayerNormFwdParams p;
  p.x = Tensor::zeros({4, 8}, DType::kBF16);
  p.gamma = Tensor::zeros({8}, DType::kF32);
  p.beta = Tensor::zeros({7}, DType::kF32);
  p.y = Tensor::zeros({4, 8}, DType::kBF16);
  try {
    layernorm_fwd(p, Stream());
    FAIL() << "expected a throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected beta f32 [8], got f32[7]"), std::string::npos)
        << e.what();
  }
  p.beta = Tensor::zeros({8}, DType::kF32);
  p.y = Tensor::zeros({4, 8}, DType::kE4M3);
  EXPECT_THROW(layernorm_fwd(p, Stream()), Error);  // fp8 output without a scale
  p.y = Tensor::zeros({4, 8}, DType::kBF16);
  p.residual = Tensor::zeros({4, 8}, DType::kBF16);
  EXPECT_THROW(layernorm_fwd(p, Stream()), Error);  // residual without residual_out
  LayerNormBwdParams b;
  b.x = Tensor::zeros({4, 8}, DType::kBF16);
  b.gamma = Tensor::zeros({8}, DType::kF32);
  b.mean = Tensor::zeros({4}, DType::kF32);
  b.rstd = Tensor::zeros({4}, DType::kF32);
  b.dy = Tensor::zeros({4, 8}, DType::kF32);
  EXPECT_THROW(layernorm_bwd(b, Stream()), Error);  // dy dtype differs from x
}

TEST(LayerNormCpu, AmaxPropagatesNaN) {
  const FwdConfig c{DType::kF32, DType::kF32, DType::kE4M3, false, true};
  FwdInputs in = make_fwd_inputs(c, 3, 5, fresh_seed());
  in.x.data<float>()[7] = kNaN;
  const FwdOutputs out = run_fwd(c, in, Device::cpu(), 1e-5f);
  EXPECT_TRUE(std::isnan(out.amax.to_floats()[0]));
}

// ---- CUDA against the CPU reference ------------------------------------------------------------
void expect_fwd_matches(const FwdConfig& c, int64_t T, int64_t C, bool misaligned) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(
      fmt::format("{} T={} C={}{} seed={}", name(c), T, C, misaligned ? " misaligned" : "", seed));
  FwdInputs in = make_fwd_inputs(c, T, C, seed);
  const FwdOutputs ref = run_fwd(c, in, Device::cpu(), 1e-5f);
  in.misaligned_x = misaligned;  // the kernel must notice and take its scalar path
  const FwdOutputs got = run_fwd(c, in, Device::cuda(), 1e-5f);
  EXPECT_TRUE(all_close(got.y, ref.y, tolerance_for(c.y)));
  EXPECT_TRUE(all_close(got.mean, ref.mean, tolerance_for(DType::kF32)));
  EXPECT_TRUE(all_close(got.rstd, ref.rstd, tolerance_for(DType::kF32)));
  if (c.residual) EXPECT_TRUE(all_close(got.s, ref.s, {0, 0}));  // one rounding of one fp32 add
  if (c.amax) EXPECT_TRUE(all_close(got.amax, ref.amax, tolerance_for(DType::kF32)));
}

const FwdConfig kCudaConfigs[] = {
    {DType::kBF16, DType::kF32, DType::kBF16, true, true},
    {DType::kF32, DType::kF32, DType::kF32, false, false},
    {DType::kBF16, DType::kBF16, DType::kE4M3, false, true},
    {DType::kBF16, DType::kF32, DType::kE5M2, true, true},
    {DType::kF32, DType::kBF16, DType::kBF16, true, false},
};

TEST(LayerNormCuda, ForwardMatchesCpuOnOddAndAlignedShapes) {
  HELIX_REQUIRE_CUDA();
  for (const FwdConfig& c : kCudaConfigs)
    for (auto [T, C] : {std::pair<int64_t, int64_t>{71, 229},
                        {29, 541},
                        {1, 1},
                        {33, 320},
                        {17, 1280},
                        {5, 5120},
                        {3, 6144},
                        {2, 8192},
                        {3, 8191}})
      expect_fwd_matches(c, T, C, false);
}

TEST(LayerNormCuda, ForwardMatchesCpuOnMisalignedAndLargeInputs) {
  HELIX_REQUIRE_CUDA();
  expect_fwd_matches(kCudaConfigs[0], 37, 1280, true);
  expect_fwd_matches(kCudaConfigs[1], 37, 1280, true);
  expect_fwd_matches(kCudaConfigs[0], 4096, 5120, false);
  expect_fwd_matches(kCudaConfigs[2], 8192, 1280, false);
  expect_fwd_matches(kCudaConfigs[1], 65536, 33, false);
}

struct BwdOutputs {
  Tensor dx, dgamma, dbeta;
};
struct BwdCase {
  Tensor x, g, mean, rstd, dy, dx0, dg0, db0;
};
BwdCase make_bwd_case(DType xt, DType wt, int64_t T, int64_t C, uint64_t seed) {
  const FwdConfig c{xt, wt, xt, false, false};
  const FwdInputs in = make_fwd_inputs(c, T, C, seed);
  const FwdOutputs f = run_fwd(c, in, Device::cpu(), 1e-5f);
  return {in.x,
          in.g,
          f.mean,
          f.rstd,
          random_tensor({T, C}, xt, seed, 5, -1.f, 1.f),
          random_tensor({T, C}, xt, seed, 6, -1.f, 1.f),
          random_tensor({C}, DType::kF32, seed, 7, -1.f, 1.f),
          random_tensor({C}, DType::kF32, seed, 8, -1.f, 1.f)};
}
BwdOutputs run_bwd(const BwdCase& k, bool accumulate, Device dev) {
  LayerNormBwdParams p;
  p.x = on(k.x, dev);
  p.gamma = on(k.g, dev);
  p.mean = on(k.mean, dev);
  p.rstd = on(k.rstd, dev);
  p.dy = on(k.dy, dev);
  p.dx = accumulate ? on(k.dx0, dev) : poisoned(k.x.shape(), k.x.dtype(), dev);
  p.accumulate_dx = accumulate;
  p.dgamma = on(k.dg0, dev);
  p.dbeta = on(k.db0, dev);
  const Stream stream = dev.is_cuda() ? Stream::create(dev) : Stream();
  layernorm_bwd(p, stream);
  stream.synchronize();
  return {host(p.dx), host(p.dgamma), host(p.dbeta)};
}

// dgamma/dbeta are sums over T rows: compare against the CPU with the sum-of-magnitudes bound.
void expect_param_grads_close(const BwdOutputs& got, const BwdOutputs& ref, const BwdCase& k) {
  const int64_t T = k.x.dim(0), C = k.x.dim(1);
  std::vector<double> gabs(C), babs(C);
  const std::vector<float> x = k.x.to_floats(), dy = k.dy.to_floats(), m = k.mean.to_floats(),
                           rs = k.rstd.to_floats(), g0 = k.dg0.to_floats(), b0 = k.db0.to_floats();
  for (int64_t c = 0; c < C; ++c) {
    gabs[c] = std::abs(g0[c]);
    babs[c] = std::abs(b0[c]);
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      gabs[c] += std::abs(dy[t * C + c] * (x[t * C + c] - m[t]) * rs[t]);
      babs[c] += std::abs(dy[t * C + c]);
    }
  EXPECT_TRUE(close_within(got.dgamma, doubles(ref.dgamma), gabs, tolerance_for(DType::kF32)));
  EXPECT_TRUE(close_within(got.dbeta, doubles(ref.dbeta), babs, tolerance_for(DType::kF32)));
}

void expect_bwd_matches(DType xt, DType wt, int64_t T, int64_t C, bool accumulate) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(fmt::format("x {} w {} T={} C={} accumulate {} seed={}", dtype_name(xt),
                           dtype_name(wt), T, C, accumulate, seed));
  const BwdCase k = make_bwd_case(xt, wt, T, C, seed);
  const BwdOutputs ref = run_bwd(k, accumulate, Device::cpu());
  const BwdOutputs got = run_bwd(k, accumulate, Device::cuda());
  testing::Tolerance tol = tolerance_for(xt);
  // Cancellation in g*dy - m1 - xhat*m2 (terms ~|dy|), scaled by rstd: up to 1/sqrt(eps) when a
  // row is constant (C = 1), where the bracket is 0 in exact arithmetic.
  double max_rstd = 1.0;
  for (float r : k.rstd.to_floats()) max_rstd = std::max(max_rstd, static_cast<double>(r));
  tol.atol = std::max(tol.atol, 1e-5 * max_rstd);
  EXPECT_TRUE(all_close(got.dx, ref.dx, tol));
  expect_param_grads_close(got, ref, k);
}

TEST(LayerNormCuda, BackwardMatchesCpu) {
  HELIX_REQUIRE_CUDA();
  for (auto [xt, wt] : {std::pair<DType, DType>{DType::kBF16, DType::kF32},
                        {DType::kF32, DType::kF32},
                        {DType::kBF16, DType::kBF16},
                        {DType::kF32, DType::kBF16}})
    for (auto [T, C] : {std::pair<int64_t, int64_t>{71, 229},
                        {29, 541},
                        {1, 1},
                        {33, 320},
                        {17, 1280},
                        {5, 5120},
                        {3, 6144},
                        {2, 8192},
                        {3, 8191}})
      for (bool accumulate : {false, true}) expect_bwd_matches(xt, wt, T, C, accumulate);
}

TEST(LayerNormCuda, BackwardMatchesCpuOnLargeInputs) {
  HELIX_REQUIRE_CUDA();
  expect_bwd_matches(DType::kBF16, DType::kF32, 4096, 5120, true);
  expect_bwd_matches(DType::kF32, DType::kF32, 8192, 1280, false);
  expect_bwd_matches(DType::kBF16, DType::kBF16, 65536, 33, true);
}

TEST(LayerNormCuda, BackwardIsBitwiseDeterministic) {
  HELIX_REQUIRE_CUDA();
  for (auto [T, C] : {std::pair<int64_t, int64_t>{4096, 1280}, {65536, 320}, {71, 229}}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(fmt::format("T={} C={} seed={}", T, C, seed));
    const BwdCase k = make_bwd_case(DType::kBF16, DType::kF32, T, C, seed);
    const BwdOutputs a = run_bwd(k, true, Device::cuda());
    const BwdOutputs b = run_bwd(k, true, Device::cuda());
    EXPECT_TRUE(bitwise_equal(a.dx, b.dx));
    EXPECT_TRUE(bitwise_equal(a.dgamma, b.dgamma));
    EXPECT_TRUE(bitwise_equal(a.dbeta, b.dbeta));
  }
}

TEST(LayerNormCuda, OptionalOutputsAndWidthLimit) {
  HELIX_REQUIRE_CUDA();
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  const BwdCase k = make_bwd_case(DType::kBF16, DType::kF32, 300, 1280, seed);
  const BwdOutputs ref = run_bwd(k, true, Device::cpu());
  const Device gpu = Device::cuda();
  const Stream stream = Stream::create(gpu);
  LayerNormBwdParams p;
  p.x = on(k.x, gpu);
  p.gamma = on(k.g, gpu);
  p.mean = on(k.mean, gpu);
  p.rstd = on(k.rstd, gpu);
  p.dy = on(k.dy, gpu);
  p.dx = on(k.dx0, gpu);  // dx only
  layernorm_bwd(p, stream);
  const Tensor dx = host(p.dx);
  p.dx = Tensor();  // parameter gradients only
  p.dgamma = on(k.dg0, gpu);
  p.dbeta = on(k.db0, gpu);
  layernorm_bwd(p, stream);
  EXPECT_TRUE(all_close(dx, ref.dx, tolerance_for(DType::kBF16)));
  expect_param_grads_close({dx, host(p.dgamma), host(p.dbeta)}, ref, k);
  LayerNormFwdParams f;  // no mean/rstd requested
  f.x = on(k.x, gpu);
  f.gamma = on(k.g, gpu);
  f.beta = on(k.g, gpu);
  f.y = Tensor::empty({300, 1280}, DType::kBF16, gpu);
  layernorm_fwd(f, stream);
  stream.synchronize();
  f.x = Tensor::zeros({2, 8200}, DType::kBF16, gpu);  // wider than the CUDA limit
  f.gamma = Tensor::zeros({8200}, DType::kF32, gpu);
  f.beta = Tensor::zeros({8200}, DType::kF32, gpu);
  f.y = Tensor::empty({2, 8200}, DType::kBF16, gpu);
  EXPECT_THROW(layernorm_fwd(f, stream), Error);
}

TEST(LayerNormCuda, AmaxPropagatesNaN) {
  HELIX_REQUIRE_CUDA();
  const FwdConfig c{DType::kBF16, DType::kF32, DType::kE4M3, false, true};
  FwdInputs in = make_fwd_inputs(c, 64, 1280, fresh_seed());
  in.x.data<bf16_t>()[40000] = bf16_t::from_float(kNaN);
  EXPECT_TRUE(std::isnan(run_fwd(c, in, Device::cuda(), 1e-5f).amax.to_floats()[0]));
}

}  // namespace
}  // namespace helix
