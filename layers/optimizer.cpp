#include "layers/optimizer.h"

#include "kernels/axpy/axpy.h"

namespace helix {

AdamW::AdamW(ParameterSet& params, AdamWConfig config) : params_(params), cfg_(config) {
  HELIX_CHECK(!params.all().empty(), "AdamW: no parameters");
  const Device d = params.all().front().master.device();
  for (const Parameter& p : params.all())
    moments_.emplace_back(Tensor::zeros(p.master.shape(), DType::kF32, d), Tensor::zeros(p.master.shape(), DType::kF32, d));
  sumsq_ = Tensor::zeros({1}, DType::kF32, d);
  sharded_sumsq_ = Tensor::zeros({1}, DType::kF32, d);
  flag_ = Tensor::zeros({1}, DType::kF32, d);
  clip_coef_ = Tensor::zeros({1}, DType::kF32, d);
  norm_ = Tensor::zeros({1}, DType::kF32, d);
}

// The gradient tensors exist only after the first backward; the lists hold their pointers, which
// stay valid because gradients are zeroed in place between steps.
void AdamW::build_lists() {
  std::vector<AdamWTensor> adam;
  std::vector<Tensor> grads, sharded;
  for (size_t i = 0; i < params_.all().size(); ++i) {
    Parameter& p = params_.all()[i];
    if (!p.grad().defined()) p.var.cell()->grad = Tensor::zeros(p.master.shape(), DType::kF32, p.master.device());
    AdamWTensor t;
    t.param = p.master;
    t.grad = p.grad();
    t.exp_avg = moments_[i].first;
    t.exp_avg_sq = moments_[i].second;
    if (!p.shares_master()) t.param_bf16 = p.var.data();
    t.apply_weight_decay = p.decay;
    adam.push_back(t);
    (p.shard == TpShard::kReplicated ? grads : sharded).push_back(p.grad());
    grads_.push_back(p.grad());
  }
  adam_list_ = AdamWTensorList(std::move(adam));
  if (!grads.empty()) norm_list_ = GradNormTensorList(std::move(grads));
  if (!sharded.empty()) sharded_norm_list_ = GradNormTensorList(std::move(sharded));
  lists_built_ = true;
}

OptimizerStepResult AdamW::step(double lr, bool loss_finite, const Stream& stream, const NormReduce& reduce) {
  if (!lists_built_) build_lists();
  for (size_t i = 0; i < params_.all().size(); ++i)
    HELIX_CHECK(params_.all()[i].grad().data_ptr() == grads_[i].data_ptr(),
                "AdamW: the gradient buffer of '{}' was replaced; zero gradients in place (ParameterSet::zero_grads)",
                params_.all()[i].name);
  flag_.fill(loss_finite ? 0.0 : 1.0, stream);
  const auto sumsq = [&](const GradNormTensorList& list, Tensor& out) {
    if (list.tensors().empty()) out.zero(stream);
    else grad_norm_sumsq(GradNormParams{.grads = &list, .sumsq = out, .nonfinite_flag = flag_}, stream);
  };
  sumsq(norm_list_, sumsq_);
  sumsq(sharded_norm_list_, sharded_sumsq_);
  if (reduce) reduce(sharded_sumsq_, sumsq_, flag_);
  axpy(1.0f, sharded_sumsq_, sumsq_, stream);
  GradClipParams clip;
  clip.sumsq = sumsq_;
  clip.clip_coef = clip_coef_;
  clip.norm = norm_;
  clip.nonfinite_flag = flag_;
  clip.max_norm = cfg_.clip_norm > 0 ? cfg_.clip_norm : 3.0e38;
  grad_clip_coef(clip, stream);
  const std::vector<float> flag = flag_.to_floats();
  OptimizerStepResult r;
  r.grad_norm = norm_.to_floats()[0];
  r.applied = flag[0] == 0.0f;
  if (!r.applied) return r;  // nothing to launch: the step is skipped
  adamw_step(adamw_update_params(cfg_, &adam_list_, lr, step_ + 1, clip_coef_, flag_), stream);
  ++step_;
  return r;
}

AdamWParams adamw_update_params(const AdamWConfig& cfg, AdamWTensorList* tensors, double lr, int64_t step,
                                const Tensor& clip_coef, const Tensor& flag) {
  AdamWParams a;
  a.tensors = tensors;
  a.lr = lr;
  a.beta1 = cfg.beta1;
  a.beta2 = cfg.beta2;
  a.eps = cfg.eps;
  a.weight_decay = cfg.weight_decay;
  a.step = step;
  a.grad_scale_tensor = cfg.clip_norm > 0 ? clip_coef : Tensor();
  a.nonfinite_flag = flag;
  return a;
}

}  // namespace helix
