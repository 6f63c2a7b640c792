#include <gtest/gtest.h>

#include "core/allocator.h"
#include "core/tensor.h"
#include "test_util.h"

namespace helix {
namespace {

TEST(Tensor, ShapeStridesAndViews) {
  Tensor t = Tensor::zeros({4, 3, 2}, DType::kF32);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 96u);
  EXPECT_EQ(t.strides()[0], 6);
  EXPECT_EQ(t.strides()[2], 1);
  EXPECT_EQ(t.dim(-1), 2);
  EXPECT_TRUE(t.is_contiguous());
  for (int i = 0; i < 24; ++i) t.data<float>()[i] = float(i);
  Tensor s = t.slice(1, 3);
  EXPECT_EQ(s.shape(), Shape({2, 3, 2}));
  EXPECT_TRUE(s.shares_storage(t));
  EXPECT_EQ(s.data<float>()[0], 6.f);
  Tensor v = s.view({12});
  EXPECT_EQ(v.data<float>()[11], 17.f);
  EXPECT_THROW(t.slice(2, 5), Error);
  EXPECT_THROW(t.view({5, 5}), Error);
  EXPECT_THROW(t.data<int32_t>(), Error);
}

TEST(Tensor, ErrorsNameTheCulprit) {
  Tensor t = Tensor::zeros({71, 229}, DType::kBF16);
  try {
    t.view({70, 229});
    FAIL() << "expected a throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bf16[71, 229]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("tensor.cpp"), std::string::npos) << e.what();
  }
}

TEST(Tensor, FillCastAndClone) {
  Tensor t = Tensor::empty({5}, DType::kBF16);
  t.fill(1.5);
  EXPECT_EQ(t.to_floats(), std::vector<float>(5, 1.5f));
  Tensor f = t.to(DType::kF32);
  EXPECT_EQ(f.dtype(), DType::kF32);
  Tensor c = f.clone();
  c.data<float>()[0] = 7.f;
  EXPECT_EQ(f.data<float>()[0], 1.5f);
  Tensor i = Tensor::from_vector<int32_t>({1, 2, 3}, {3});
  EXPECT_EQ(i.to_vector<int32_t>(), (std::vector<int32_t>{1, 2, 3}));
}

TEST(Allocator, CpuCountsCurrentAndPeak) {
  Allocator& a = allocator_for(Device::cpu());
  const size_t base = a.stats().current_bytes;
  a.reset_peak();
  {
    Tensor x = Tensor::empty({1000}, DType::kF32);
    Tensor y = Tensor::empty({500}, DType::kF64);
    EXPECT_EQ(a.stats().current_bytes, base + 8000);
  }
  EXPECT_EQ(a.stats().current_bytes, base);
  EXPECT_EQ(a.stats().peak_bytes, base + 8000);
}

TEST(Allocator, CudaSizeClasses) {
  EXPECT_EQ(cuda_size_class(1), 512u);
  EXPECT_EQ(cuda_size_class(513), 1024u);
  EXPECT_EQ(cuda_size_class(1u << 20), 1u << 20);
  EXPECT_EQ(cuda_size_class((1u << 20) + 1), 2u << 20);
  EXPECT_EQ(cuda_size_class(5u << 20), 6u << 20);
}

TEST(TensorGpu, RoundTripAndCachingAllocator) {
  HELIX_REQUIRE_CUDA();
  Allocator& a = allocator_for(Device::cuda());
  std::vector<float> v(71 * 229);
  for (size_t i = 0; i < v.size(); ++i) v[i] = float(i) * 0.25f;
  Tensor h = Tensor::from_vector(v, {71, 229});
  const uint64_t sys_before = a.stats().num_system_allocs;
  { Tensor d = h.to(Device::cuda()); }
  Tensor d = h.to(Device::cuda());  // same size class: served from the cache
  EXPECT_EQ(a.stats().num_system_allocs, sys_before + 1);
  EXPECT_EQ(d.to(Device::cpu()).to_vector<float>(), v);
  d.fill(-2.0);
  EXPECT_EQ(d.to_floats(), std::vector<float>(v.size(), -2.f));
  Tensor z = Tensor::zeros({3, 7}, DType::kBF16, Device::cuda());
  EXPECT_EQ(z.to_floats(), std::vector<float>(21, 0.f));
}

}  // namespace
}  // namespace helix
