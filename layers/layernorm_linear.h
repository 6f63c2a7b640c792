#pragma once
// LayerNorm followed by a linear layer, as one node (the QKV projection of a pre-LN transformer), and
// a plain LayerNorm node (the final LayerNorm). The normalised activations are saved for the weight
// gradient, with the fp32 statistics for LayerNorm's backward.
#include "core/autograd.h"

namespace helix {

// y = LN(x; gamma, beta) W^T + b. Inputs: x [T, in], gamma [in], beta [in], W [out, in], b [out].
class LayerNormLinearNode final : public Node {
 public:
  explicit LayerNormLinearNode(float eps) : eps_(eps) {}
  std::string name() const override { return "layernorm_linear"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  float eps_;
  int x_ = -1, gamma_ = -1, mean_ = -1, rstd_ = -1, ln_out_ = -1, w_ = -1;
};

// y = LN(x; gamma, beta). Inputs: x [T, C], gamma [C], beta [C].
class LayerNormNode final : public Node {
 public:
  explicit LayerNormNode(float eps) : eps_(eps) {}
  std::string name() const override { return "layernorm"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  float eps_;
  int x_ = -1, gamma_ = -1, mean_ = -1, rstd_ = -1;
};

// Shared by the fused layers: LN forward into new tensors (y in x's dtype, f32 statistics).
struct LayerNormOut {
  Tensor y, mean, rstd;
};
LayerNormOut layernorm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                               const Stream& stream);
// dx += LN'(dy); dgamma += ...; dbeta += ... (each optional).
void layernorm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean, const Tensor& rstd,
                        const Tensor& dy, const Tensor& dx, const Tensor& dgamma, const Tensor& dbeta,
                        const Stream& stream);

}  // namespace helix
