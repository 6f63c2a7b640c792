#include "layers/linear.h"

#include "kernels/axpy/axpy.h"
#include "kernels/gelu/gelu.h"
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

std::vector<Tensor> LinearNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &x = in[0], &w = in[1];
  HELIX_CHECK(in.size() == 2 || in.size() == 3, "linear: expected 2 or 3 inputs, got {}", in.size());
  Tensor y = Tensor::empty({x.dim(0), w.dim(0)}, x.dtype(), x.device(), stream);
  linear_fwd(x, w, in.size() == 3 ? in[2] : Tensor(), y, /*accumulate=*/false, stream);
  x_ = save(x);
  w_ = save(w);
  return {y};
}

void LinearNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  linear_bwd(gout[0], saved(x_), saved(w_), gin[0], gin[1], gin.size() == 3 ? gin[2] : Tensor(), stream);
}

std::vector<Tensor> GeluNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  Tensor y = Tensor::empty(in[0].shape(), in[0].dtype(), in[0].device(), stream);
  gelu_fwd(GeluFwdParams{.x = in[0], .y = y}, stream);
  x_ = save(in[0]);
  return {y};
}

void GeluNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  if (!gin[0].defined()) return;
  gelu_bwd(GeluBwdParams{.x = saved(x_), .dy = gout[0], .dx = gin[0]}, stream);
}

namespace {
constexpr int64_t kZeroCols = 16;  // width of the zero operand that carries the bias through a GEMM
}

std::vector<Tensor> BiasResidualNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor &x = in[0], &b = in[1], &residual = in[2];
  HELIX_CHECK(x.shape() == residual.shape() && x.ndim() == 2 && b.numel() == x.dim(1),
              "bias_residual: expected x and residual [T, C] and b [C], got {}, {}, {}", x.str(), residual.str(), b.str());
  Tensor y = residual.clone(stream);
  axpy(1.0f, x, y, stream);
  const Tensor zx = Tensor::zeros({x.dim(0), kZeroCols}, x.dtype(), x.device(), stream);
  const Tensor zw = Tensor::zeros({x.dim(1), kZeroCols}, b.dtype(), x.device(), stream);
  linear_fwd(zx, zw, b, y, /*accumulate=*/true, stream);  // y += 0 + b
  return {y};
}

void BiasResidualNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  const Tensor& dy = gout[0];
  if (gin[0].defined()) axpy(1.0f, dy, gin[0], stream);
  if (gin[2].defined()) axpy(1.0f, dy, gin[2], stream);
  if (gin[1].defined()) {  // db += sum_T dy, from the bias-gradient epilogue of a GEMM with a zero operand
    const Tensor zx = Tensor::zeros({dy.dim(0), kZeroCols}, dy.dtype(), dy.device(), stream);
    const Tensor scratch = Tensor::zeros({dy.dim(1), kZeroCols}, DType::kF32, dy.device(), stream);
    linear_bwd(dy, zx, Tensor(), Tensor(), scratch, gin[1], stream);
  }
}

}  // namespace helix
