#pragma once
// Finite-difference gradient checker for nodes on the CPU (f64 or f32 inputs). The loss is a fixed
// random projection of the outputs, L = sum_o <w_o, out_o>, summed in double; the analytic gradient
// comes from node->backward with grad_outputs = w. It also checks the node contract: backward must
// ACCUMULATE (the gradient buffers start at a non-zero value) and leave inputs without grad alone.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/autograd.h"

namespace helix {

struct GradCheckOptions {
  double eps = 0;     // step relative to max(1, |x|); 0 = by dtype (f64: 1e-6, f32: 1e-2)
  double rtol = 0;    // 0 = by dtype (f64: 1e-6, f32: 2e-2)
  double atol = 0;    // 0 = by dtype (f64: 1e-8, f32: 2e-3)
  int max_checks_per_input = 64;  // elements probed per input (all when fewer), chosen at random
  uint64_t seed = 1;
};

struct GradCheckResult {
  bool ok = true;
  std::string message;  // first failure: node, input, element, analytic vs numeric
  double max_abs_err = 0;
  int checked = 0;
};

using NodeFactory = std::function<std::shared_ptr<Node>()>;

GradCheckResult check_gradients(const NodeFactory& make_node, const std::vector<Tensor>& inputs,
                                const std::vector<bool>& needs_grad, GradCheckOptions opts = {});

}  // namespace helix
