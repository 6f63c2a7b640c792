#include "layers/grad_sync.h"

namespace helix {

GradSync::GradSync(ParameterSet& params, const ParallelContext* ctx, size_t dp_bucket_bytes)
    : params_(params), ctx_(ctx) {
  // Under context parallelism the cp ranks' gradients are partial sums too: reduce over dp x cp.
  if (ctx_ && ctx_->sizes().dp * ctx_->sizes().cp > 1) {
    std::vector<Var> vars;
    for (const Parameter& p : params_.all()) vars.push_back(p.var);
    DpReducerOptions o;
    o.op = ReduceOp::kSum;
    o.bucket_bytes = dp_bucket_bytes;
    dp_ = std::make_unique<DpGradReducer>(ctx_->sizes().cp > 1 ? ctx_->dp_cp() : ctx_->dp(), std::move(vars), o);
  }
  for (size_t i = 0; i < params_.all().size(); ++i) index_.emplace(params_.all()[i].var.cell().get(), i);
  tp_summed_.assign(params_.all().size(), false);
}

void GradSync::tp_sum_partial(size_t i, const Stream& stream) {
  Parameter& p = params_.all()[i];
  if (tp_summed_[i] || !p.grad_partial || !ctx_ || ctx_->sizes().tp == 1) return;
  if (!p.grad().defined()) p.var.cell()->grad = Tensor::zeros(p.master.shape(), DType::kF32, p.master.device());
  ctx_->tp().all_reduce(p.grad(), ReduceOp::kSum, stream);
  tp_summed_[i] = true;
}

std::function<void(const std::shared_ptr<GradCell>&)> GradSync::ready_hook(const Stream& stream) {
  if (!dp_) return {};
  // Every tp and dp rank runs the same graph, so the hook fires at the same points on all of them
  // and the collectives it issues stay matched.
  return [this, stream](const std::shared_ptr<GradCell>& cell) {
    auto it = index_.find(cell.get());
    if (it == index_.end()) return;  // an input, not a parameter
    tp_sum_partial(it->second, stream);
    dp_->mark_ready(it->second, stream);
  };
}

void GradSync::zero_grads(const Stream& stream) {
  if (dp_) dp_->zero_grad(stream);
  else params_.zero_grads(stream);
}

void GradSync::reduce(const Stream& stream) {
  if (!ctx_) return;
  for (size_t i = 0; i < params_.all().size(); ++i) tp_sum_partial(i, stream);
  tp_summed_.assign(params_.all().size(), false);
  if (dp_) dp_->finish(stream);
}

AdamW::NormReduce GradSync::norm_reduce() const {
  if (!ctx_) return {};
  const ParallelContext* ctx = ctx_;
  return [ctx](Tensor& sumsq, Tensor& /*replicated_sumsq*/, Tensor& flag) {
    const Stream stream = ctx->device().is_cuda() ? Stream::cuda_default(ctx->device().index) : Stream();
    if (ctx->sizes().tp > 1) ctx->tp().all_reduce(sumsq, ReduceOp::kSum, stream);
    if (ctx->world_size() > 1) ctx->world().all_reduce(flag, ReduceOp::kMax, stream);
  };
}

void GradSync::sum_over_dp(const Tensor& t, const Stream& stream) const {
  if (ctx_ && ctx_->sizes().dp > 1) ctx_->dp().all_reduce(t, ReduceOp::kSum, stream);
}

}  // namespace helix
