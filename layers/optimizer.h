#pragma once
// AdamW over a ParameterSet with global-norm gradient clipping and the non-finite skip: per step one
// multi-tensor sum of squares, an optional reduction across ranks (a callback, so this layer stays
// free of communication policy), the clip coefficient on the device, and one multi-tensor AdamW
// launch that does nothing when the step's non-finite flag is set. No host synchronisation inside
// except reading the norm for logging.
#include <functional>

#include "kernels/adamw/adamw.h"
#include "kernels/grad_norm/grad_norm.h"
#include "layers/parameter.h"

namespace helix {

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.98;
  double eps = 1e-8;
  double weight_decay = 0.01;
  double clip_norm = 1.0;  // <= 0: no clipping
};

struct OptimizerStepResult {
  bool applied = false;   // false: a loss or gradient was not finite, nothing changed
  double grad_norm = 0;   // global norm before clipping (NaN/inf when skipped for that reason)
};

class AdamW {
 public:
  AdamW(ParameterSet& params, AdamWConfig config);

  // Reduces (sum) the [1] f32 sum of squares and (max) the [1] f32 non-finite flag across the ranks
  // that share the gradients' norm; identity on one rank. `sumsq` covers the tensor-parallel shards
  // (TpShard other than kReplicated) only, to be summed over tp; `replicated_sumsq` (this rank's
  // replicated parameters) is added to it afterwards, so replicated tensors count once. A reduction
  // that folds everything into `sumsq` zeroes `replicated_sumsq`, so every rank ends with the same
  // bits (the clip coefficient must be bitwise equal where parameters are shared, e.g. the tied
  // embedding on two pipeline stages).
  using NormReduce = std::function<void(Tensor& sumsq, Tensor& replicated_sumsq, Tensor& flag)>;

  // `loss_finite` false marks the step non-finite before any gradient is looked at.
  OptimizerStepResult step(double lr, bool loss_finite, const Stream& stream, const NormReduce& reduce = {});

  int64_t steps_applied() const { return step_; }
  void set_steps_applied(int64_t s) { step_ = s; }
  // Optimizer state in parameter order: (exp_avg, exp_avg_sq) per parameter, for checkpoints.
  std::vector<std::pair<Tensor, Tensor>>& moments() { return moments_; }
  const AdamWConfig& config() const { return cfg_; }

 private:
  void build_lists();

  ParameterSet& params_;
  AdamWConfig cfg_;
  std::vector<std::pair<Tensor, Tensor>> moments_;
  AdamWTensorList adam_list_;
  GradNormTensorList norm_list_;        // replicated parameters' gradients
  GradNormTensorList sharded_norm_list_;  // tensor-parallel shards' gradients
  std::vector<Tensor> grads_;            // every gradient, parameter order (replacement check)
  bool lists_built_ = false;
  Tensor sumsq_, sharded_sumsq_, flag_, clip_coef_, norm_;  // [1] f32 each, on the parameters' device
  int64_t step_ = 0;                        // applied updates
};

// The multi-tensor AdamW launch parameters of one update (step = the 1-based update count), shared by
// AdamW and ZeroAdamW: gradients scaled by the clip coefficient when clipping, skipped when `flag`.
AdamWParams adamw_update_params(const AdamWConfig& cfg, AdamWTensorList* tensors, double lr, int64_t step,
                                const Tensor& clip_coef, const Tensor& flag);

}  // namespace helix
