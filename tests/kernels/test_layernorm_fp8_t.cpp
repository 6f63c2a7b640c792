// LayerNorm with fp8 output and its transpose (the two FP8 GEMM operands from one pass): y_t is
// exactly the transpose of y's codes, y is bitwise the same with and without y_t (on every device),
// the amax accumulates when asked, bad y_t is refused; on CUDA the same on full and partial tiles of
// both tile heights, the vector and byte paths, and y against the CPU reference.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/layernorm/layernorm.h"

namespace helix {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::fresh_seed;
using testing::host;
using testing::on;
using testing::on_misaligned;
using testing::poisoned;
using testing::random_tensor;
using testing::tolerance_for;

struct Case {
  DType x = DType::kBF16, w = DType::kF32, y = DType::kE4M3;
  int64_t T = 32, C = 64;
  bool misaligned_x = false;
};

struct Out {
  Tensor y, y_t, amax, mean, rstd;
};

struct Inputs {
  Tensor x, g, b, scale;
};

Inputs make_inputs(const Case& c, uint64_t seed) {
  return {random_tensor({c.T, c.C}, c.x, seed, 0, -3.f, 5.f),
          random_tensor({c.C}, c.w, seed, 1, 0.5f, 1.5f),
          random_tensor({c.C}, c.w, seed, 2, -0.5f, 0.5f),
          Tensor::from_floats({c.y == DType::kE4M3 ? 96.f : 4096.f}, {1}, DType::kF32)};
}

// with_t: also write y_t; amax0 < 0: overwrite the amax, else accumulate onto amax0.
Out run(const Case& c, const Inputs& in, Device dev, bool with_t, float amax0) {
  Out o;
  o.y = poisoned({c.T, c.C}, c.y, dev);
  if (with_t) o.y_t = poisoned({c.C, c.T}, c.y, dev);
  o.amax = on(Tensor::from_floats({amax0 < 0 ? 1e30f : amax0}, {1}, DType::kF32), dev);
  o.mean = poisoned({c.T}, DType::kF32, dev);
  o.rstd = poisoned({c.T}, DType::kF32, dev);
  LayerNormFwdParams p;
  p.x = c.misaligned_x ? on_misaligned(in.x, dev) : on(in.x, dev);
  p.gamma = on(in.g, dev);
  p.beta = on(in.b, dev);
  p.y = o.y;
  p.y_scale = on(in.scale, dev);
  p.y_amax = o.amax;
  p.accumulate_amax = amax0 >= 0;
  p.y_t = o.y_t;
  p.mean = o.mean;
  p.rstd = o.rstd;
  const Stream stream = dev.is_cuda() ? Stream::create(dev) : Stream();
  layernorm_fwd(p, stream);
  stream.synchronize();
  return {host(o.y), host(o.y_t), host(o.amax), host(o.mean), host(o.rstd)};
}

// The transpose of fp8 codes [T, C] as a [C, T] tensor of the same dtype.
Tensor transposed(const Tensor& y) {
  const int64_t T = y.dim(0), C = y.dim(1);
  Tensor t = Tensor::empty({C, T}, y.dtype());
  const auto* src = static_cast<const unsigned char*>(y.data_ptr());
  auto* dst = static_cast<unsigned char*>(t.data_ptr());
  for (int64_t r = 0; r < T; ++r)
    for (int64_t k = 0; k < C; ++k) dst[k * T + r] = src[r * C + k];
  return t;
}

std::string name(const Case& c) {
  return fmt::format("x {} w {} y {} T={} C={}{}", dtype_name(c.x), dtype_name(c.w),
                     dtype_name(c.y), c.T, c.C, c.misaligned_x ? " misaligned" : "");
}

// On `dev`: y_t is y's transpose, y and the statistics equal a run without y_t bit for bit, and the
// amax accumulates (a larger start stays, a zero start takes the overwrite result).
void expect_consistent(const Case& c, Device dev) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(fmt::format("{} on {} seed={}", name(c), dev.str(), seed));
  const Inputs in = make_inputs(c, seed);
  const Out plain = run(c, in, dev, false, -1.f);
  const Out fused = run(c, in, dev, true, 0.f);
  EXPECT_TRUE(bitwise_equal(fused.y_t, transposed(fused.y)));
  // Every kernel takes the same reduction order with and without y_t (the FP8 layers skip y_t in a
  // forward that no backward follows, and a recomputed layer must see the same values).
  EXPECT_TRUE(bitwise_equal(fused.y, plain.y));
  EXPECT_TRUE(bitwise_equal(fused.mean, plain.mean));
  EXPECT_TRUE(bitwise_equal(fused.rstd, plain.rstd));
  EXPECT_TRUE(bitwise_equal(fused.amax, plain.amax));  // max(0, amax) == amax
  const Out big = run(c, in, dev, true, 1e6f);
  EXPECT_EQ(big.amax.to_floats()[0], 1e6f);
}

