#include "layers/fp8_layers.h"

#include "kernels/axpy/axpy.h"
#include "kernels/cast/cast.h"
#include "kernels/gemm/gemm.h"
#include "kernels/layernorm/layernorm.h"
#include "layers/layernorm_linear.h"
#include "layers/layernorm_mlp.h"
#include "layers/linear.h"

namespace helix {
namespace {

constexpr int64_t kZeroCols = 16;  // width of the zero operand that carries an f32 bias through a GEMM

// An operand cast for FP8 GEMMs: codes [M, N] (the A operand now) and their transpose [N, M] (the
// operand of the weight gradient; not made when no backward follows: see wants_transpose).
struct Fp8Cast {
  Tensor data, data_t;
};

struct CastArgs {
  CastActivation act = CastActivation::kNone;
  Tensor pre;    // [M, N]: the GELU input for kGeluGrad
  Tensor dbias;  // [N] f32, optional: += column sums of the cast values
};
CastArgs with_bias_grad(const Tensor& db) { return {CastActivation::kNone, Tensor(), db}; }

// A node's forward makes the transposed operands only when its backward will run: a forward on a
// tape that does not record (evaluation, and the first pass of a recomputed layer, which runs the
// forward again before its backward) skips them. The amaxes are the same either way.
bool wants_transpose(const Node& node) { return node.any_input_needs_grad(); }

// v(x) -> fp8 codes, and with `transpose` their transpose, with the scale of the GEMM's `operand`
// (its input or its output gradient); the amax is recorded; one pass over x (and pre) whatever
// the activation and bias gradient (cast_transpose_fp8).
Fp8Cast cast_both(const Fp8LinearSlots& s, Fp8Operand operand, const Tensor& x, const CastArgs& a,
                  const Stream& stream, bool transpose = true) {
  const Fp8ScalingManager& m = *s.manager;
  const int slot = operand == Fp8Operand::kInput ? s.input : s.grad_output;
  const DType dt = m.dtype(operand);
  Fp8Cast c{Tensor::empty(x.shape(), dt, x.device(), stream),
            transpose ? Tensor::empty({x.dim(1), x.dim(0)}, dt, x.device(), stream) : Tensor()};
  cast_transpose_fp8(CastTransposeFp8Params{.in = x,
                                            .out = c.data,
                                            .out_t = c.data_t,
                                            .scale = m.scale(slot),
                                            .amax = m.amax(slot),
                                            .act = a.act,
                                            .pre = a.pre,
                                            .dbias = a.dbias},
                     stream);
  return c;
}

// LayerNorm written straight as the FP8 GEMM's input operands: codes [T, C] and (with `transpose`)
// their transpose [C, T] with the input scale, the amax accumulated; LN's output never exists in
// the compute dtype (one read of x instead of LN's write and the cast's re-read).
struct Fp8LayerNorm {
  Fp8Cast y;
  Tensor mean, rstd;  // [T] f32, for backward
};
Fp8LayerNorm layernorm_fp8(const Fp8LinearSlots& s, const Tensor& x, const Tensor& gamma, const Tensor& beta,
                           float eps, bool transpose, const Stream& stream) {
  const Fp8ScalingManager& m = *s.manager;
  const DType dt = m.dtype(Fp8Operand::kInput);
  const int64_t t = x.dim(0), c = x.dim(1);
  Fp8LayerNorm o{{Tensor::empty({t, c}, dt, x.device(), stream),
                  transpose ? Tensor::empty({c, t}, dt, x.device(), stream) : Tensor()},
                 Tensor::empty({t}, DType::kF32, x.device(), stream),
                 Tensor::empty({t}, DType::kF32, x.device(), stream)};
  LayerNormFwdParams p;
  p.x = x;
  p.gamma = gamma;
  p.beta = beta;
  p.eps = eps;
  p.y = o.y.data;
  p.y_t = o.y.data_t;
  p.y_scale = m.scale(s.input);
  p.y_amax = m.amax(s.input);
  p.accumulate_amax = true;
  p.mean = o.mean;
  p.rstd = o.rstd;
  layernorm_fwd(p, stream);
  return o;
}

void check_tokens(const Tensor& x, const char* what) {
  HELIX_CHECK(x.ndim() == 2 && x.dim(0) % kFp8TokenMultiple == 0,
              "fp8: expected {} [T, C] with T a multiple of {} (FP8 GEMMs), got {}", what, kFp8TokenMultiple, x.str());
}

// y (+)= x8 W^T + b for an input already in fp8 (input scale).
void fp8_gemm_fwd(const Fp8LinearSlots& s, const Tensor& x8, const Tensor& w, const Tensor& b, const Tensor& y,
                  bool accumulate, const Stream& stream) {
  Fp8ScalingManager& m = *s.manager;
  const Fp8Weight& w8 = m.weight(s.weight, w, stream);
  GemmParams g;
  g.a = x8;
  g.b = w8.w;
  g.op_b = GemmOp::kTranspose;
  g.c = y;
  g.beta = accumulate ? 1.0f : 0.0f;
  g.a_scale_inv = m.scale_inv(s.input);
  g.b_scale_inv = m.scale_inv(s.weight);
  // cuBLASLt's FP8 bias epilogue takes bf16 only: an f32 bias (f32 runs) is added by a zero GEMM.
  const bool epilogue_bias = b.defined() && b.dtype() == DType::kBF16;
  if (epilogue_bias) {
    g.epilogue = GemmEpilogue::kBias;
    g.bias = b;
  }
  gemm(g, stream);
  if (b.defined() && !epilogue_bias) {
    const Tensor zx = Tensor::zeros({x8.dim(0), kZeroCols}, y.dtype(), y.device(), stream);
    const Tensor zw = Tensor::zeros({y.dim(1), kZeroCols}, b.dtype(), y.device(), stream);
    linear_fwd(zx, zw, b, y, /*accumulate=*/true, stream);
  }
}

// dx (+)= dy W and dW += dy^T x from the cast output gradient; dx and dw optional.
void fp8_gemm_bwd(const Fp8LinearSlots& s, const Fp8Cast& dy, const Tensor& x_t, const Tensor& w, const Tensor& dx,
                  bool accumulate_dx, const Tensor& dw, const Stream& stream) {
  Fp8ScalingManager& m = *s.manager;
  if (dx.defined()) {  // dx (+)= dy W = dy8 (W^T)^T
    const Fp8Weight& w8 = m.weight(s.weight, w, stream);
    GemmParams g;
    g.a = dy.data;
    g.b = w8.w_t;
    g.op_b = GemmOp::kTranspose;
    g.c = dx;
    g.beta = accumulate_dx ? 1.0f : 0.0f;
    g.a_scale_inv = m.scale_inv(s.grad_output);
    g.b_scale_inv = m.scale_inv(s.weight);
    gemm(g, stream);
  }
  if (dw.defined()) {  // dW += dy^T x = (dy^T) (x^T)^T
    GemmParams g;
    g.a = dy.data_t;
    g.b = x_t;
    g.op_b = GemmOp::kTranspose;
    g.c = dw;
    g.beta = 1.0f;
    g.a_scale_inv = m.scale_inv(s.grad_output);
    g.b_scale_inv = m.scale_inv(s.input);
    gemm(g, stream);
  }
}

}  // namespace

Fp8LinearSlots Fp8LinearSlots::of(Fp8ScalingManager* manager, int layer, Fp8Gemm gemm) {
  Fp8LinearSlots s;
  s.manager = manager;
  s.input = manager->slot(layer, gemm, Fp8Operand::kInput);
  s.weight = manager->slot(layer, gemm, Fp8Operand::kWeight);
  s.grad_output = manager->slot(layer, gemm, Fp8Operand::kGradOutput);
  return s;
}

Tensor fp8_linear_fwd(const Fp8LinearSlots& s, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y,
                      bool accumulate, const Stream& stream, bool transpose) {
  check_tokens(x, "the input");
  const Fp8Cast x8 = cast_both(s, Fp8Operand::kInput, x, CastArgs{}, stream, transpose);
  fp8_gemm_fwd(s, x8.data, w, b, y, accumulate, stream);
  return x8.data_t;
}

void fp8_linear_bwd(const Fp8LinearSlots& s, const Tensor& dy, const Tensor& x_t, const Tensor& w, const Tensor& dx,
                    const Tensor& dw, const Tensor& db, const Stream& stream) {
  if (!dy.defined() || (!dx.defined() && !dw.defined() && !db.defined())) return;
  check_tokens(dy, "the output gradient");
  // db += sum_T dy in the compute dtype (not fp8), fused into the cast.
  const Fp8Cast dy8 = cast_both(s, Fp8Operand::kGradOutput, dy, with_bias_grad(db), stream);
  fp8_gemm_bwd(s, dy8, x_t, w, dx, /*accumulate_dx=*/true, dw, stream);
}

std::vector<Tensor> Fp8LayerNormLinearNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &x = in[0], &gamma = in[1], &beta = in[2], &w = in[3], &b = in[4];
  check_tokens(x, "the input");
  const Fp8LayerNorm ln = layernorm_fp8(slots_, x, gamma, beta, eps_, wants_transpose(*this), stream);
  Tensor y = Tensor::empty({x.dim(0), w.dim(0)}, x.dtype(), x.device(), stream);
  fp8_gemm_fwd(slots_, ln.y.data, w, b, y, /*accumulate=*/false, stream);
  x_ = save(x);
  gamma_ = save(gamma);
  mean_ = save(ln.mean);
  rstd_ = save(ln.rstd);
  ln_t_ = save(ln.y.data_t);
  w_ = save(w);
  return {y};
}

