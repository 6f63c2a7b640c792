#include <gtest/gtest.h>

#include "core/random.h"
#include "kernels/qkv/qkv.h"
#include "test_util.h"

namespace helix {
namespace {

TEST(Qkv, SplitAndJoinOnCpu) {
  const int64_t t = 7, h = 5;
  Tensor qkv = Tensor::empty({t, 3 * h}, DType::kF32);
  fill_normal(qkv, 4, 0, 0.f, 1.f);
  Tensor q = Tensor::empty({t, h}, DType::kF32), k = q.clone(), v = q.clone();
  qkv_split({qkv, q, k, v}, Stream());
  for (int64_t r = 0; r < t; ++r)
    for (int64_t c = 0; c < h; ++c) {
      EXPECT_EQ(q.data<float>()[r * h + c], qkv.data<float>()[r * 3 * h + c]);
      EXPECT_EQ(k.data<float>()[r * h + c], qkv.data<float>()[r * 3 * h + h + c]);
      EXPECT_EQ(v.data<float>()[r * h + c], qkv.data<float>()[r * 3 * h + 2 * h + c]);
    }
  Tensor d = qkv.clone();
  qkv_join_grad({q, k, v, d}, Stream());  // accumulate: d = qkv + qkv
  for (int64_t i = 0; i < d.numel(); ++i) EXPECT_EQ(d.data<float>()[i], 2 * qkv.data<float>()[i]);
  EXPECT_THROW(qkv_split({qkv, Tensor::empty({t, h + 1}, DType::kF32), k, v}, Stream()), Error);
}

TEST(QkvGpu, MatchesCpu) {
  HELIX_REQUIRE_CUDA();
  for (DType dt : {DType::kF32, DType::kBF16})
    for (int64_t t : {1, 71, 4099})
    for (int64_t h : {320, 33}) {  // 16-byte packs, and the scalar fallback
      Tensor qkv = Tensor::empty({t, 3 * h}, dt);
      fill_normal(qkv, 5, t, 0.f, 1.f);
      Tensor q = Tensor::empty({t, h}, dt), k = q.clone(), v = q.clone();
      qkv_split({qkv, q, k, v}, Stream());
      Tensor d = qkv.clone();
      qkv_join_grad({q, k, v, d}, Stream());
      const Stream s = Stream::cuda_default();
      Tensor qg = Tensor::empty({t, h}, dt, Device::cuda()), kg = qg.clone(s), vg = qg.clone(s);
      qg.fill(std::nan(""), s);
      qkv_split({qkv.to(Device::cuda()), qg, kg, vg}, s);
      Tensor dg = qkv.to(Device::cuda());
      qkv_join_grad({qg, kg, vg, dg}, s);
      const Tensor a = qg.to(Device::cpu()), b = dg.to(Device::cpu());
      EXPECT_EQ(std::memcmp(a.data_ptr(), q.data_ptr(), q.nbytes()), 0);
      EXPECT_EQ(std::memcmp(b.data_ptr(), d.data_ptr(), d.nbytes()), 0);
    }
}

}  // namespace
}  // namespace helix