TEST(LayerNormFp8TransposeCpu, TransposeAndAmaxAreConsistent) {
  for (DType x : {DType::kBF16, DType::kF32})
    for (DType y : {DType::kE4M3, DType::kE5M2})
      for (auto [T, C] : {std::pair<int64_t, int64_t>{32, 64}, {48, 40}, {7, 13}, {1, 1}})
        expect_consistent(Case{.x = x, .w = DType::kF32, .y = y, .T = T, .C = C}, Device::cpu());
}

TEST(LayerNormFp8TransposeCpu, AmaxOverwritesUnlessAccumulating) {
  const Case c;
  const Inputs in = make_inputs(c, fresh_seed());
  const float a = run(c, in, Device::cpu(), false, -1.f).amax.to_floats()[0];
  EXPECT_GT(a, 0.f);
  EXPECT_LT(a, 1e30f);  // the 1e30 start was overwritten
  EXPECT_EQ(run(c, in, Device::cpu(), false, a / 2).amax.to_floats()[0], a);
}

TEST(LayerNormFp8TransposeCpu, RejectsBadTranspose) {
  const Case c;
  const Inputs in = make_inputs(c, fresh_seed());
  LayerNormFwdParams p;
  p.x = in.x;
  p.gamma = in.g;
  p.beta = in.b;
  p.y = Tensor::zeros({c.T, c.C}, DType::kE4M3);
  p.y_scale = in.scale;
  p.y_t = Tensor::zeros({c.T, c.C}, DType::kE4M3);  // not [C, T]
  EXPECT_THROW(layernorm_fwd(p, Stream()), Error);
  p.y_t = Tensor::zeros({c.C, c.T}, DType::kE5M2);  // not y's dtype
  EXPECT_THROW(layernorm_fwd(p, Stream()), Error);
  p.y = Tensor::zeros({c.T, c.C}, DType::kBF16);  // y_t needs an fp8 y
  p.y_scale = Tensor();
  p.y_t = Tensor::zeros({c.C, c.T}, DType::kBF16);
  try {
    layernorm_fwd(p, Stream());
    ADD_FAILURE() << "a bf16 y with y_t was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("y_t"), std::string::npos) << e.what();
  }
}

// CUDA: the warp-per-row kernel (bf16 x, C <= 4096; 16-row tiles of two rows a warp up to C = 2560
// and of one row a warp at C = 3072), a partial last tile, T not a multiple of 16 (the byte
// transpose); the generic kernel (f32 x, odd C, misaligned x: 32-row tiles; C = 5120, 6144, 8192:
// 16-row tiles); y against the CPU.
TEST(LayerNormFp8TransposeCuda, MatchesTransposeAndCpu) {
  HELIX_REQUIRE_CUDA();
  const Case cases[] = {
      {DType::kBF16, DType::kF32, DType::kE4M3, 256, 2560},
      {DType::kBF16, DType::kBF16, DType::kE4M3, 8192, 1280},
      {DType::kBF16, DType::kF32, DType::kE5M2, 48, 2560},
      {DType::kBF16, DType::kF32, DType::kE4M3, 64, 5120},
      {DType::kBF16, DType::kBF16, DType::kE5M2, 24, 6144},
      {DType::kBF16, DType::kF32, DType::kE4M3, 96, 3072},
      {DType::kBF16, DType::kF32, DType::kE4M3, 40, 8192},
      {DType::kF32, DType::kF32, DType::kE4M3, 37, 229},
      {DType::kBF16, DType::kF32, DType::kE5M2, 33, 320},
      {DType::kF32, DType::kBF16, DType::kE5M2, 160, 1280},
      {DType::kBF16, DType::kF32, DType::kE4M3, 1, 64},
  };
  for (const Case& c : cases) {
    expect_consistent(c, Device::cuda());
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(fmt::format("{} against the CPU, seed={}", name(c), seed));
    const Inputs in = make_inputs(c, seed);
    const Out ref = run(c, in, Device::cpu(), true, 0.f);
    const Out got = run(c, in, Device::cuda(), true, 0.f);
    EXPECT_TRUE(all_close(got.y, ref.y, tolerance_for(c.y)));
    EXPECT_TRUE(all_close(got.y_t, ref.y_t, tolerance_for(c.y)));
    EXPECT_TRUE(all_close(got.amax, ref.amax, tolerance_for(DType::kF32)));
  }
  Case m{DType::kBF16, DType::kF32, DType::kE4M3, 64, 1280};
  m.misaligned_x = true;
  expect_consistent(m, Device::cuda());
}

}  // namespace
}  // namespace helix