void Fp8LayerNormLinearNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                                      const Stream& stream) {
  const Tensor& x = saved(x_);
  const bool need_ln_grad = gin[0].defined() || gin[1].defined() || gin[2].defined();
  const Tensor& dy = gout[0];
  if (!dy.defined()) return;
  check_tokens(dy, "the output gradient");
  Tensor d_ln = need_ln_grad ? Tensor::empty(x.shape(), x.dtype(), x.device(), stream) : Tensor();
  const Fp8Cast dy8 = cast_both(slots_, Fp8Operand::kGradOutput, dy, with_bias_grad(gin[4]), stream);
  fp8_gemm_bwd(slots_, dy8, saved(ln_t_), saved(w_), d_ln, /*accumulate_dx=*/false, gin[3], stream);
  if (need_ln_grad)
    layernorm_backward(x, saved(gamma_), saved(mean_), saved(rstd_), d_ln, gin[0], gin[1], gin[2], stream);
}

std::vector<Tensor> Fp8LinearResidualNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &a = in[0], &w = in[1], &b = in[2], &residual = in[3];
  Tensor y = residual.clone(stream);
  a_t_ = save(fp8_linear_fwd(slots_, a, w, b, y, /*accumulate=*/true, stream, wants_transpose(*this)));
  w_ = save(w);
  return {y};
}

