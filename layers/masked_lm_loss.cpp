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

}  // namespace helix
