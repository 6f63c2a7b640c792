#include "launch/lr_schedule.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace helix {

double LrSchedule::at(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps) return peak_lr * double(step + 1) / double(warmup_steps);
  if (decay == LrDecay::kConstant) return peak_lr;
  const int64_t span = std::max<int64_t>(1, total_steps - warmup_steps);
  const double t = std::clamp(double(step - warmup_steps) / double(span), 0.0, 1.0);
  const double frac = decay == LrDecay::kLinear ? 1.0 - t : 0.5 * (1.0 + std::cos(M_PI * t));
  return min_lr + (peak_lr - min_lr) * frac;
}

LrDecay parse_lr_decay(const std::string& s) {
  if (s == "constant") return LrDecay::kConstant;
  if (s == "linear") return LrDecay::kLinear;
  if (s == "cosine") return LrDecay::kCosine;
  HELIX_FAIL("--lr-decay: expected constant, linear or cosine, got '{}'", s);
}

}  // namespace helix
