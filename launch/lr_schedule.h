#pragma once
// Learning-rate schedules: linear warmup from 0 to the peak, then constant, linear or cosine decay to
// `min_lr` at `total_steps`. A pure function of the step, so resume needs only the step counter.
#include <cstdint>
#include <string>

namespace helix {

enum class LrDecay { kConstant, kLinear, kCosine };

struct LrSchedule {
  double peak_lr = 4e-4;
  double min_lr = 0.0;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  LrDecay decay = LrDecay::kLinear;

  // Learning rate used by optimizer step `step` (0-based).
  double at(int64_t step) const;
};

LrDecay parse_lr_decay(const std::string& s);  // "constant" | "linear" | "cosine", error names --lr-decay

}  // namespace helix
