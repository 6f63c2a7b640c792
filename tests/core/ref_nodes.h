#pragma once
// Small reference nodes (plain loops, f32 or f64) used to test the autograd graph and the gradient
// checker itself. The real fused layers live in layers/; these only exercise the node contract.
#include <cmath>

#include "core/autograd.h"

namespace helix::testing {

template <typename T>
T* ptr(const Tensor& t) { return t.data<T>(); }

// y[n, o] = sum_i x[n, i] * w[o, i] + b[o]. Inputs: x [N, I], w [O, I], b [O].
template <typename T>
class LinearRef : public Node {
 public:
  std::string name() const override { return "linear_ref"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override {
    const Tensor &x = in[0], &w = in[1], &b = in[2];
    n_ = x.dim(0), i_ = x.dim(1), o_ = w.dim(0);
    Tensor y = Tensor::empty({n_, o_}, x.dtype());
    for (int64_t n = 0; n < n_; ++n)
      for (int64_t o = 0; o < o_; ++o) {
        T s = ptr<T>(b)[o];
        for (int64_t i = 0; i < i_; ++i) s += ptr<T>(x)[n * i_ + i] * ptr<T>(w)[o * i_ + i];
        ptr<T>(y)[n * o_ + o] = s;
      }
    x_ = save(x);
    w_ = save(w);
    return {y};
  }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream&) override {
    const Tensor &x = saved(x_), &w = saved(w_), &dy = gout[0];
    for (int64_t n = 0; n < n_; ++n)
      for (int64_t o = 0; o < o_; ++o) {
        const T g = ptr<T>(dy)[n * o_ + o];
        if (gin[2].defined()) ptr<T>(gin[2])[o] += g;
        for (int64_t i = 0; i < i_; ++i) {
          if (gin[0].defined()) ptr<T>(gin[0])[n * i_ + i] += g * ptr<T>(w)[o * i_ + i];
          if (gin[1].defined()) ptr<T>(gin[1])[o * i_ + i] += g * ptr<T>(x)[n * i_ + i];
        }
      }
  }

 private:
  int64_t n_ = 0, i_ = 0, o_ = 0;
  int x_ = -1, w_ = -1;
};

// Row-wise LayerNorm with gain and bias. Inputs: x [N, C], g [C], b [C]. `wrong_backward` drops the
// mean term of dx: a deliberately broken node the gradient checker must catch.
template <typename T>
class LayerNormRef : public Node {
 public:
  explicit LayerNormRef(bool wrong_backward = false) : wrong_(wrong_backward) {}
  std::string name() const override { return wrong_ ? "layernorm_ref_wrong" : "layernorm_ref"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override {
    const Tensor &x = in[0], &g = in[1], &b = in[2];
    n_ = x.dim(0), c_ = x.dim(1);
    Tensor y = Tensor::empty({n_, c_}, x.dtype());
    Tensor xhat = Tensor::empty({n_, c_}, x.dtype());
    Tensor rstd = Tensor::empty({n_}, x.dtype());
    for (int64_t n = 0; n < n_; ++n) {
      T mean = 0, var = 0;
      for (int64_t c = 0; c < c_; ++c) mean += ptr<T>(x)[n * c_ + c];
      mean /= T(c_);
      for (int64_t c = 0; c < c_; ++c) var += (ptr<T>(x)[n * c_ + c] - mean) * (ptr<T>(x)[n * c_ + c] - mean);
      const T r = T(1) / std::sqrt(var / T(c_) + T(1e-5));
      ptr<T>(rstd)[n] = r;
      for (int64_t c = 0; c < c_; ++c) {
        const T h = (ptr<T>(x)[n * c_ + c] - mean) * r;
        ptr<T>(xhat)[n * c_ + c] = h;
        ptr<T>(y)[n * c_ + c] = h * ptr<T>(g)[c] + ptr<T>(b)[c];
      }
    }
    xhat_ = save(xhat);
    rstd_ = save(rstd);
    g_ = save(g);
    return {y};
  }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream&) override {
    const Tensor &xhat = saved(xhat_), &rstd = saved(rstd_), &g = saved(g_), &dy = gout[0];
    for (int64_t n = 0; n < n_; ++n) {
      T sum_dh = 0, sum_dh_h = 0;
      for (int64_t c = 0; c < c_; ++c) {
        const T dh = ptr<T>(dy)[n * c_ + c] * ptr<T>(g)[c];
        sum_dh += dh;
        sum_dh_h += dh * ptr<T>(xhat)[n * c_ + c];
      }
      for (int64_t c = 0; c < c_; ++c) {
        const T h = ptr<T>(xhat)[n * c_ + c], d = ptr<T>(dy)[n * c_ + c];
        if (gin[1].defined()) ptr<T>(gin[1])[c] += d * h;
        if (gin[2].defined()) ptr<T>(gin[2])[c] += d;
        if (gin[0].defined()) {
          const T dh = d * ptr<T>(g)[c];
          const T mean_term = wrong_ ? T(0) : sum_dh / T(c_);
          ptr<T>(gin[0])[n * c_ + c] += ptr<T>(rstd)[n] * (dh - mean_term - h * sum_dh_h / T(c_));
        }
      }
    }
  }

