#pragma once
// The gradient side of tensor, sequence and data parallelism for a ParameterSet: after backward,
// gradients that are partial sums over tp (Parameter::grad_partial, sequence parallelism) are
// all-reduced over tp, then every gradient is summed over dp through a DpGradReducer (buckets that
// own the gradient buffers). Sum, not mean: the loss gradient is already scaled by 1 / labelled
// tokens of the global batch, so DP=N equals one rank on the same global batch.
#include <memory>

#include "layers/optimizer.h"
#include "layers/parameter.h"
#include "parallel/context.h"
#include "parallel/dp_grad_reducer.h"

namespace helix {

class GradSync {
 public:
  // `ctx` null: one device, every call is local.
  GradSync(ParameterSet& params, const ParallelContext* ctx);

  // Zeroes every gradient in place (under dp > 1 the gradients are the reducer's bucket slots).
  void zero_grads(const Stream& stream);
  // After the step's last backward: tp sum of partial gradients, then dp sum of all.
  void reduce(const Stream& stream);
  // For AdamW::step: sums the shards' sum of squares over tp, maxes the non-finite flag over the
  // world (every rank then applies or skips the step alike). Empty on one device.
  AdamW::NormReduce norm_reduce() const;
  // Sums a [n] f32/f64/i64 tensor of per-rank totals (loss sum, labelled tokens) over dp in place.
  void sum_over_dp(const Tensor& t, const Stream& stream) const;

 private:
  ParameterSet& params_;
  const ParallelContext* ctx_;
  std::unique_ptr<DpGradReducer> dp_;
};

}  // namespace helix
