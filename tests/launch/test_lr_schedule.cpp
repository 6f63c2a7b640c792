#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "launch/lr_schedule.h"

namespace helix {
namespace {

TEST(LrSchedule, WarmupThenDecay) {
  LrSchedule s{.peak_lr = 1e-3, .min_lr = 1e-4, .warmup_steps = 10, .total_steps = 110, .decay = LrDecay::kLinear};
  EXPECT_DOUBLE_EQ(s.at(0), 1e-4);
  EXPECT_DOUBLE_EQ(s.at(9), 1e-3);
  EXPECT_DOUBLE_EQ(s.at(10), 1e-3);
  EXPECT_DOUBLE_EQ(s.at(60), 1e-4 + 0.9e-3 * 0.5);
  EXPECT_DOUBLE_EQ(s.at(110), 1e-4);
  EXPECT_DOUBLE_EQ(s.at(500), 1e-4);
  s.decay = LrDecay::kCosine;
  EXPECT_NEAR(s.at(60), 1e-4 + 0.9e-3 * 0.5, 1e-15);
  EXPECT_NEAR(s.at(35), 1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(M_PI * 0.25)), 1e-15);
  s.decay = LrDecay::kConstant;
  EXPECT_DOUBLE_EQ(s.at(100), 1e-3);
  EXPECT_THROW(parse_lr_decay("step"), Error);
}

}  // namespace
}  // namespace helix