void Fp8LinearResidualNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                                     const Stream& stream) {
  const Tensor& dy = gout[0];
  if (gin[3].defined()) axpy(1.0f, dy, gin[3], stream);
  fp8_linear_bwd(slots_, dy, saved(a_t_), saved(w_), gin[0], gin[1], gin[2], stream);
}

std::vector<Tensor> Fp8LayerNormMlpNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &x = in[0], &gamma = in[1], &beta = in[2], &w1 = in[3], &b1 = in[4], &w2 = in[5], &b2 = in[6];
  check_tokens(x, "the input");
  const bool transpose = wants_transpose(*this);
  const Fp8LayerNorm ln = layernorm_fp8(fc1_, x, gamma, beta, eps_, transpose, stream);
  const int64_t t = x.dim(0), f = w1.dim(0);
  Tensor pre = Tensor::empty({t, f}, x.dtype(), x.device(), stream);
  fp8_gemm_fwd(fc1_, ln.y.data, w1, b1, pre, /*accumulate=*/false, stream);
  const Tensor& ln_t = ln.y.data_t;
  // gelu(pre) is never stored in the compute dtype: the cast to fp8 applies it.
  const Fp8Cast h =
      cast_both(fc2_, Fp8Operand::kInput, pre, CastArgs{CastActivation::kGelu, Tensor(), Tensor()}, stream, transpose);
  Tensor y = x.clone(stream);
  fp8_gemm_fwd(fc2_, h.data, w2, b2, y, /*accumulate=*/true, stream);
  const Tensor& h_t = h.data_t;
  x_ = save(x);
  gamma_ = save(gamma);
  mean_ = save(ln.mean);
  rstd_ = save(ln.rstd);
  ln_t_ = save(ln_t);
  w1_ = save(w1);
  pre_ = save(pre);
  h_t_ = save(h_t);
  w2_ = save(w2);
  return {y};
}

