#include <gtest/gtest.h>

#include "core/philox.h"
#include "core/random.h"
#include "test_util.h"

namespace helix {
namespace {

// Known-answer vectors of Philox4x32-10 (Random123's kat_vectors).
TEST(Philox, KnownAnswers) {
  U32x4 r = philox4x32_10(U32x4{{0, 0, 0, 0}}, 0, 0);
  EXPECT_EQ(r.v[0], 0x6627e8d5u);
  EXPECT_EQ(r.v[1], 0xe169c58du);
  EXPECT_EQ(r.v[2], 0xbc57ac4cu);
  EXPECT_EQ(r.v[3], 0x9b00dbd8u);
  r = philox4x32_10(U32x4{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu);
  EXPECT_EQ(r.v[0], 0x408f276du);
  EXPECT_EQ(r.v[1], 0x41c83b0eu);
  EXPECT_EQ(r.v[2], 0xa20bc7c6u);
  EXPECT_EQ(r.v[3], 0x6d5451fdu);
  r = philox4x32_10(U32x4{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u);
  EXPECT_EQ(r.v[0], 0xd16cfe09u);
  EXPECT_EQ(r.v[1], 0x94fdccebu);
  EXPECT_EQ(r.v[2], 0x5001e420u);
  EXPECT_EQ(r.v[3], 0x24126ea1u);
}

TEST(Philox, StreamsAreAddressable) {
  // Element i of a stream equals word i%4 of block i/4; different seeds/subsequences differ.
  for (uint64_t i = 0; i < 64; ++i)
    EXPECT_EQ(philox_u32(7, 3, i), philox_block(7, 3, i / 4).v[i % 4]);
  EXPECT_NE(philox_u32(7, 3, 0), philox_u32(8, 3, 0));
  EXPECT_NE(philox_u32(7, 3, 0), philox_u32(7, 4, 0));
}

TEST(Random, UniformAndNormalMoments) {
  Tensor u = Tensor::empty({100000}, DType::kF32);
  fill_uniform(u, 1, 0, -1.f, 3.f);
  Tensor n = Tensor::empty({100000}, DType::kF32);
  fill_normal(n, 1, 1, 2.f, 0.5f);
  double su = 0, sn = 0, sn2 = 0;
  float lo = 1e9f, hi = -1e9f;
  for (int64_t i = 0; i < 100000; ++i) {
    const float x = u.data<float>()[i];
    su += x;
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    sn += n.data<float>()[i];
    sn2 += double(n.data<float>()[i]) * n.data<float>()[i];
  }
  EXPECT_NEAR(su / 1e5, 1.0, 0.02);
  EXPECT_GE(lo, -1.f);
  EXPECT_LT(hi, 3.f);
  const double mean = sn / 1e5;
  EXPECT_NEAR(mean, 2.0, 0.01);
  EXPECT_NEAR(std::sqrt(sn2 / 1e5 - mean * mean), 0.5, 0.01);
}

TEST(RandomGpu, SameNumbersOnCpuAndGpu) {
  HELIX_REQUIRE_CUDA();
  for (DType dt : {DType::kF32, DType::kBF16}) {
    Tensor c = Tensor::empty({1 << 20}, dt);
    Tensor g = Tensor::empty({1 << 20}, dt, Device::cuda());
    fill_uniform(c, 42, 9, -0.5f, 0.5f);
    fill_uniform(g, 42, 9, -0.5f, 0.5f);
    Tensor gh = g.to(Device::cpu());
    EXPECT_EQ(std::memcmp(c.data_ptr(), gh.data_ptr(), c.nbytes()), 0) << "uniform " << dtype_name(dt);
  }
  Tensor c = Tensor::empty({1 << 20}, DType::kF32);
  Tensor g = Tensor::empty({1 << 20}, DType::kF32, Device::cuda());
  fill_normal(c, 42, 10, 0.f, 1.f);
  fill_normal(g, 42, 10, 0.f, 1.f);
  EXPECT_TRUE(testing::all_close(g, c, {1e-5, 1e-5}));
}

}  // namespace
}  // namespace helix
