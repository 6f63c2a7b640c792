// GELU (erf form): known values and the derivative against finite differences in double, the CPU
// reference against plain double loops (f32/bf16 inputs, f32/bf16/fp8 outputs with amax, backward
// with and without accumulation), CUDA against the CPU on odd, misaligned and large shapes with
// poisoned outputs, and validation messages.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/gelu/gelu.h"

namespace helix {
namespace {

using testing::all_close;
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

double gelu_d(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double gelu_grad_d(double x) {
  return 0.5 * (1.0 + std::erf(x / std::sqrt(2.0))) +
         x * std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
}

TEST(GeluRef, KnownValuesAndDerivative) {
  EXPECT_NEAR(gelu_d(1.0), 0.8413447460685429, 1e-15);  // x * Phi(x)
  EXPECT_NEAR(gelu_d(-1.0), -0.15865525393145707, 1e-15);
  EXPECT_EQ(gelu_d(0.0), 0.0);
  for (double x = -6; x <= 6; x += 0.37) {
    const double h = 1e-6;
    EXPECT_NEAR((gelu_d(x + h) - gelu_d(x - h)) / (2 * h), gelu_grad_d(x), 1e-8) << x;
  }
}

struct Shape2 {
  int64_t rows, cols;
};

Tensor run_fwd(const Tensor& x, DType yt, const Tensor& scale, Tensor* amax, Device dev,
               bool misaligned = false) {
  GeluFwdParams p;
  p.x = misaligned ? on_misaligned(x, dev) : on(x, dev);
  p.y = poisoned(x.shape(), yt, dev);
  p.y_scale = on(scale, dev);
  if (amax) p.y_amax = poisoned({1}, DType::kF32, dev);
  const Stream stream = dev.is_cuda() ? Stream::create(dev) : Stream();
  gelu_fwd(p, stream);
  stream.synchronize();
  if (amax) *amax = host(p.y_amax);
  return host(p.y);
}

Tensor run_bwd(const Tensor& x, const Tensor& dy, const Tensor& dx0, bool accumulate, Device dev,
               bool misaligned = false) {
  GeluBwdParams p;
  p.x = misaligned ? on_misaligned(x, dev) : on(x, dev);
  p.dy = on(dy, dev);
  p.dx = accumulate ? on(dx0, dev) : poisoned(x.shape(), x.dtype(), dev);
  p.accumulate_dx = accumulate;
  const Stream stream = dev.is_cuda() ? Stream::create(dev) : Stream();
  gelu_bwd(p, stream);
  stream.synchronize();
  return host(p.dx);
}

Tensor scale_for(DType yt) {
  if (!dtype_is_fp8(yt)) return Tensor();
  return Tensor::from_floats({yt == DType::kE4M3 ? 64.f : 2048.f}, {1}, DType::kF32);
}

TEST(GeluCpu, ForwardMatchesDoubleLoops) {
  for (DType xt : {DType::kF32, DType::kBF16}) {
    for (DType yt : {DType::kF32, DType::kBF16, DType::kE4M3, DType::kE5M2}) {
      for (Shape2 s : {Shape2{71, 229}, {1, 1}, {3, 5}}) {
        const uint64_t seed = fresh_seed();
        SCOPED_TRACE(fmt::format("x {} y {} [{}, {}] seed={}", dtype_name(xt), dtype_name(yt),
                                 s.rows, s.cols, seed));
        const Tensor x = random_tensor({s.rows, s.cols}, xt, seed, 0, -6.f, 6.f);
        const Tensor scale = scale_for(yt);
        Tensor amax;
        const Tensor y = run_fwd(x, yt, scale, &amax, Device::cpu());
        std::vector<double> ref = doubles(x);
        double amax_ref = 0;
        for (double& v : ref) {
          v = gelu_d(v);
          amax_ref = std::max(amax_ref, std::abs(v));
          if (scale.defined()) v *= scale.to_floats()[0];
        }
        EXPECT_TRUE(near_doubles(y, ref, tolerance_for(yt)));
        EXPECT_TRUE(near_doubles(amax, {amax_ref}, tolerance_for(DType::kF32)));
      }
    }
  }
}

TEST(GeluCpu, BackwardMatchesDoubleLoops) {
  for (DType xt : {DType::kF32, DType::kBF16}) {
    for (bool accumulate : {false, true}) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(fmt::format("x {} accumulate {} seed={}", dtype_name(xt), accumulate, seed));
      const Tensor x = random_tensor({71, 229}, xt, seed, 0, -6.f, 6.f);
      const Tensor dy = random_tensor({71, 229}, xt, seed, 1, -2.f, 2.f);
      const Tensor dx0 = random_tensor({71, 229}, xt, seed, 2, -1.f, 1.f);
      const Tensor dx = run_bwd(x, dy, dx0, accumulate, Device::cpu());
      const std::vector<double> xv = doubles(x), dyv = doubles(dy), base = doubles(dx0);
      std::vector<double> ref(xv.size());
      for (size_t i = 0; i < ref.size(); ++i)
        ref[i] = dyv[i] * gelu_grad_d(xv[i]) + (accumulate ? base[i] : 0.0);
      EXPECT_TRUE(near_doubles(dx, ref, tolerance_for(xt)));
    }
  }
}

TEST(GeluCpu, RejectsMismatchedInputs) {
  GeluFwdParams p;
  p.x = Tensor::zeros({4, 8}, DType::kBF16);
  p.y = Tensor::zeros({4, 7}, DType::kBF16);
  try {
    gelu_fwd(p, Stream());
    FAIL() << "expected a throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected y of shape [4, 8], got bf16[4, 7]"),
              std::string::npos)
        << e.what();
  }
  p.y = Tensor::zeros({4, 8}, DType::kE4M3);
  EXPECT_THROW(gelu_fwd(p, Stream()), Error);  // fp8 without a scale
  GeluBwdParams b;
  b.x = Tensor::zeros({4, 8}, DType::kBF16);
  b.dy = Tensor::zeros({4, 8}, DType::kF32);
  b.dx = Tensor::zeros({4, 8}, DType::kBF16);
  EXPECT_THROW(gelu_bwd(b, Stream()), Error);
}

