#include "layers/masked_lm_loss.h"

#include "kernels/axpy/axpy.h"
#include "kernels/cross_entropy/cross_entropy.h"

namespace helix {

std::vector<Tensor> MaskedLmLossNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor& logits = in[0];
  Tensor loss = Tensor::empty({1}, DType::kF32, logits.device(), stream);
  Tensor count = Tensor::empty({1}, DType::kF32, logits.device(), stream);
  CrossEntropyParams p;
  p.logits = logits;
  p.labels = labels_;
  p.loss_sum = loss;
  p.count = count;
  cross_entropy_fwd_bwd(p, stream);
  logits_ = save(logits);
  return {loss, count};
}

void MaskedLmLossNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  if (!gin[0].defined() || !gout[0].defined()) return;
  // The incoming gradient of the loss sum is a scalar on the device; one 4-byte read per step.
  const float seed = gout[0].to_floats()[0];
  const Tensor& logits = saved(logits_);
  Tensor dlogits = Tensor::empty(logits.shape(), logits.dtype(), logits.device(), stream);
  Tensor loss = Tensor::empty({1}, DType::kF32, logits.device(), stream);
  Tensor count = Tensor::empty({1}, DType::kF32, logits.device(), stream);
  CrossEntropyParams p;
  p.logits = logits;
  p.labels = labels_;
  p.loss_sum = loss;
  p.count = count;
  p.dlogits = dlogits;
  p.grad_scale = grad_scale_ * seed;
  cross_entropy_fwd_bwd(p, stream);
  axpy(1.0f, dlogits, gin[0], stream);
}

std::vector<Tensor> VocabParallelLossNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor& logits = in[0];
  HELIX_CHECK(opts_.tp != nullptr, "vocab_parallel_masked_lm_loss: expected a tp communicator, got none");
  const int64_t t = logits.dim(0);
  const int n = opts_.tp->size();
  const Device d = logits.device();
  Tensor stats = Tensor::empty({3, t}, DType::kF32, d, stream);  // max; sumexp; target
  CrossEntropyStatsParams sp;
  sp.logits = logits;
  sp.labels = labels_;
  sp.row_max = stats.slice(0, 1).view({t});
  sp.row_sumexp = stats.slice(1, 2).view({t});
  sp.row_target = stats.slice(2, 3).view({t});
  sp.vocab_start = opts_.vocab_start;
  cross_entropy_stats(sp, stream);
  Tensor all = Tensor::empty({3 * n, t}, DType::kF32, d, stream);  // rank-major: [r][stat][t]
  opts_.tp->all_gather(stats, all, stream);
  part_max_ = Tensor::empty({n, t}, DType::kF32, d, stream);
  part_sumexp_ = Tensor::empty({n, t}, DType::kF32, d, stream);
  part_target_ = Tensor::empty({n, t}, DType::kF32, d, stream);
  for (int r = 0; r < n; ++r) {
    Tensor m = part_max_.slice(r, r + 1), s = part_sumexp_.slice(r, r + 1), g = part_target_.slice(r, r + 1);
    m.copy_from(all.slice(3 * r, 3 * r + 1), stream);
    s.copy_from(all.slice(3 * r + 1, 3 * r + 2), stream);
    g.copy_from(all.slice(3 * r + 2, 3 * r + 3), stream);
  }
  Tensor loss = Tensor::empty({1}, DType::kF32, d, stream);
  Tensor count = Tensor::empty({1}, DType::kF32, d, stream);
  finish(logits, loss, count, Tensor(), 1.0f, stream);
  logits_ = save(logits);
  return {loss, count};
}

void VocabParallelLossNode::finish(const Tensor& logits, const Tensor& loss, const Tensor& count,
                                   const Tensor& dlogits, float grad_scale, const Stream& stream) const {
  CrossEntropyFinishParams fp;
  fp.logits = logits;
  fp.labels = labels_;
  fp.part_max = part_max_;
  fp.part_sumexp = part_sumexp_;
  fp.part_target = part_target_;
  fp.loss_sum = loss;
  fp.count = count;
  fp.dlogits = dlogits;
  fp.vocab_start = opts_.vocab_start;
  fp.vocab_size = opts_.vocab_size;
  fp.grad_scale = grad_scale;
  cross_entropy_finish(fp, stream);
}

void VocabParallelLossNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                                     const Stream& stream) {
  if (!gin[0].defined() || !gout[0].defined()) return;
  const float seed = gout[0].to_floats()[0];
  const Tensor& logits = saved(logits_);
  Tensor dlogits = Tensor::empty(logits.shape(), logits.dtype(), logits.device(), stream);
  Tensor loss = Tensor::empty({1}, DType::kF32, logits.device(), stream);
  Tensor count = Tensor::empty({1}, DType::kF32, logits.device(), stream);
  finish(logits, loss, count, dlogits, opts_.grad_scale * seed, stream);
  axpy(1.0f, dlogits, gin[0], stream);
}

}  // namespace helix
