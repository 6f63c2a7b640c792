#pragma once
// FP8 versions of the fused layers (delayed scaling from Fp8ScalingManager) and the factories the
// ESM-2 graph builder calls: they return the FP8 node when a manager is given, else the bf16/f32
// node, so the model code has one line per layer either way. Design: activations and gradients are
// cast-transposed once (fp8 [T, in] for the GEMM now, fp8 [in, T] saved for the weight gradient),
// weights come from the manager's per-step cache; every GEMM is cuBLASLt's TN FP8 GEMM (the CPU
// emulates it bit-exactly), accumulating in fp32 into bf16/f32 outputs. The MLP's GELU and every
// bias gradient ride in the casts (cast_transpose_fp8's fused activation and column sums): GELU's
// output and d(GELU input) exist only in fp8, and GEMMs write their dx rather than accumulate into
// zero-filled buffers. LayerNorm, attention and the LM head stay in the compute dtype. Token counts
// must be multiples of 16 (the model pads).
#include <memory>

#include "core/autograd.h"
#include "layers/fp8_scaling.h"

namespace helix {

// The three operands of one FP8 GEMM in the manager.
struct Fp8LinearSlots {
  Fp8ScalingManager* manager = nullptr;
  int input = -1, weight = -1, grad_output = -1;
  static Fp8LinearSlots of(Fp8ScalingManager* manager, int layer, Fp8Gemm gemm);
};

// y (+)= x W^T + b with x cast to fp8 (input scale; amax recorded) and W from the cache.
// x [T, in] f32/bf16, W [out, in], b [out] optional, y [T, out]. Returns x^T in fp8 [in, T], the
// saved operand of the weight gradient (undefined with transpose = false: a forward without backward).
Tensor fp8_linear_fwd(const Fp8LinearSlots& s, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y,
                      bool accumulate, const Stream& stream, bool transpose = true);
// dy [T, out] cast-transposed to fp8 (grad-output scale; amax recorded); each output optional:
// dx [T, in] += dy W, dw [out, in] f32 += dy^T x, db [out] f32 += sum_T dy.
void fp8_linear_bwd(const Fp8LinearSlots& s, const Tensor& dy, const Tensor& x_t, const Tensor& w, const Tensor& dx,
                    const Tensor& dw, const Tensor& db, const Stream& stream);

// LayerNormLinearNode in FP8: inputs x, gamma, beta, W, b (the QKV projection).
class Fp8LayerNormLinearNode final : public Node {
 public:
  Fp8LayerNormLinearNode(float eps, Fp8LinearSlots slots) : eps_(eps), slots_(slots) {}
  std::string name() const override { return "fp8_layernorm_linear"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  float eps_;
  Fp8LinearSlots slots_;
  int x_ = -1, gamma_ = -1, mean_ = -1, rstd_ = -1, ln_t_ = -1, w_ = -1;
};

// LinearResidualNode in FP8: inputs a, W, b, residual (the attention out-projection).
class Fp8LinearResidualNode final : public Node {
 public:
  explicit Fp8LinearResidualNode(Fp8LinearSlots slots) : slots_(slots) {}
  std::string name() const override { return "fp8_linear_residual"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  Fp8LinearSlots slots_;
  int a_t_ = -1, w_ = -1;
};

// LayerNormMlpNode in FP8: inputs x, gamma, beta, W1, b1, W2, b2. Saves the fp8 transposes of
// LN(x) and GELU(pre) for the weight gradients and pre for GELU's backward.
class Fp8LayerNormMlpNode final : public Node {
 public:
  Fp8LayerNormMlpNode(float eps, Fp8LinearSlots fc1, Fp8LinearSlots fc2) : eps_(eps), fc1_(fc1), fc2_(fc2) {}
  std::string name() const override { return "fp8_layernorm_mlp"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  float eps_;
  Fp8LinearSlots fc1_, fc2_;
  int x_ = -1, gamma_ = -1, mean_ = -1, rstd_ = -1, ln_t_ = -1, w1_ = -1, pre_ = -1, h_t_ = -1, w2_ = -1;
};

// LinearNode in FP8 (the tensor-parallel pieces): inputs x, W, optionally b.
class Fp8LinearNode final : public Node {
 public:
  explicit Fp8LinearNode(Fp8LinearSlots slots) : slots_(slots) {}
  std::string name() const override { return "fp8_linear"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  Fp8LinearSlots slots_;
  int x_t_ = -1, w_ = -1;
};

// Factories for the graph builder: fp8 == nullptr gives the bf16/f32 node.
std::shared_ptr<Node> make_layernorm_linear_node(float eps, Fp8ScalingManager* fp8, int layer);
std::shared_ptr<Node> make_linear_residual_node(Fp8ScalingManager* fp8, int layer);
std::shared_ptr<Node> make_layernorm_mlp_node(float eps, Fp8ScalingManager* fp8, int layer);
std::shared_ptr<Node> make_linear_node(Fp8ScalingManager* fp8, int layer, Fp8Gemm gemm);

// Tokens per step must be a multiple of this for FP8 GEMMs (M and K of cuBLASLt FP8).
constexpr int64_t kFp8TokenMultiple = 16;

}  // namespace helix
