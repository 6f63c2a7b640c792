#pragma once
// Linear layers as fused autograd nodes, and the GEMM helpers every fused layer shares.
//   linear_fwd:  y (+)= x W^T + b                        (one GEMM, bias epilogue)
//   linear_bwd:  dx += dy W;  dW += dy^T x;  db += sum_T dy  (dgrad GEMM, wgrad GEMM with bias-grad)
// Weights W [out, in] are the model copy (compute dtype); their gradients are f32.
#include "core/autograd.h"

namespace helix {

// y = x W^T + b (b optional), or y += ... when accumulate. x [T, in], W [out, in], y [T, out].
void linear_fwd(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y, bool accumulate,
                const Stream& stream);
// Each output optional (undefined = not needed): dx [T, in] (+=), dw [out, in] f32 (+=),
// db [out] f32 (+=).
void linear_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& dx, const Tensor& dw,
                const Tensor& db, const Stream& stream);

// y = residual + a W^T + b. Inputs: a [T, in], W [out, in], b [out], residual [T, out].
// The attention out-projection of a transformer layer.
class LinearResidualNode final : public Node {
 public:
  std::string name() const override { return "linear_residual"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  int a_ = -1, w_ = -1;
};

// The pieces a tensor-parallel layer is assembled from (communication nodes go between them; the
// fused nodes above cannot be cut where a collective must sit).

// y = x W^T (+ b). Inputs: x [T, in], W [out, in], optionally b [out].
class LinearNode final : public Node {
 public:
  std::string name() const override { return "linear"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  int x_ = -1, w_ = -1;
};

// y = GELU(x). Inputs: x [...]. Saves x.
class GeluNode final : public Node {
 public:
  std::string name() const override { return "gelu"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  int x_ = -1;
};

// y = residual + x + b (b broadcast over rows): the bias and residual of a row-parallel linear,
// added once after its partial outputs were reduced. Inputs: x [T, C], b [C], residual [T, C].
// The bias is added (and its gradient summed over T) through the GEMM bias epilogue on a zero
// operand, the path linear_fwd/linear_bwd already use.
class BiasResidualNode final : public Node {
 public:
  std::string name() const override { return "bias_residual"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;
};

}  // namespace helix
