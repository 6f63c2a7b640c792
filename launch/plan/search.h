#pragma once
// Layout search for `helix plan --search`: enumerates (tp, cp, pp, virtual stages, ZeRO,
// micro-batches, recompute) for a model and GPU count, ranks the feasible layouts by predicted
// tokens/s, and gives each rejected layout family the reason it fails (a rule it breaks, the memory
// it would need, or its pipeline bubble).
#include <string>
#include <vector>

#include "launch/plan/plan.h"

namespace helix {

struct SearchOptions {
  std::vector<int> tp{1, 2, 4, 8, 16};
  std::vector<int> cp{1, 2, 4, 8};
  std::vector<int> pp{1, 2, 4, 8, 16, 32, 64};
  std::vector<int> virtual_stages{1, 2, 4};
  std::vector<int> zero{0, 1, 2, 3};
  std::vector<int> micro_batches{1, 2, 4, 8, 16, 32, 64, 128, 256};
  std::vector<RecomputeMode> recompute{RecomputeMode::kNone, RecomputeMode::kSelective,
                                       RecomputeMode::kFull};
  double max_bubble = 0.5;  // a layout idling more than this share of the step is rejected
};

struct SearchCandidate {
  PlanLayout layout;
  PlanResult result;
};

// A (tp, cp, pp, v, zero) family none of whose (micro-batches, recompute) variants is feasible.
struct SearchRejection {
  PlanLayout layout;   // the variant the reason is about (the closest one to fitting)
  std::string reason;  // "rule: ...", "memory: ...", "bubble: ..."
};

struct SearchResult {
  std::vector<SearchCandidate> feasible;  // best first
  std::vector<SearchRejection> rejected;  // memory first, then bubble, then rules
  int evaluated = 0;
};

// `base` gives the model, GPU count, tokens per step, FP8 and the rest; its layout is ignored.
SearchResult search_layouts(const PlanInput& base, const Calibration& cal,
                            const SearchOptions& opts);

}  // namespace helix