void expect_cuda_matches(DType xt, DType yt, Shape2 s, bool misaligned) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(fmt::format("x {} y {} [{}, {}]{} seed={}", dtype_name(xt), dtype_name(yt), s.rows,
                           s.cols, misaligned ? " misaligned" : "", seed));
  const Tensor x = random_tensor({s.rows, s.cols}, xt, seed, 0, -6.f, 6.f);
  const Tensor scale = scale_for(yt);
  Tensor amax_ref, amax_got;
  const Tensor y_ref = run_fwd(x, yt, scale, &amax_ref, Device::cpu());
  const Tensor y_got = run_fwd(x, yt, scale, &amax_got, Device::cuda(), misaligned);
  EXPECT_TRUE(all_close(y_got, y_ref, tolerance_for(yt)));
  EXPECT_TRUE(all_close(amax_got, amax_ref, tolerance_for(DType::kF32)));
  const Tensor dy = random_tensor({s.rows, s.cols}, xt, seed, 1, -2.f, 2.f);
  const Tensor dx0 = random_tensor({s.rows, s.cols}, xt, seed, 2, -1.f, 1.f);
  for (bool accumulate : {false, true}) {
    const Tensor dx_ref = run_bwd(x, dy, dx0, accumulate, Device::cpu());
    const Tensor dx_got = run_bwd(x, dy, dx0, accumulate, Device::cuda(), misaligned);
    EXPECT_TRUE(all_close(dx_got, dx_ref, tolerance_for(xt))) << "accumulate " << accumulate;
  }
}

TEST(GeluCuda, MatchesCpuOnOddShapes) {
  HELIX_REQUIRE_CUDA();
  for (DType xt : {DType::kF32, DType::kBF16})
    for (DType yt : {DType::kF32, DType::kBF16, DType::kE4M3, DType::kE5M2})
      for (Shape2 s : {Shape2{71, 229}, {29, 541}, {1, 1}, {1, 7}, {64, 5120}})
        expect_cuda_matches(xt, yt, s, false);
}

TEST(GeluCuda, MatchesCpuOnMisalignedAndLargeInputs) {
  HELIX_REQUIRE_CUDA();
  expect_cuda_matches(DType::kBF16, DType::kBF16, {37, 1280}, true);
  expect_cuda_matches(DType::kF32, DType::kE4M3, {37, 1280}, true);
  expect_cuda_matches(DType::kBF16, DType::kE4M3, {4096, 5120}, false);
  expect_cuda_matches(DType::kBF16, DType::kBF16, {1000003, 3}, false);
}

TEST(GeluCuda, AmaxPropagatesNaN) {
  HELIX_REQUIRE_CUDA();
  Tensor x = random_tensor({64, 1280}, DType::kBF16, fresh_seed(), 0, -6.f, 6.f);
  x.data<bf16_t>()[12345] = bf16_t::from_float(kNaN);
  Tensor amax;
  run_fwd(x, DType::kE4M3, scale_for(DType::kE4M3), &amax, Device::cuda());
  EXPECT_TRUE(std::isnan(amax.to_floats()[0]));
}

}  // namespace
}  // namespace helix
