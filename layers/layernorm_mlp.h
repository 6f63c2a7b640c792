#pragma once
// The MLP block of a pre-LN transformer layer as one node:
//   y = x + FC2(GELU(FC1(LN(x))))
// FC1's pre-activation is kept and backward recomputes GELU from it instead of saving the
// activation, so the node holds one [T, ffn] tensor instead of two.
#include "core/autograd.h"

namespace helix {

// Inputs: x [T, H], gamma [H], beta [H], W1 [F, H], b1 [F], W2 [H, F], b2 [H].
class LayerNormMlpNode final : public Node {
 public:
  explicit LayerNormMlpNode(float eps) : eps_(eps) {}
  std::string name() const override { return "layernorm_mlp"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  float eps_;
  int x_ = -1, gamma_ = -1, mean_ = -1, rstd_ = -1, ln_out_ = -1, w1_ = -1, pre_ = -1, w2_ = -1;
};

// The LM head: logits = LN(GELU(x Wd^T + bd)) We^T + b, We being the (tied) embedding table.
// Inputs: x [T, H], Wd [H, H], bd [H], gamma [H], beta [H], We [V, H], b [V].
class LmHeadNode final : public Node {
 public:
  explicit LmHeadNode(float eps) : eps_(eps) {}
  std::string name() const override { return "lm_head"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  float eps_;
  int x_ = -1, wd_ = -1, pre_ = -1, gamma_ = -1, mean_ = -1, rstd_ = -1, z_ = -1, we_ = -1;
};

// The vocabulary-parallel decoder of the LM head (tensor parallelism): logits = z We_r[:n]^T + b_r[:n]
// for this rank's rows of the tied table, n = the rows that are real vocabulary (the pad rows of the
// last rank's shard produce no logits and get no gradient, so they stay zero). The dense / GELU /
// LayerNorm part of the head runs replicated before it (LinearNode, GeluNode, LayerNormNode) and
// copy_to_tp sits between the two. Inputs: z [T, H], We_r [Vr, H], b_r [Vr]. Output: [T, n].
class LmDecoderNode final : public Node {
 public:
  explicit LmDecoderNode(int64_t valid_rows) : valid_rows_(valid_rows) {}
  std::string name() const override { return "lm_decoder"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  int64_t valid_rows_;
  int z_ = -1, we_ = -1;
};

}  // namespace helix
