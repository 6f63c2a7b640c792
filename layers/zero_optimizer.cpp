#include "layers/zero_optimizer.h"

#include "kernels/axpy/axpy.h"

namespace helix {

ZeroAdamW::ZeroAdamW(ZeroSync& zero, AdamWConfig config) : zero_(zero), cfg_(config) {
  std::vector<AdamWTensor> adam;
  std::vector<Tensor> rep, sharded;
  const int rank = zero.layout().rank;
  // Pipeline: the tied table lives on the first and the last stage with equal gradients; the norm
  // counts it on the first only (the sum over pp in step()).
  const ParallelContext& ctx = zero.context();
  const bool skip_tied = ctx.sizes().pp > 1 && ctx.coords().pp == ctx.sizes().pp - 1;
  for (size_t u = 0; u < zero.num_units(); ++u) {
    const ZeroUnitLayout& l = zero.layout().units[u];
    const Tensor master = zero.master_shard(u), grad = zero.grad_shard(u);
    const Tensor m = zero.exp_avg_shard(u), v = zero.exp_avg_sq_shard(u), model = zero.model_shard(u);
    for (const ZeroShardPiece& piece : zero_shard_pieces(l, rank)) {
      const Parameter& p = zero.params().all()[zero.unit_params(u)[piece.tensor]];
      const int64_t b = piece.shard_begin, e = b + piece.numel;
      AdamWTensor t;
      t.param = master.slice(b, e);
      t.grad = grad.slice(b, e);
      t.exp_avg = m.slice(b, e);
      t.exp_avg_sq = v.slice(b, e);
      if (model.dtype() == DType::kBF16) t.param_bf16 = model.slice(b, e);
      t.apply_weight_decay = p.decay;
      adam.push_back(t);
      if (skip_tied && p.name == "esm.embeddings.word_embeddings.weight") continue;
      (p.shard == TpShard::kReplicated ? rep : sharded).push_back(t.grad);
    }
  }
  const Device d = zero.master_shard(0).device();
  has_adam_ = !adam.empty();
  has_norm_ = !rep.empty();
  has_sharded_norm_ = !sharded.empty();
  if (has_adam_) adam_list_ = AdamWTensorList(std::move(adam));
  if (has_norm_) norm_list_ = GradNormTensorList(std::move(rep));
  if (has_sharded_norm_) sharded_norm_list_ = GradNormTensorList(std::move(sharded));
  sumsq_ = Tensor::zeros({1}, DType::kF32, d);
  sharded_sumsq_ = Tensor::zeros({1}, DType::kF32, d);
  flag_ = Tensor::zeros({1}, DType::kF32, d);
  clip_coef_ = Tensor::zeros({1}, DType::kF32, d);
  norm_ = Tensor::zeros({1}, DType::kF32, d);
}

OptimizerStepResult ZeroAdamW::step(double lr, bool loss_finite, const Stream& stream) {
  const ParallelContext& ctx = zero_.context();
  flag_.fill(loss_finite ? 0.0 : 1.0, stream);
  const auto sumsq = [&](bool has, const GradNormTensorList& list, Tensor& out) {
    if (!has) out.zero(stream);
    else grad_norm_sumsq(GradNormParams{.grads = &list, .sumsq = out, .nonfinite_flag = flag_}, stream);
  };
  sumsq(has_norm_, norm_list_, sumsq_);
  sumsq(has_sharded_norm_, sharded_norm_list_, sharded_sumsq_);
  // Every rank holds a disjoint shard of each unit: sum over the shard group; tp shards differ per
  // tp rank as well; replicated parameters are the same on every tp rank and count once.
  Communicator& comm = zero_.shard_comm();
  if (comm.size() > 1) {
    comm.all_reduce(sumsq_, ReduceOp::kSum, stream);
    comm.all_reduce(sharded_sumsq_, ReduceOp::kSum, stream);
  }
  if (ctx.sizes().tp > 1) ctx.tp().all_reduce(sharded_sumsq_, ReduceOp::kSum, stream);
  if (ctx.sizes().pp > 1) {  // each stage holds its own layers
    ctx.pp().all_reduce(sumsq_, ReduceOp::kSum, stream);
    ctx.pp().all_reduce(sharded_sumsq_, ReduceOp::kSum, stream);
  }
  if (ctx.world_size() > 1) ctx.world().all_reduce(flag_, ReduceOp::kMax, stream);
  axpy(1.0f, sharded_sumsq_, sumsq_, stream);
  GradClipParams clip;
  clip.sumsq = sumsq_;
  clip.clip_coef = clip_coef_;
  clip.norm = norm_;
  clip.nonfinite_flag = flag_;
  clip.max_norm = cfg_.clip_norm > 0 ? cfg_.clip_norm : 3.0e38;
  grad_clip_coef(clip, stream);
  OptimizerStepResult r;
  r.grad_norm = norm_.to_floats()[0];
  r.applied = flag_.to_floats()[0] == 0.0f;
  if (!r.applied) return r;
  if (has_adam_) {
    adamw_step(adamw_update_params(cfg_, &adam_list_, lr, step_ + 1, clip_coef_, flag_), stream);
  }
  zero_.after_step(stream);
  ++step_;
  return r;
}

}  // namespace helix
