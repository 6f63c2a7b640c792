// Rotary embedding: the rotate_half convention on hand-computed values, inv_freq against the
// formula, positions from cu_seqlens (restarting per sequence, padding past the end) equal to the
// same positions given explicitly, the CPU reference against plain double loops for forward and
// backward (the backward is the transpose rotation), CUDA against the CPU on odd and large shapes,
// q and k with different head counts, misaligned inputs, and validation messages.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/rotary/rotary.h"

namespace helix {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::doubles;
using testing::fresh_seed;
using testing::host;
using testing::near_doubles;
using testing::on;
using testing::on_misaligned;
using testing::random_cu_seqlens;
using testing::random_tensor;
using testing::tolerance_for;

TEST(RotaryCpu, RotateHalfConventionOnHandValues) {
  // D = 4: inv_freq = [1, 1/100]; pairs are (0, 2) and (1, 3), not (0, 1) and (2, 3).
  Tensor q = Tensor::from_floats({1, 0, 0, 0, /* token 1 */ 1, 0, 0, 0, /* token 2 */ 0, 1, 0, 0},
                                 {3, 1, 4}, DType::kF32);
  RotaryFwdParams p;
  p.q = q;
  p.pos.positions = Tensor::from_vector<int32_t>({0, 1, 100}, {3});
  rotary_fwd(p, Stream());
  const std::vector<float> y = q.to_floats();
  const std::vector<float> expected = {1,
                                       0,
                                       0,
                                       0,  // position 0: identity
                                       std::cos(1.f),
                                       0,
                                       std::sin(1.f),
                                       0,
                                       0,
                                       std::cos(1.f),
                                       0,
                                       std::sin(1.f)};  // 100 * 0.01 = 1 rad
  for (size_t i = 0; i < y.size(); ++i) EXPECT_NEAR(y[i], expected[i], 1e-6) << i;
}

TEST(RotaryCpu, InvFreqFollowsTheFormula) {
  for (int64_t D : {4, 16, 24, 64, 128}) {
    const std::vector<float> inv = rotary_inv_freq(D);
    ASSERT_EQ(static_cast<int64_t>(inv.size()), D / 2);
    EXPECT_EQ(inv[0], 1.f);
    for (int64_t i = 0; i < D / 2; ++i)
      EXPECT_NEAR(inv[i], 1.0 / std::pow(10000.0, 2.0 * i / D),
                  3e-7 / std::pow(10000.0, 2.0 * i / D))
          << D << " " << i;
  }
}

TEST(RotaryCpu, CuSeqlensPositionsEqualExplicitPositions) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  const Tensor q = random_tensor({10, 2, 8}, DType::kBF16, seed, 0, -1.f, 1.f);
  const Tensor k = random_tensor({10, 3, 8}, DType::kBF16, seed, 1, -1.f, 1.f);
  RotaryFwdParams a;
  a.q = q.clone();
  a.k = k.clone();
  a.pos.cu_seqlens =
      Tensor::from_vector<int32_t>({0, 3, 3, 7}, {4});  // an empty sequence, 3 padding tokens
  rotary_fwd(a, Stream());
  RotaryFwdParams b;
  b.q = q.clone();
  b.k = k.clone();
  b.pos.positions = Tensor::from_vector<int32_t>({0, 1, 2, 0, 1, 2, 3, 0, 1, 2}, {10});
  rotary_fwd(b, Stream());
  EXPECT_TRUE(bitwise_equal(a.q, b.q));
  EXPECT_TRUE(bitwise_equal(a.k, b.k));
  EXPECT_FALSE(bitwise_equal(a.q, q));  // something did rotate
}

// Plain double loops: y = R x (forward) or y = R^T x (backward), with HF's fp32 angle.
std::vector<double> ref_rotate(const Tensor& x, const std::vector<int32_t>& pos, bool inverse) {
  const int64_t T = x.dim(0), H = x.dim(1), D = x.dim(2), half = D / 2;
  const std::vector<float> inv = rotary_inv_freq(D);
  std::vector<double> in = doubles(x), out(in.size());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos[t]) * inv[i];
      const double c = std::cos(double(angle)), s = (inverse ? -1 : 1) * std::sin(double(angle));
      for (int64_t h = 0; h < H; ++h) {
        const int64_t o = (t * H + h) * D;
        out[o + i] = in[o + i] * c - in[o + i + half] * s;
        out[o + i + half] = in[o + i + half] * c + in[o + i] * s;
      }
    }
  return out;
}

