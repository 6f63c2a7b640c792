#include <cstring>

#include "kernels/qkv/qkv.h"

namespace helix {
namespace {

void check_shapes(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  HELIX_CHECK(qkv.ndim() == 2 && qkv.dim(1) % 3 == 0, "{}: expected qkv [T, 3H], got {}", op, qkv.str());
  const int64_t t = qkv.dim(0), h = qkv.dim(1) / 3;
  for (const Tensor* x : {&q, &k, &v}) {
    HELIX_CHECK(x->numel() == t * h && x->dtype() == qkv.dtype() && x->device() == qkv.device(),
                "{}: expected [{}, {}] {} on {} for q/k/v, got {}", op, t, h, dtype_name(qkv.dtype()),
                qkv.device().str(), x->str());
  }
  HELIX_CHECK(qkv.dtype() == DType::kF32 || qkv.dtype() == DType::kBF16, "{}: expected f32 or bf16, got {}", op,
              qkv.str());
}

template <typename T>
void join_cpu(const QkvJoinGradParams& p) {
  const int64_t t = p.dqkv.dim(0), h = p.dqkv.dim(1) / 3;
  T* out = p.dqkv.data<T>();
  const T* parts[3] = {p.dq.data<T>(), p.dk.data<T>(), p.dv.data<T>()};
  for (int64_t r = 0; r < t; ++r)
    for (int j = 0; j < 3; ++j)
      for (int64_t c = 0; c < h; ++c) {
        T& o = out[r * 3 * h + j * h + c];
        const T& g = parts[j][r * h + c];
        if constexpr (std::is_same_v<T, bf16_t>) o = bf16_t::from_float(o.to_float() + g.to_float());
        else o += g;
      }
}

}  // namespace

void qkv_split(const QkvSplitParams& p, const Stream& stream) {
  check_shapes(p.qkv, p.q, p.k, p.v, "qkv_split");
  if (p.qkv.is_cuda()) {
#if HELIX_WITH_CUDA
    return detail::qkv_split_cuda(p, stream);
#else
    HELIX_FAIL("qkv_split: CUDA tensors in a CPU-only build");
#endif
  }
  const int64_t t = p.qkv.dim(0), h = p.qkv.dim(1) / 3, es = static_cast<int64_t>(dtype_size(p.qkv.dtype()));
  const char* src = static_cast<const char*>(p.qkv.data_ptr());
  char* dst[3] = {static_cast<char*>(p.q.data_ptr()), static_cast<char*>(p.k.data_ptr()),
                  static_cast<char*>(p.v.data_ptr())};
  for (int64_t r = 0; r < t; ++r)
    for (int j = 0; j < 3; ++j) std::memcpy(dst[j] + r * h * es, src + (r * 3 * h + j * h) * es, h * es);
}

void qkv_join_grad(const QkvJoinGradParams& p, const Stream& stream) {
  check_shapes(p.dqkv, p.dq, p.dk, p.dv, "qkv_join_grad");
  if (p.dqkv.is_cuda()) {
#if HELIX_WITH_CUDA
    return detail::qkv_join_grad_cuda(p, stream);
#else
    HELIX_FAIL("qkv_join_grad: CUDA tensors in a CPU-only build");
#endif
  }
  if (p.dqkv.dtype() == DType::kF32) join_cpu<float>(p);
  else join_cpu<bf16_t>(p);
}

}  // namespace helix
