#pragma once
// Shared test helpers: GPU skips with a reason, tolerance table per dtype, comparisons.
#include <gtest/gtest.h>

#include <cmath>

#include "core/device.h"
#include "core/tensor.h"

namespace helix::testing {

// Skips the current test, saying why, when no CUDA device is usable.
#define HELIX_REQUIRE_CUDA()                                                                      \
  do {                                                                                            \
    if (!::helix::cuda_available())                                                               \
      GTEST_SKIP() << "needs a CUDA GPU: " << ::helix::cuda_unavailable_reason();                 \
  } while (0)

// One tolerance table per dtype (STYLE.md): relative and absolute error allowed against a reference.
struct Tolerance {
  double rtol, atol;
};
inline Tolerance tolerance_for(DType t) {
  switch (t) {
    case DType::kF64: return {1e-12, 1e-12};
    case DType::kF32: return {1e-5, 1e-6};
    case DType::kBF16: return {1.6e-2, 1e-2};
    case DType::kE4M3: return {1.25e-1, 1e-1};
    case DType::kE5M2: return {2.5e-1, 1e-1};
    default: return {0, 0};
  }
}

// Element-wise |a - b| <= atol + rtol * |b|; reports the first offending element.
inline ::testing::AssertionResult all_close(const Tensor& actual, const Tensor& expected, Tolerance tol) {
  if (!(actual.shape() == expected.shape()))
    return ::testing::AssertionFailure() << "shape " << actual.shape().str() << " vs " << expected.shape().str();
  const std::vector<float> a = actual.to_floats(), b = expected.to_floats();
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - double(b[i]));
    if (!(d <= tol.atol + tol.rtol * std::abs(double(b[i]))))
      return ::testing::AssertionFailure() << "element " << i << ": " << a[i] << " vs expected " << b[i]
                                           << " (|diff| " << d << ")";
  }
  return ::testing::AssertionSuccess();
}

}  // namespace helix::testing
