// FP8 delayed scaling update: the CPU reference against a plain re-derivation (a deque per operand,
// most recent first) over hundreds of random steps with amaxes 0, +inf, NaN, subnormal and huge,
// both amax algorithms, several margins and history lengths, bitwise; the canonicalisation before
// the all-reduce; and on a GPU the CUDA kernel bitwise against the CPU reference.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <ostream>
#include <random>
#include <vector>

#include "kernels/fp8_scaling/fp8_scaling.h"
#include "test_util.h"

namespace helix {
namespace {

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

uint32_t bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// One step's amaxes: mostly log-uniform over a wide range, with 0, inf, NaN, subnormals and huge
// values sprinkled in.
std::vector<float> random_amaxes(std::mt19937& rng, int64_t n) {
  std::uniform_real_distribution<float> e(-30.f, 30.f);
  std::uniform_int_distribution<int> pick(0, 19);
  std::vector<float> a(static_cast<size_t>(n));
  for (float& x : a) {
    switch (pick(rng)) {
      case 0: x = 0.f; break;
      case 1: x = kInf; break;
      case 2: x = kNaN; break;
      case 3: x = 1e-42f; break;  // subnormal: fp8_max / amax overflows -> FLT_MAX
      case 4: x = 3e38f; break;
      default: x = std::exp2(e(rng));
    }
  }
  return a;
}

// The rule of fp8_scaling.h, written from scratch.
struct PlainOperand {
  std::deque<float> hist;  // most recent first
  float scale = 1.f;
};

void plain_step(std::vector<PlainOperand>& ops, const std::vector<float>& amax, const std::vector<float>& fmax,
                Fp8AmaxAlgo algo, int margin) {
  for (size_t i = 0; i < ops.size(); ++i) {
    PlainOperand& o = ops[i];
    o.hist.push_front(amax[i]);
    o.hist.pop_back();
    float a = o.hist.front();
    if (algo == Fp8AmaxAlgo::kMax) {
      bool nan = false;
      float m = 0.f;
      for (float h : o.hist) {
        if (std::isnan(h)) nan = true;
        else if (h > m) m = h;
      }
      a = nan ? kNaN : m;
    }
    if (a > 0.f && a != kInf && !std::isnan(a)) {
      float s = (fmax[i] / a) / std::pow(2.0f, static_cast<float>(margin));
      if (s == kInf) s = std::numeric_limits<float>::max();
      o.scale = s;
    }
  }
}

struct Case {
  Fp8AmaxAlgo algo;
  int margin;
  int64_t len;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << (c.algo == Fp8AmaxAlgo::kMax ? "max" : "most_recent") << " margin " << c.margin << " history " << c.len;
}

class Fp8ScalingCpu : public ::testing::TestWithParam<Case> {};

TEST_P(Fp8ScalingCpu, MatchesPlainRederivationOverManySteps) {
  const Case c = GetParam();
  const int64_t n = 37;
  std::mt19937 rng(1234 + c.margin + static_cast<int>(c.len));
  std::vector<float> fmax(n);
  for (int64_t i = 0; i < n; ++i) fmax[i] = i % 3 == 2 ? 57344.f : 448.f;
  Fp8ScalingUpdateParams p;
  p.amax = Tensor::zeros({n}, DType::kF32);
  p.history = Tensor::zeros({c.len, n}, DType::kF32);
  p.scale = Tensor::from_floats(std::vector<float>(n, 1.f), Shape{n}, DType::kF32);
  p.scale_inv = Tensor::from_floats(std::vector<float>(n, 1.f), Shape{n}, DType::kF32);
  p.fp8_max = Tensor::from_floats(fmax, Shape{n}, DType::kF32);
  p.algo = c.algo;
  p.margin = c.margin;
  std::vector<PlainOperand> plain(static_cast<size_t>(n));
  for (auto& o : plain) o.hist.assign(static_cast<size_t>(c.len), 0.f);
  int64_t changed = 0, kept = 0;
  for (int step = 0; step < 300; ++step) {
    const std::vector<float> amax = random_amaxes(rng, n);
    std::memcpy(p.amax.data_ptr(), amax.data(), amax.size() * 4);
    const std::vector<float> before = p.scale.to_floats();
    fp8_scaling_update(p, Stream());
    plain_step(plain, amax, fmax, c.algo, c.margin);
    const std::vector<float> s = p.scale.to_floats(), si = p.scale_inv.to_floats(), h = p.history.to_floats(),
                             a = p.amax.to_floats();
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(bits(s[i]), bits(plain[i].scale)) << "scale of operand " << i << " at step " << step;
      ASSERT_EQ(bits(si[i]), bits(1.0f / plain[i].scale)) << "scale_inv of operand " << i << " at step " << step;
      ASSERT_EQ(a[i], 0.f) << "amax not cleared";
      for (int64_t j = 0; j < c.len; ++j)
        ASSERT_EQ(bits(h[j * n + i]), bits(plain[i].hist[j])) << "history[" << j << "][" << i << "] step " << step;
      (bits(s[i]) == bits(before[i]) ? kept : changed) += 1;
    }
  }
  EXPECT_GT(changed, 0);  // both branches of the rule were exercised
  EXPECT_GT(kept, 0);
}

INSTANTIATE_TEST_SUITE_P(Recipes, Fp8ScalingCpu,
                         ::testing::Values(Case{Fp8AmaxAlgo::kMax, 0, 16}, Case{Fp8AmaxAlgo::kMax, 2, 1},
                                           Case{Fp8AmaxAlgo::kMostRecent, 0, 16},
                                           Case{Fp8AmaxAlgo::kMostRecent, 3, 4}, Case{Fp8AmaxAlgo::kMax, 1, 1024}));

TEST(Fp8Scaling, FirstUpdateCalibratesFromTheCurrentAmax) {
  Fp8ScalingUpdateParams p;
  p.amax = Tensor::from_floats({2.0f, 0.0f, kNaN}, Shape{3}, DType::kF32);
  p.history = Tensor::zeros({8, 3}, DType::kF32);
  p.scale = Tensor::from_floats({1.f, 1.f, 1.f}, Shape{3}, DType::kF32);
  p.scale_inv = Tensor::from_floats({1.f, 1.f, 1.f}, Shape{3}, DType::kF32);
  p.fp8_max = Tensor::from_floats({448.f, 448.f, 57344.f}, Shape{3}, DType::kF32);
  p.margin = 1;
  fp8_scaling_update(p, Stream());
  EXPECT_EQ(p.scale.to_floats(), (std::vector<float>{112.f, 1.f, 1.f}));  // 448 / 2 / 2^1; 0 and NaN keep 1
  EXPECT_EQ(p.scale_inv.to_floats()[0], 1.f / 112.f);
}

TEST(Fp8Scaling, BadShapesAreRefused) {
  Fp8ScalingUpdateParams p;
  p.amax = Tensor::zeros({4}, DType::kF32);
  p.history = Tensor::zeros({2, 5}, DType::kF32);
  p.scale = Tensor::zeros({4}, DType::kF32);
  p.scale_inv = Tensor::zeros({4}, DType::kF32);
  p.fp8_max = Tensor::zeros({4}, DType::kF32);
  EXPECT_THROW(fp8_scaling_update(p, Stream()), Error);
  p.history = Tensor::zeros({2, 4}, DType::kF32);
  p.margin = -1;
  EXPECT_THROW(fp8_scaling_update(p, Stream()), Error);
}

TEST(Fp8Scaling, CanonicalizeMapsNanToInfAndClearsSigns) {
  Tensor a = Tensor::from_floats({kNaN, -kNaN, -0.f, -3.f, 5.f, kInf}, Shape{6}, DType::kF32);
  fp8_amax_canonicalize(a, Stream());
  const std::vector<float> v = a.to_floats();
  EXPECT_EQ(v[0], kInf);
  EXPECT_EQ(v[1], kInf);
  EXPECT_EQ(bits(v[2]), 0u);
  EXPECT_EQ(v[3], 3.f);
  EXPECT_EQ(v[4], 5.f);
  EXPECT_EQ(v[5], kInf);
}

TEST(Fp8ScalingGpu, CudaMatchesCpuBitwise) {
  HELIX_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  const Stream stream = Stream::cuda_default(0);
  // Odd sizes: a partial block of operands; histories within one row chunk of the kernel, across
  // several with a partial last one, and of one row.
  for (int64_t len : {int64_t{67}, int64_t{300}, int64_t{1}}) {
    SCOPED_TRACE(fmt::format("history length {}", len));
    for (Fp8AmaxAlgo algo : {Fp8AmaxAlgo::kMax, Fp8AmaxAlgo::kMostRecent}) {
      const int64_t n = 301;
      std::mt19937 rng(99);
      std::vector<float> fmax(n);
      for (int64_t i = 0; i < n; ++i) fmax[i] = i % 3 == 2 ? 57344.f : 448.f;
      Fp8ScalingUpdateParams c, g;
      c.amax = Tensor::zeros({n}, DType::kF32);
      c.history = Tensor::zeros({len, n}, DType::kF32);
      c.scale = Tensor::from_floats(std::vector<float>(n, 1.f), Shape{n}, DType::kF32);
      c.scale_inv = c.scale.clone();
      c.fp8_max = Tensor::from_floats(fmax, Shape{n}, DType::kF32);
      c.algo = g.algo = algo;
      c.margin = g.margin = 2;
      g.amax = c.amax.to(gpu);
      g.history = c.history.to(gpu);
      g.scale = c.scale.to(gpu);
      g.scale_inv = c.scale_inv.to(gpu);
      g.fp8_max = c.fp8_max.to(gpu);
      for (int step = 0; step < 150; ++step) {
        const std::vector<float> amax = random_amaxes(rng, n);
        std::memcpy(c.amax.data_ptr(), amax.data(), amax.size() * 4);
        Tensor ga = c.amax.clone();
        fp8_amax_canonicalize(ga, Stream());  // both devices canonicalise the same way
        fp8_amax_canonicalize(c.amax, Stream());
        g.amax.copy_from(Tensor::from_floats(amax, Shape{n}, DType::kF32).to(gpu), stream);
        fp8_amax_canonicalize(g.amax, stream);
        ASSERT_EQ(g.amax.to(Device::cpu()).to_vector<float>() == ga.to_vector<float>(), true);
        fp8_scaling_update(c, Stream());
        fp8_scaling_update(g, stream);
        const auto eq = [](const Tensor& x, const Tensor& y) {
          const Tensor hx = x.to(Device::cpu()), hy = y.to(Device::cpu());
          return std::memcmp(hx.data_ptr(), hy.data_ptr(), hx.nbytes()) == 0;
        };
        ASSERT_TRUE(eq(g.scale, c.scale)) << "scale at step " << step;
        ASSERT_TRUE(eq(g.scale_inv, c.scale_inv)) << "scale_inv at step " << step;
        ASSERT_TRUE(eq(g.history, c.history)) << "history at step " << step;
        ASSERT_TRUE(eq(g.amax, c.amax)) << "amax at step " << step;
      }
    }
  }
}

}  // namespace
}  // namespace helix
