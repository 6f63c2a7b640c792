#pragma once
// AdamW on the shards of a ZeroSync: every rank updates only its shard of each unit's flat fp32
// master and moments, with the same multi-tensor kernels as AdamW (one AdamWTensor per piece of a
// parameter that lies in the shard, so weight decay stays per parameter and padding is never
// touched). Clipping uses the global norm: the shards' sums of squares are summed over the shard
// group, tensor-parallel pieces also over tp (replicated ones count once), every stage's over pp
// (the tied embedding counted on the first stage only), the non-finite flag is
// maxed over the world. Stages 1-2 then all-gather the updated model copies (ZeroSync::after_step).
#include "layers/optimizer.h"
#include "layers/zero_sync.h"

namespace helix {

class ZeroAdamW {
 public:
  ZeroAdamW(ZeroSync& zero, AdamWConfig config);

  // As AdamW::step, after ZeroSync::reduce. Collective over the world (norm and flag).
  OptimizerStepResult step(double lr, bool loss_finite, const Stream& stream);

  int64_t steps_applied() const { return step_; }
  void set_steps_applied(int64_t s) { step_ = s; }
  const AdamWConfig& config() const { return cfg_; }

 private:
  ZeroSync& zero_;
  AdamWConfig cfg_;
  AdamWTensorList adam_list_;
  GradNormTensorList norm_list_;          // pieces of replicated parameters
  GradNormTensorList sharded_norm_list_;  // pieces of tensor-parallel shards
  bool has_adam_ = false, has_norm_ = false, has_sharded_norm_ = false;
  Tensor sumsq_, sharded_sumsq_, flag_, clip_coef_, norm_;  // [1] f32 each
  int64_t step_ = 0;
};

}  // namespace helix
