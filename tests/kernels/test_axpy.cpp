#include <gtest/gtest.h>

#include "core/random.h"
#include "kernels/axpy/axpy.h"
#include "test_util.h"

namespace helix {
namespace {

TEST(Axpy, CpuAgainstDouble) {
  for (DType xd : {DType::kF32, DType::kBF16})
    for (DType yd : {DType::kF32, DType::kBF16}) {
      Tensor x = Tensor::empty({29, 541}, xd), y = Tensor::empty({29, 541}, yd);
      fill_normal(x, 1, 0, 0.f, 1.f);
      fill_normal(y, 1, 1, 0.f, 1.f);
      const std::vector<float> xv = x.to_floats(), yv = y.to_floats();
      axpy(-0.5f, x, y, Stream());
      const std::vector<float> r = y.to_floats();
      for (size_t i = 0; i < r.size(); ++i) {
        const double want = double(yv[i]) - 0.5 * double(xv[i]);
        ASSERT_NEAR(r[i], want, yd == DType::kBF16 ? 1e-2 * (1 + std::abs(want)) : 1e-6) << i;
      }
    }
  EXPECT_THROW(axpy(1.f, Tensor::empty({3}, DType::kF32), Tensor::empty({4}, DType::kF32), Stream()), Error);
}

TEST(AxpyGpu, MatchesCpu) {
  HELIX_REQUIRE_CUDA();
  for (int64_t n : {1, 7, 71 * 229, 1 << 20})
    for (DType xd : {DType::kF32, DType::kBF16})
    for (DType yd : {DType::kF32, DType::kBF16}) {
      Tensor x = Tensor::empty({n}, xd), y = Tensor::empty({n}, yd);
      fill_normal(x, 2, n, 0.f, 1.f);
      fill_normal(y, 3, n, 0.f, 1.f);
      Tensor yg = y.to(Device::cuda());
      axpy(1.5f, x.to(Device::cuda()), yg, Stream::cuda_default());
      axpy(1.5f, x, y, Stream());
      // Same f32 math on both sides: bitwise equal.
      const Tensor back = yg.to(Device::cpu());
      EXPECT_EQ(std::memcmp(back.data_ptr(), y.data_ptr(), y.nbytes()), 0) << n;
    }
}

}  // namespace
}  // namespace helix
