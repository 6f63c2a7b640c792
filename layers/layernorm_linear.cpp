#include "layers/layernorm_linear.h"

#include "kernels/layernorm/layernorm.h"
#include "layers/linear.h"

namespace helix {

LayerNormOut layernorm_forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps,
                               const Stream& stream) {
  const int64_t t = x.dim(0);
  LayerNormOut o{Tensor::empty(x.shape(), x.dtype(), x.device(), stream),
                 Tensor::empty({t}, DType::kF32, x.device(), stream),
                 Tensor::empty({t}, DType::kF32, x.device(), stream)};
  LayerNormFwdParams p;
  p.x = x;
  p.gamma = gamma;
  p.beta = beta;
  p.eps = eps;
  p.y = o.y;
  p.mean = o.mean;
  p.rstd = o.rstd;
  layernorm_fwd(p, stream);
  return o;
}

void layernorm_backward(const Tensor& x, const Tensor& gamma, const Tensor& mean, const Tensor& rstd,
                        const Tensor& dy, const Tensor& dx, const Tensor& dgamma, const Tensor& dbeta,
                        const Stream& stream) {
  LayerNormBwdParams p;
  p.x = x;
  p.gamma = gamma;
  p.mean = mean;
  p.rstd = rstd;
  p.dy = dy;
  p.dx = dx;
  p.accumulate_dx = true;
  p.dgamma = dgamma;
  p.dbeta = dbeta;
  layernorm_bwd(p, stream);
}

std::vector<Tensor> LayerNormLinearNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &x = in[0], &gamma = in[1], &beta = in[2], &w = in[3], &b = in[4];
  LayerNormOut ln = layernorm_forward(x, gamma, beta, eps_, stream);
  Tensor y = Tensor::empty({x.dim(0), w.dim(0)}, x.dtype(), x.device(), stream);
  linear_fwd(ln.y, w, b, y, false, stream);
  x_ = save(x);
  gamma_ = save(gamma);
  mean_ = save(ln.mean);
  rstd_ = save(ln.rstd);
  ln_out_ = save(ln.y);
  w_ = save(w);
  return {y};
}

void LayerNormLinearNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  const Tensor& ln_out = saved(ln_out_);
  const bool need_ln_grad = gin[0].defined() || gin[1].defined() || gin[2].defined();
  Tensor d_ln = need_ln_grad ? Tensor::zeros(ln_out.shape(), ln_out.dtype(), ln_out.device(), stream) : Tensor();
  linear_bwd(gout[0], ln_out, saved(w_), d_ln, gin[3], gin[4], stream);
  if (need_ln_grad)
    layernorm_backward(saved(x_), saved(gamma_), saved(mean_), saved(rstd_), d_ln, gin[0], gin[1], gin[2], stream);
}

std::vector<Tensor> LayerNormNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  LayerNormOut ln = layernorm_forward(in[0], in[1], in[2], eps_, stream);
  x_ = save(in[0]);
  gamma_ = save(in[1]);
  mean_ = save(ln.mean);
  rstd_ = save(ln.rstd);
  return {ln.y};
}

void LayerNormNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  layernorm_backward(saved(x_), saved(gamma_), saved(mean_), saved(rstd_), gout[0], gin[0], gin[1], gin[2], stream);
}

}  // namespace helix
