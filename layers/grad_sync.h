#pragma once
// The gradient side of tensor, sequence and data parallelism for a ParameterSet: after backward,
// gradients that are partial sums over tp (Parameter::grad_partial, sequence parallelism) are
// all-reduced over tp, then every gradient is summed over dp through a DpGradReducer (buckets that
// own the gradient buffers). Sum, not mean: the loss gradient is already scaled by 1 / labelled
// tokens of the global batch, so DP=N equals one rank on the same global batch. Under context
// parallelism (cp > 1) the sum runs over the dp_cp group (cp ranks hold other tokens of the batch).
// Overlap: ready_hook() is the Tape's on_grad_ready for the step's last micro-batch; each parameter
// whose gradient is final is (tp-summed if partial, then) marked ready in the reducer, so buckets
// are reduced while backward goes on (on the GPU on the reducer's stream); reduce() finishes.
#include <functional>
#include <memory>
#include <unordered_map>

#include "layers/optimizer.h"
#include "layers/parameter.h"
#include "parallel/context.h"
#include "parallel/dp_grad_reducer.h"

namespace helix {

class GradSync {
 public:
  // `ctx` null: one device, every call is local. `dp_bucket_bytes`: DpReducerOptions::bucket_bytes.
  GradSync(ParameterSet& params, const ParallelContext* ctx, size_t dp_bucket_bytes = size_t{25} << 20);

  // Zeroes every gradient in place (under dp > 1 the gradients are the reducer's bucket slots).
  void zero_grads(const Stream& stream);
  // The Tape hook (TapeOptions::on_grad_ready) for the backward of the step's LAST micro-batch
  // (earlier micro-batches still accumulate, so they run without it). Empty when dp == 1 (nothing
  // to overlap). Captures `this` and `stream`: the GradSync must outlive the tape's backward.
  std::function<void(const std::shared_ptr<GradCell>&)> ready_hook(const Stream& stream);
  // After the step's last backward: tp sum of the partial gradients not summed yet, then dp sum of
  // all (waits for the buckets launched during backward).
  void reduce(const Stream& stream);
  // For AdamW::step: sums the shards' sum of squares over tp, maxes the non-finite flag over the
  // world (every rank then applies or skips the step alike). Empty on one device.
  AdamW::NormReduce norm_reduce() const;
  // Sums a [n] f32/f64/i64 tensor of per-rank totals (loss sum, labelled tokens) over dp in place.
  void sum_over_dp(const Tensor& t, const Stream& stream) const;
  // dp > 1: the reducer's buckets, and how many of them are launched in the current step.
  size_t dp_num_buckets() const { return dp_ ? dp_->num_buckets() : 0; }
  size_t dp_buckets_launched() const { return dp_ ? dp_->num_launched() : 0; }

 private:
  void tp_sum_partial(size_t i, const Stream& stream);

  ParameterSet& params_;
  const ParallelContext* ctx_;
  std::unique_ptr<DpGradReducer> dp_;
  std::unordered_map<const GradCell*, size_t> index_;  // parameter index of each gradient cell
  std::vector<bool> tp_summed_;                         // this step, per parameter
};

}  // namespace helix