TEST(RotaryCpu, ForwardAndBackwardMatchDoubleLoops) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (int64_t D : {2, 16, 24, 64, 128}) {
      const uint64_t seed = fresh_seed();
      SCOPED_TRACE(fmt::format("{} D={} seed={}", dtype_name(dt), D, seed));
      const int64_t T = 71;
      std::vector<int32_t> pos;
      const std::vector<int32_t> cu = random_cu_seqlens(T, seed, &pos);
      const Tensor q = random_tensor({T, 3, D}, dt, seed, 0, -2.f, 2.f);
      const Tensor k = random_tensor({T, 2, D}, dt, seed, 1, -2.f, 2.f);
      RotaryFwdParams f;
      f.q = q.clone();
      f.k = k.clone();
      f.pos.cu_seqlens = Tensor::from_vector<int32_t>(cu, {static_cast<int64_t>(cu.size())});
      rotary_fwd(f, Stream());
      EXPECT_TRUE(near_doubles(f.q, ref_rotate(q, pos, false), tolerance_for(dt)));
      EXPECT_TRUE(near_doubles(f.k, ref_rotate(k, pos, false), tolerance_for(dt)));
      RotaryBwdParams b;
      b.dq = q.clone();
      b.dk = k.clone();
      b.pos.positions = Tensor::from_vector<int32_t>(pos, {T});
      rotary_bwd(b, Stream());
      EXPECT_TRUE(near_doubles(b.dq, ref_rotate(q, pos, true), tolerance_for(dt)));
      EXPECT_TRUE(near_doubles(b.dk, ref_rotate(k, pos, true), tolerance_for(dt)));
    }
  }
}

TEST(RotaryCpu, BackwardIsTheAdjointOfForward) {
  // <R x, w> == <x, R^T w> for the operators as implemented (f32, tolerance of a length-D dot).
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  const int64_t T = 29, H = 4, D = 64;
  const Tensor x = random_tensor({T, H, D}, DType::kF32, seed, 0, -1.f, 1.f);
  const Tensor w = random_tensor({T, H, D}, DType::kF32, seed, 1, -1.f, 1.f);
  std::vector<int32_t> pos(T);
  for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(1000 + 37 * t);
  RotaryFwdParams f;
  f.q = x.clone();
  f.pos.positions = Tensor::from_vector<int32_t>(pos, {T});
  rotary_fwd(f, Stream());
  RotaryBwdParams b;
  b.dq = w.clone();
  b.pos.positions = f.pos.positions;
  rotary_bwd(b, Stream());
  const std::vector<double> rx = doubles(f.q), wv = doubles(w), xv = doubles(x),
                            rtw = doubles(b.dq);
  double lhs = 0, rhs = 0, mag = 0;
  for (size_t i = 0; i < rx.size(); ++i) {
    lhs += rx[i] * wv[i];
    rhs += xv[i] * rtw[i];
    mag += std::abs(xv[i] * wv[i]);
  }
  EXPECT_NEAR(lhs, rhs, 1e-5 * mag);
}

TEST(RotaryCpu, RejectsBadInputs) {
  RotaryFwdParams p;
  p.q = Tensor::zeros({4, 2, 8}, DType::kBF16);
  try {
    rotary_fwd(p, Stream());
    FAIL() << "expected a throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exactly one of cu_seqlens and positions"),
              std::string::npos)
        << e.what();
  }
  p.pos.positions = Tensor::from_vector<int32_t>({0, 1, 2, 3}, {4});
  p.k = Tensor::zeros({4, 2, 16}, DType::kBF16);
  EXPECT_THROW(rotary_fwd(p, Stream()), Error);  // k's D differs from q's
  p.k = Tensor();
  p.q = Tensor::zeros({4, 2, 7}, DType::kBF16);
  EXPECT_THROW(rotary_fwd(p, Stream()), Error);  // odd D
  p.q = Tensor::zeros({4, 2, 8}, DType::kBF16);
  p.pos.positions = Tensor();
  p.pos.cu_seqlens = Tensor::from_vector<int32_t>({0, 3, 2}, {3});
  EXPECT_THROW(rotary_fwd(p, Stream()), Error);  // decreasing cu_seqlens
}

