#pragma once
// Masked-LM cross-entropy as a node: forward gives the loss SUM over labelled tokens ([1] f32, so
// micro-batches and ranks add up exactly); backward writes dlogits = (softmax - onehot) * grad_scale *
// incoming gradient, where grad_scale = 1 / labelled tokens of the whole step turns the sum into the
// mean the optimizer sees. The labels are a constant of the batch, not an input of the graph.
#include "core/autograd.h"
#include "parallel/communicator.h"

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

// The same loss over vocabulary-parallel logits (tensor parallelism): this rank holds columns
// [vocab_start, vocab_start + Vr) of the vocabulary (vocab_size in all). cross_entropy_stats per rank,
// one all-gather of the three per-row stats over tp, cross_entropy_finish merges them in rank order:
// the loss sum and count are equal on every rank and equal the unsharded loss; backward writes
// dlogits of the local columns only.
struct VocabParallelLossOptions {
  Communicator* tp = nullptr;
  int64_t vocab_start = 0;
  int64_t vocab_size = 0;
  float grad_scale = 1.0f;
};
class VocabParallelLossNode final : public Node {
 public:
  VocabParallelLossNode(Tensor labels, VocabParallelLossOptions opts) : labels_(std::move(labels)), opts_(opts) {}
  std::string name() const override { return "vocab_parallel_masked_lm_loss"; }
  // Inputs: logits [T, Vr]. Outputs: loss sum [1] f32, labelled-token count [1] f32 (no gradient).
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  void finish(const Tensor& logits, const Tensor& loss, const Tensor& count, const Tensor& dlogits,
              float grad_scale, const Stream& stream) const;

  Tensor labels_;  // i32 [T], global ids, -100 = no label
  VocabParallelLossOptions opts_;
  Tensor part_max_, part_sumexp_, part_target_;  // [tp, T] f32, gathered in forward
  int logits_ = -1;
};

}  // namespace helix
