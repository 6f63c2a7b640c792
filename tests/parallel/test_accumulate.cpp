// accumulate (dst += src): the CPU loop against a double-precision loop for every dtype pair, and
// the CUDA kernel against the CPU loop on odd sizes (skipped without a GPU). Single process.
#include <gtest/gtest.h>

#include "core/random.h"
#include "parallel/accumulate.h"
#include "test_util.h"

namespace helix {
namespace {

Tensor random(int64_t n, DType t, uint64_t seed) {
  Tensor x = Tensor::empty({n}, t);
  fill_uniform(x, seed, 0, -4.0f, 4.0f);
  return x;
}

struct Pair {
  DType dst, src;
};
const Pair kPairs[] = {{DType::kF32, DType::kF32},
                       {DType::kF32, DType::kBF16},
                       {DType::kBF16, DType::kF32},
                       {DType::kBF16, DType::kBF16},
                       {DType::kF64, DType::kF64}};

TEST(Accumulate, CpuEqualsDoubleLoop) {
  for (const Pair& p : kPairs) {
    SCOPED_TRACE(std::string(dtype_name(p.dst)) + " += " + std::string(dtype_name(p.src)));
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{71 * 229}}) {
      Tensor d = random(n, p.dst, 1), s = random(n, p.src, 2);
      // Expected: the sum in double, rounded once to dst's dtype (bf16 rounds the fp32 sum).
      std::vector<double> want(static_cast<size_t>(n));
      for (int64_t i = 0; i < n; ++i) {
        const double sum = cpu_value(d, i) + cpu_value(s, i);
        want[static_cast<size_t>(i)] =
            p.dst == DType::kF64 ? sum
            : p.dst == DType::kF32
                ? double(float(sum))
                : double(bf16_t::from_float(float(cpu_value(d, i)) + float(cpu_value(s, i)))
                             .to_float());
      }
      accumulate(d, s, Stream());
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(cpu_value(d, i), want[static_cast<size_t>(i)]) << "element " << i;
    }
  }
}

TEST(Accumulate, ShapesMayDifferButNotSizesOrDtypes) {
  Tensor d = Tensor::zeros({6}, DType::kF32);
  accumulate(d, Tensor::from_floats({1, 2, 3, 4, 5, 6}, {2, 3}, DType::kF32), Stream());
  EXPECT_EQ(d.to_floats(), (std::vector<float>{1, 2, 3, 4, 5, 6}));
  EXPECT_THROW(accumulate(d, Tensor::zeros({5}, DType::kF32), Stream()), Error);
  EXPECT_THROW(accumulate(d, Tensor::zeros({6}, DType::kI32), Stream()), Error);
  EXPECT_THROW(accumulate(d, Tensor::zeros({6}, DType::kF64), Stream()), Error);
}

TEST(AccumulateGpu, CudaEqualsCpu) {
  HELIX_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  Stream stream = Stream::create(gpu);
  for (const Pair& p : kPairs) {
    SCOPED_TRACE(std::string(dtype_name(p.dst)) + " += " + std::string(dtype_name(p.src)));
    for (int64_t n : {int64_t{1}, int64_t{71 * 229}, int64_t{29 * 541}, int64_t{1000003}}) {
      Tensor d = random(n, p.dst, 3 + n), s = random(n, p.src, 4 + n);
      Tensor dg = d.to(gpu), sg = s.to(gpu);
      accumulate(d, s, Stream());
      accumulate(dg, sg, stream);
      stream.synchronize();
      // Same fp32 arithmetic and rounding on both sides: bitwise equal.
      EXPECT_TRUE(testing::all_close(dg.to(Device::cpu()), d, {0, 0})) << "n " << n;
    }
  }
}

}  // namespace
}  // namespace helix