 private:
  bool wrong_;
  int64_t n_ = 0, c_ = 0;
  int xhat_ = -1, rstd_ = -1, g_ = -1;
};

// Elementwise: tanh (one input) and add (two inputs of one shape).
template <typename T>
class TanhRef : public Node {
 public:
  std::string name() const override { return "tanh_ref"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override {
    Tensor y = Tensor::empty(in[0].shape(), in[0].dtype());
    for (int64_t i = 0; i < y.numel(); ++i) ptr<T>(y)[i] = std::tanh(ptr<T>(in[0])[i]);
    y_ = save(y);
    return {y};
  }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream&) override {
    const Tensor& y = saved(y_);
    for (int64_t i = 0; i < y.numel(); ++i)
      ptr<T>(gin[0])[i] += ptr<T>(gout[0])[i] * (T(1) - ptr<T>(y)[i] * ptr<T>(y)[i]);
  }

 private:
  int y_ = -1;
};

template <typename T>
class AddRef : public Node {
 public:
  std::string name() const override { return "add_ref"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override {
    Tensor y = Tensor::empty(in[0].shape(), in[0].dtype());
    for (int64_t i = 0; i < y.numel(); ++i) ptr<T>(y)[i] = ptr<T>(in[0])[i] + ptr<T>(in[1])[i];
    return {y};
  }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream&) override {
    for (size_t k = 0; k < 2; ++k)
      if (gin[k].defined())
        for (int64_t i = 0; i < gout[0].numel(); ++i) ptr<T>(gin[k])[i] += ptr<T>(gout[0])[i];
  }
};

// log(x): produces NaN for negative inputs (used to test the non-finite check).
template <typename T>
class LogRef : public Node {
 public:
  std::string name() const override { return "log_ref"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override {
    Tensor y = Tensor::empty(in[0].shape(), in[0].dtype());
    for (int64_t i = 0; i < y.numel(); ++i) ptr<T>(y)[i] = std::log(ptr<T>(in[0])[i]);
    x_ = save(in[0]);
    return {y};
  }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream&) override {
    for (int64_t i = 0; i < gout[0].numel(); ++i) ptr<T>(gin[0])[i] += ptr<T>(gout[0])[i] / ptr<T>(saved(x_))[i];
  }

 private:
  int x_ = -1;
};

// Sum of all elements to a [1] scalar.
template <typename T>
class SumRef : public Node {
 public:
  std::string name() const override { return "sum_ref"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override {
    Tensor y = Tensor::empty({1}, in[0].dtype());
    T s = 0;
    for (int64_t i = 0; i < in[0].numel(); ++i) s += ptr<T>(in[0])[i];
    ptr<T>(y)[0] = s;
    shape_ = in[0].shape();
    return {y};
  }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream&) override {
    for (int64_t i = 0; i < shape_.numel(); ++i) ptr<T>(gin[0])[i] += ptr<T>(gout[0])[0];
  }

 private:
  Shape shape_;
};

}  // namespace helix::testing