// ---- CUDA against the CPU reference ------------------------------------------------------------
struct Case {
  int64_t T, hq, hk, D;
  DType dt;
  bool explicit_positions;
  bool misaligned;
};

void expect_cuda_matches(const Case& c) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(fmt::format("T={} hq={} hk={} D={} {}{}{} seed={}", c.T, c.hq, c.hk, c.D,
                           dtype_name(c.dt), c.explicit_positions ? " positions" : " cu_seqlens",
                           c.misaligned ? " misaligned" : "", seed));
  std::vector<int32_t> pos;
  const std::vector<int32_t> cu = random_cu_seqlens(c.T, seed, &pos);
  RotaryPositions positions;
  if (c.explicit_positions) {  // global positions as context parallelism produces them
    std::mt19937_64 rng(seed);
    for (int32_t& p : pos)
      p = static_cast<int32_t>(std::uniform_int_distribution<int32_t>(0, 200000)(rng));
    positions.positions = Tensor::from_vector<int32_t>(pos, {c.T});
  } else {
    positions.cu_seqlens = Tensor::from_vector<int32_t>(cu, {static_cast<int64_t>(cu.size())});
  }
  const Tensor q = c.hq ? random_tensor({c.T, c.hq, c.D}, c.dt, seed, 0, -2.f, 2.f) : Tensor();
  const Tensor k = c.hk ? random_tensor({c.T, c.hk, c.D}, c.dt, seed, 1, -2.f, 2.f) : Tensor();
  for (bool backward : {false, true}) {
    SCOPED_TRACE(backward ? "backward" : "forward");
    Tensor qc = q.defined() ? q.clone() : Tensor(), kc = k.defined() ? k.clone() : Tensor();
    const Device gpu = Device::cuda();
    Tensor qg = c.misaligned && q.defined() ? on_misaligned(q, gpu) : on(q, gpu);
    Tensor kg = c.misaligned && k.defined() ? on_misaligned(k, gpu) : on(k, gpu);
    const RotaryPositions pos_gpu{on(positions.cu_seqlens, gpu), on(positions.positions, gpu)};
    const Stream stream = Stream::create(gpu);
    if (!backward) {
      rotary_fwd({qc, kc, positions}, Stream());
      rotary_fwd({qg, kg, pos_gpu}, stream);
    } else {
      rotary_bwd({qc, kc, positions}, Stream());
      rotary_bwd({qg, kg, pos_gpu}, stream);
    }
    stream.synchronize();
    if (q.defined()) EXPECT_TRUE(all_close(host(qg), qc, tolerance_for(c.dt)));
    if (k.defined()) EXPECT_TRUE(all_close(host(kg), kc, tolerance_for(c.dt)));
  }
}

TEST(RotaryCuda, MatchesCpuOnOddShapes) {
  HELIX_REQUIRE_CUDA();
  for (DType dt : {DType::kBF16, DType::kF32}) {
    for (bool explicit_positions : {false, true}) {
      expect_cuda_matches({71, 5, 3, 64, dt, explicit_positions, false});
      expect_cuda_matches({29, 7, 7, 24, dt, explicit_positions, false});
      expect_cuda_matches({1, 1, 1, 2, dt, explicit_positions, false});
      expect_cuda_matches({33, 20, 20, 16, dt, explicit_positions, false});
      expect_cuda_matches({17, 4, 0, 128, dt, explicit_positions, false});  // q only
      expect_cuda_matches({17, 0, 4, 256, dt, explicit_positions, false});  // k only
      expect_cuda_matches({41, 3, 2, 12, dt, explicit_positions, false});   // 2-element vectors
      expect_cuda_matches({41, 3, 2, 64, dt, explicit_positions, true});
    }
  }
}

TEST(RotaryCuda, MatchesCpuOnLargeInputs) {
  HELIX_REQUIRE_CUDA();
  expect_cuda_matches({65536, 20, 20, 64, DType::kBF16, false, false});
  expect_cuda_matches({4099, 40, 40, 128, DType::kBF16, true, false});
}

}  // namespace
}  // namespace helix
