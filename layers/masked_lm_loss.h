#pragma once
// Masked-LM cross-entropy as a node: forward gives the loss SUM over labelled tokens ([1] f32, so
// micro-batches and ranks add up exactly); backward writes dlogits = (softmax - onehot) * grad_scale *
// incoming gradient, where grad_scale = 1 / labelled tokens of the whole step turns the sum into the
// mean the optimizer sees. The labels are a constant of the batch, not an input of the graph.
#include "core/autograd.h"

namespace helix {

class MaskedLmLossNode final : public Node {
 public:
  MaskedLmLossNode(Tensor labels, float grad_scale) : labels_(std::move(labels)), grad_scale_(grad_scale) {}
  std::string name() const override { return "masked_lm_loss"; }
  // Inputs: logits [T, V]. Outputs: loss sum [1] f32, labelled-token count [1] f32 (no gradient).
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  Tensor labels_;  // i32 [T], -100 = no label
  float grad_scale_;
  int logits_ = -1;
};

}  // namespace helix
