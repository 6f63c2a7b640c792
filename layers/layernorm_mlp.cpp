#include "layers/layernorm_mlp.h"

#include "kernels/axpy/axpy.h"
#include "kernels/gelu/gelu.h"
#include "layers/layernorm_linear.h"
#include "layers/linear.h"

namespace helix {
namespace {

// pre = x W^T + b, h = GELU(pre), both [T, out]. GELU runs as its own pass (not a GEMM epilogue) so
// that backward's recomputation of h from pre is bitwise the forward's h.
void linear_gelu_fwd(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pre, const Tensor& h,
                     const Stream& stream) {
  linear_fwd(x, w, b, pre, false, stream);
  gelu_fwd(GeluFwdParams{.x = pre, .y = h}, stream);
}

Tensor gelu_of(const Tensor& pre, const Stream& stream) {
  Tensor h = Tensor::empty(pre.shape(), pre.dtype(), pre.device(), stream);
  gelu_fwd(GeluFwdParams{.x = pre, .y = h}, stream);
  return h;
}

// d_pre = GELU'(pre) * dh, into a new zeroed tensor.
Tensor gelu_grad(const Tensor& pre, const Tensor& dh, const Stream& stream) {
  Tensor d_pre = Tensor::zeros(pre.shape(), pre.dtype(), pre.device(), stream);
  gelu_bwd(GeluBwdParams{.x = pre, .dy = dh, .dx = d_pre}, stream);
  return d_pre;
}

}  // namespace

std::vector<Tensor> LayerNormMlpNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &x = in[0], &gamma = in[1], &beta = in[2], &w1 = in[3], &b1 = in[4], &w2 = in[5], &b2 = in[6];
  LayerNormOut ln = layernorm_forward(x, gamma, beta, eps_, stream);
  const int64_t t = x.dim(0), f = w1.dim(0);
  Tensor pre = Tensor::empty({t, f}, x.dtype(), x.device(), stream);
  Tensor h = Tensor::empty({t, f}, x.dtype(), x.device(), stream);
  linear_gelu_fwd(ln.y, w1, b1, pre, h, stream);
  Tensor y = x.clone(stream);
  linear_fwd(h, w2, b2, y, /*accumulate=*/true, stream);
  x_ = save(x);
  gamma_ = save(gamma);
  mean_ = save(ln.mean);
  rstd_ = save(ln.rstd);
  ln_out_ = save(ln.y);
  w1_ = save(w1);
  pre_ = save(pre);
  w2_ = save(w2);
  return {y};
}

void LayerNormMlpNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  const Tensor& dy = gout[0];
  if (gin[0].defined()) axpy(1.0f, dy, gin[0], stream);  // residual path
  const Tensor& pre = saved(pre_);
  const Tensor h = gelu_of(pre, stream);
  Tensor dh = Tensor::zeros(pre.shape(), pre.dtype(), pre.device(), stream);
  linear_bwd(dy, h, saved(w2_), dh, gin[5], gin[6], stream);
  const Tensor d_pre = gelu_grad(pre, dh, stream);
  const Tensor& ln_out = saved(ln_out_);
  const bool need_ln = gin[0].defined() || gin[1].defined() || gin[2].defined();
  Tensor d_ln = need_ln ? Tensor::zeros(ln_out.shape(), ln_out.dtype(), ln_out.device(), stream) : Tensor();
  linear_bwd(d_pre, ln_out, saved(w1_), d_ln, gin[3], gin[4], stream);
  if (need_ln)
    layernorm_backward(saved(x_), saved(gamma_), saved(mean_), saved(rstd_), d_ln, gin[0], gin[1], gin[2], stream);
}

std::vector<Tensor> LmHeadNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &x = in[0], &wd = in[1], &bd = in[2], &gamma = in[3], &beta = in[4], &we = in[5], &b = in[6];
  const int64_t t = x.dim(0), h = wd.dim(0), v = we.dim(0);
  Tensor pre = Tensor::empty({t, h}, x.dtype(), x.device(), stream);
  Tensor act = Tensor::empty({t, h}, x.dtype(), x.device(), stream);
  linear_gelu_fwd(x, wd, bd, pre, act, stream);
  LayerNormOut ln = layernorm_forward(act, gamma, beta, eps_, stream);
  Tensor logits = Tensor::empty({t, v}, x.dtype(), x.device(), stream);
  linear_fwd(ln.y, we, b, logits, false, stream);
  x_ = save(x);
  wd_ = save(wd);
  pre_ = save(pre);
  gamma_ = save(gamma);
  mean_ = save(ln.mean);
  rstd_ = save(ln.rstd);
  z_ = save(ln.y);
  we_ = save(we);
  return {logits};
}

void LmHeadNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  const Tensor& z = saved(z_);
  Tensor dz = Tensor::zeros(z.shape(), z.dtype(), z.device(), stream);
  linear_bwd(gout[0], z, saved(we_), dz, gin[5], gin[6], stream);
  const Tensor& pre = saved(pre_);
  const Tensor act = gelu_of(pre, stream);
  Tensor d_act = Tensor::zeros(pre.shape(), pre.dtype(), pre.device(), stream);
  layernorm_backward(act, saved(gamma_), saved(mean_), saved(rstd_), dz, d_act, gin[3], gin[4], stream);
  const Tensor d_pre = gelu_grad(pre, d_act, stream);
  linear_bwd(d_pre, saved(x_), saved(wd_), gin[0], gin[1], gin[2], stream);
}

std::vector<Tensor> LmDecoderNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &z = in[0], &we = in[1], &b = in[2];
  HELIX_CHECK(valid_rows_ >= 1 && valid_rows_ <= we.dim(0), "lm_decoder: expected 1..{} valid rows, got {}",
              we.dim(0), valid_rows_);
  Tensor logits = Tensor::empty({z.dim(0), valid_rows_}, z.dtype(), z.device(), stream);
  linear_fwd(z, we.slice(0, valid_rows_), b.slice(0, valid_rows_), logits, false, stream);
  z_ = save(z);
  we_ = save(we);
  return {logits};
}

void LmDecoderNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  if (!gout[0].defined()) return;
  const auto rows = [&](const Tensor& g) { return g.defined() ? g.slice(0, valid_rows_) : Tensor(); };
  linear_bwd(gout[0], saved(z_), saved(we_).slice(0, valid_rows_), gin[0], rows(gin[1]), rows(gin[2]), stream);
}

}  // namespace helix