void Fp8LayerNormMlpNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  const Tensor& dy = gout[0];
  if (gin[0].defined()) axpy(1.0f, dy, gin[0], stream);  // residual path
  const Tensor& pre = saved(pre_);
  check_tokens(dy, "the output gradient");
  // dh = dy W2 (written, not accumulated); d pre = dh * gelu'(pre) exists only in fp8: the cast
  // applies the GELU's derivative and sums FC1's bias gradient in the same pass.
  Tensor dh = Tensor::empty(pre.shape(), pre.dtype(), pre.device(), stream);
  const Fp8Cast dy8 = cast_both(fc2_, Fp8Operand::kGradOutput, dy, with_bias_grad(gin[6]), stream);
  fp8_gemm_bwd(fc2_, dy8, saved(h_t_), saved(w2_), dh, /*accumulate_dx=*/false, gin[5], stream);
  const Fp8Cast d_pre = cast_both(fc1_, Fp8Operand::kGradOutput, dh,
                                  CastArgs{CastActivation::kGeluGrad, pre, gin[4]}, stream);
  const Tensor& x = saved(x_);
  const bool need_ln = gin[0].defined() || gin[1].defined() || gin[2].defined();
  Tensor d_ln = need_ln ? Tensor::empty(x.shape(), x.dtype(), x.device(), stream) : Tensor();
  fp8_gemm_bwd(fc1_, d_pre, saved(ln_t_), saved(w1_), d_ln, /*accumulate_dx=*/false, gin[3], stream);
  if (need_ln)
    layernorm_backward(x, saved(gamma_), saved(mean_), saved(rstd_), d_ln, gin[0], gin[1], gin[2], stream);
}

std::vector<Tensor> Fp8LinearNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  HELIX_CHECK(in.size() == 2 || in.size() == 3, "fp8_linear: expected 2 or 3 inputs, got {}", in.size());
  const Tensor &x = in[0], &w = in[1];
  Tensor y = Tensor::empty({x.dim(0), w.dim(0)}, x.dtype(), x.device(), stream);
  x_t_ = save(fp8_linear_fwd(slots_, x, w, in.size() == 3 ? in[2] : Tensor(), y, false, stream, wants_transpose(*this)));
  w_ = save(w);
  return {y};
}

void Fp8LinearNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  fp8_linear_bwd(slots_, gout[0], saved(x_t_), saved(w_), gin[0], gin[1], gin.size() == 3 ? gin[2] : Tensor(),
                 stream);
}

std::shared_ptr<Node> make_layernorm_linear_node(float eps, Fp8ScalingManager* fp8, int layer) {
  if (fp8 == nullptr) return std::make_shared<LayerNormLinearNode>(eps);
  return std::make_shared<Fp8LayerNormLinearNode>(eps, Fp8LinearSlots::of(fp8, layer, Fp8Gemm::kQkv));
}

std::shared_ptr<Node> make_linear_residual_node(Fp8ScalingManager* fp8, int layer) {
  if (fp8 == nullptr) return std::make_shared<LinearResidualNode>();
  return std::make_shared<Fp8LinearResidualNode>(Fp8LinearSlots::of(fp8, layer, Fp8Gemm::kOutProj));
}

std::shared_ptr<Node> make_layernorm_mlp_node(float eps, Fp8ScalingManager* fp8, int layer) {
  if (fp8 == nullptr) return std::make_shared<LayerNormMlpNode>(eps);
  return std::make_shared<Fp8LayerNormMlpNode>(eps, Fp8LinearSlots::of(fp8, layer, Fp8Gemm::kFc1),
                                               Fp8LinearSlots::of(fp8, layer, Fp8Gemm::kFc2));
}

std::shared_ptr<Node> make_linear_node(Fp8ScalingManager* fp8, int layer, Fp8Gemm gemm) {
  if (fp8 == nullptr) return std::make_shared<LinearNode>();
  return std::make_shared<Fp8LinearNode>(Fp8LinearSlots::of(fp8, layer, gemm));
}

}  // namespace helix
