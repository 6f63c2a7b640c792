#include "kernels/axpy/axpy.h"

namespace helix {
namespace {

template <typename X, typename Y>
void axpy_cpu(float alpha, const X* x, Y* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float xv, yv;
    if constexpr (std::is_same_v<X, bf16_t>) xv = x[i].to_float(); else xv = x[i];
    if constexpr (std::is_same_v<Y, bf16_t>) yv = y[i].to_float(); else yv = y[i];
    const float r = yv + alpha * xv;
    if constexpr (std::is_same_v<Y, bf16_t>) y[i] = bf16_t::from_float(r); else y[i] = r;
  }
}

}  // namespace

void axpy(float alpha, const Tensor& x, const Tensor& y, const Stream& stream) {
  HELIX_CHECK(x.numel() == y.numel(), "axpy: x {} and y {} differ in size", x.str(), y.str());
  HELIX_CHECK(x.device() == y.device(), "axpy: x {} and y {} on different devices", x.str(), y.str());
  for (const Tensor* t : {&x, &y})
    HELIX_CHECK(t->dtype() == DType::kF32 || t->dtype() == DType::kBF16, "axpy: expected f32 or bf16, got {}",
                t->str());
  if (x.numel() == 0) return;
  if (y.is_cuda()) {
#if HELIX_WITH_CUDA
    detail::axpy_cuda(alpha, x, y, stream);
    return;
#else
    HELIX_FAIL("axpy: CUDA tensor {} in a CPU-only build", y.str());
#endif
  }
  const int64_t n = x.numel();
  const bool xf = x.dtype() == DType::kF32, yf = y.dtype() == DType::kF32;
  if (xf && yf) axpy_cpu(alpha, x.data<float>(), y.data<float>(), n);
  else if (xf) axpy_cpu(alpha, x.data<float>(), y.data<bf16_t>(), n);
  else if (yf) axpy_cpu(alpha, x.data<bf16_t>(), y.data<float>(), n);
  else axpy_cpu(alpha, x.data<bf16_t>(), y.data<bf16_t>(), n);
}

}  // namespace helix
