#pragma once
// Helpers for the op tests: fresh seeds (replayable with HELIX_TEST_SEED), random and NaN-poisoned
// tensors, device moves (also to a deliberately misaligned address), bitwise comparison, and the
// comparison of sums whose error bound is relative to the sum of the magnitudes of their terms.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/random.h"
#include "core/tensor.h"
#include "test_util.h"

namespace helix::testing {

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Fresh inputs every run; HELIX_TEST_SEED=<n> replays a failing run (tests print the seed they
// use).
inline uint64_t fresh_seed() {
  if (const char* s = std::getenv("HELIX_TEST_SEED")) return std::stoull(s);
  static std::random_device rd;
  return (uint64_t{rd()} << 32) | rd();
}

// A CPU tensor of uniform values in [lo, hi), stream (seed, sub).
inline Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, uint64_t sub, float lo,
                            float hi) {
  Tensor t = Tensor::empty(shape, dtype);
  fill_uniform(t, seed, sub, lo, hi);
  return t;
}

// An output filled with NaN (fp8: the NaN code; ints: not supported), so unwritten elements fail.
inline Tensor poisoned(const Shape& shape, DType dtype, Device dev) {
  Tensor t = Tensor::empty(shape, dtype, dev);
  t.fill(kNaN);
  return t;
}

inline Tensor on(const Tensor& t, Device dev) { return t.defined() ? t.to(dev) : Tensor(); }
inline Tensor host(const Tensor& t) { return t.defined() ? t.to(Device::cpu()) : Tensor(); }

// A copy on `dev` whose data starts one element into its storage (not 16-byte aligned).
inline Tensor on_misaligned(const Tensor& t, Device dev) {
  const int64_t n = t.numel();
  Tensor flat = Tensor::zeros({n + 1}, t.dtype(), dev);
  flat.slice(1, n + 1).copy_from(t.view({n}).to(dev));
  return flat.slice(1, n + 1).view(t.shape());
}

inline std::vector<double> doubles(const Tensor& t) {
  const std::vector<float> f = t.to_floats();
  return {f.begin(), f.end()};
}

inline bool bitwise_equal(const Tensor& a, const Tensor& b) {
  const Tensor ha = host(a), hb = host(b);
  return ha.dtype() == hb.dtype() && ha.shape() == hb.shape() &&
         std::memcmp(ha.data_ptr(), hb.data_ptr(), ha.nbytes()) == 0;
}

// |actual - expected| <= atol + rtol * bound, element-wise. With bound = |expected| this is the
// usual relative test; for sums, bound = sum of |terms| is the scale of the rounding error of any
// order.
inline ::testing::AssertionResult close_within(const Tensor& actual,
                                               const std::vector<double>& expected,
                                               const std::vector<double>& bound, Tolerance tol) {
  const std::vector<float> a = actual.to_floats();
  if (a.size() != expected.size() || a.size() != bound.size())
    return ::testing::AssertionFailure()
           << "sizes " << a.size() << ", " << expected.size() << ", " << bound.size();
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(a[i] - expected[i]);
    if (!(d <= tol.atol + tol.rtol * bound[i]))
      return ::testing::AssertionFailure()
             << "element " << i << ": " << a[i] << " vs expected " << expected[i] << " (|diff| "
             << d << ", bound " << bound[i] << ")";
  }
  return ::testing::AssertionSuccess();
}
inline ::testing::AssertionResult near_doubles(const Tensor& actual,
                                               const std::vector<double>& expected, Tolerance tol) {
  std::vector<double> mag(expected.size());
  for (size_t i = 0; i < mag.size(); ++i) mag[i] = std::abs(expected[i]);
  return close_within(actual, expected, mag, tol);
}

// cu_seqlens [b+1] of random sequence lengths in [0, max_len] (0: T / 3; empty sequences included)
// summing to at most T - T/10, so that some tokens are padding; optionally the positions they
// imply.
inline std::vector<int32_t> random_cu_seqlens(int64_t T, uint64_t seed,
                                              std::vector<int32_t>* positions,
                                              int64_t max_len = 0) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> length(
      0, std::max<int64_t>(1, max_len > 0 ? max_len : T / 3));
  std::vector<int32_t> cu = {0};
  while (cu.back() < T) {
    const int64_t len = length(rng);
    if (cu.back() + len > T - T / 10) break;  // leave some padding
    cu.push_back(static_cast<int32_t>(cu.back() + len));
  }
  if (!positions) return cu;
  positions->assign(static_cast<size_t>(T), 0);
  size_t s = 0;
  for (int64_t t = 0; t < T; ++t) {
    while (s + 1 < cu.size() && cu[s + 1] <= t) ++s;
    (*positions)[t] = static_cast<int32_t>(t - cu[s]);
  }
  return cu;
}

}  // namespace helix::testing
