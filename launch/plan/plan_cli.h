#pragma once
// `helix plan`: the command-line front of launch/plan/plan.h. One layout (a per-rank report) or
// --search over layouts (feasible ones ranked by predicted throughput, rejected ones with the rule
// or the memory they would need). Options parse with Boost.Program_options like `helix train`.
#include <string>
#include <vector>

namespace helix {

// Returns the process exit code.
int cmd_plan(const std::vector<std::string>& args);

}  // namespace helix
