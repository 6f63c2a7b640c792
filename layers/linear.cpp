#include "layers/linear.h"

#include "kernels/axpy/axpy.h"
#include "kernels/gemm/gemm.h"

namespace helix {

void linear_fwd(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y, bool accumulate,
                const Stream& stream) {
  GemmParams g;
  g.a = x;
  g.b = w;
  g.op_b = GemmOp::kTranspose;
  g.c = y;
  g.beta = accumulate ? 1.0f : 0.0f;
  if (b.defined()) {
    g.epilogue = GemmEpilogue::kBias;
    g.bias = b;
  }
  gemm(g, stream);
}

void linear_bwd(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& dx, const Tensor& dw,
                const Tensor& db, const Stream& stream) {
  if (dx.defined()) {  // dx += dy W
    GemmParams g;
    g.a = dy;
    g.b = w;
    g.c = dx;
    g.beta = 1.0f;
    gemm(g, stream);
  }
  if (dw.defined()) {  // dW += dy^T x, and the bias gradient from the same pass over dy
    GemmParams g;
    g.a = dy;
    g.op_a = GemmOp::kTranspose;
    g.b = x;
    g.c = dw;
    g.beta = 1.0f;
    Tensor bias_grad;
    if (db.defined()) {
      bias_grad = Tensor::empty(db.shape(), DType::kF32, db.device(), stream);
      g.epilogue = GemmEpilogue::kBiasGradA;
      g.bias_grad = bias_grad;
    }
    gemm(g, stream);
    if (db.defined()) axpy(1.0f, bias_grad, db, stream);  // the epilogue overwrites: accumulate here
  } else if (db.defined()) {
    HELIX_FAIL("linear_bwd: a bias gradient without the weight gradient is not supported");
  }
}

std::vector<Tensor> LinearResidualNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &a = in[0], &w = in[1], &b = in[2], &residual = in[3];
  Tensor y = residual.clone(stream);
  linear_fwd(a, w, b, y, /*accumulate=*/true, stream);
  a_ = save(a);
  w_ = save(w);
  return {y};
}

void LinearResidualNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  const Tensor& dy = gout[0];
  if (gin[3].defined()) axpy(1.0f, dy, gin[3], stream);
  linear_bwd(dy, saved(a_), saved(w_), gin[0], gin[1], gin[2], stream);
}

}  // namespace helix
