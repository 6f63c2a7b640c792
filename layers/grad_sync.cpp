#include "layers/grad_sync.h"

namespace helix {

GradSync::GradSync(ParameterSet& params, const ParallelContext* ctx) : params_(params), ctx_(ctx) {
  if (ctx_ && ctx_->sizes().dp > 1) {
    std::vector<Var> vars;
    for (const Parameter& p : params_.all()) vars.push_back(p.var);
    DpReducerOptions o;
    o.op = ReduceOp::kSum;
    dp_ = std::make_unique<DpGradReducer>(ctx_->dp(), std::move(vars), o);
  }
}

void GradSync::zero_grads(const Stream& stream) {
  if (dp_) dp_->zero_grad(stream);
  else params_.zero_grads(stream);
}

void GradSync::reduce(const Stream& stream) {
  if (!ctx_) return;
  if (ctx_->sizes().tp > 1) {
    for (Parameter& p : params_.all()) {
      if (!p.grad_partial) continue;
      if (!p.grad().defined()) p.var.cell()->grad = Tensor::zeros(p.master.shape(), DType::kF32, p.master.device());
      ctx_->tp().all_reduce(p.grad(), ReduceOp::kSum, stream);
    }
  }
  if (dp_) dp_->finish(stream);
}

AdamW::NormReduce GradSync::norm_reduce() const {
  if (!ctx_) return {};
  const ParallelContext* ctx = ctx_;
  return [ctx](Tensor& sumsq, Tensor& flag) {
    const Stream stream = ctx->device().is_cuda() ? Stream::cuda_default(ctx->device().index) : Stream();
    if (ctx->sizes().tp > 1) ctx->tp().all_reduce(sumsq, ReduceOp::kSum, stream);
    if (ctx->world_size() > 1) ctx->world().all_reduce(flag, ReduceOp::kMax, stream);
  };
}

void GradSync::sum_over_dp(const Tensor& t, const Stream& stream) const {
  if (ctx_ && ctx_->sizes().dp > 1) ctx_->dp().all_reduce(t, ReduceOp::kSum, stream);
}

}  // namespace helix
