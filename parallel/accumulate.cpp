#include "parallel/accumulate.h"

#include "core/error.h"

namespace helix {
namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const bf16_t* p, int64_t i) { return p[i].to_float(); }
inline void add_to(float* p, int64_t i, float v) { p[i] += v; }
inline void add_to(bf16_t* p, int64_t i, float v) {
  p[i] = bf16_t::from_float(p[i].to_float() + v);
}

template <typename D, typename S>
void accumulate_cpu(const Tensor& dst, const Tensor& src) {
  D* d = static_cast<D*>(dst.data_ptr());
  const S* s = static_cast<const S*>(src.data_ptr());
  for (int64_t i = 0; i < dst.numel(); ++i) add_to(d, i, load(s, i));
}

}  // namespace

void accumulate(const Tensor& dst, const Tensor& src, const Stream& stream) {
  HELIX_CHECK(dst.defined() && src.defined(), "accumulate: undefined tensor");
  HELIX_CHECK(
      dst.numel() == src.numel() && dst.device() == src.device() && dst.is_contiguous() &&
          src.is_contiguous(),
      "accumulate: expected contiguous tensors of one numel and device, got dst {} and src {}",
      dst.str(), src.str());
  const DType d = dst.dtype(), s = src.dtype();
  const bool floats =
      (d == DType::kF32 || d == DType::kBF16) && (s == DType::kF32 || s == DType::kBF16);
  HELIX_CHECK(floats || (d == DType::kF64 && s == DType::kF64),
              "accumulate: expected f32/bf16 (any mix) or f64 tensors, got dst {} and src {}",
              dtype_name(d), dtype_name(s));
  if (dst.numel() == 0) return;
  if (dst.is_cuda()) {
#if HELIX_WITH_CUDA
    return detail::accumulate_cuda(dst, src, stream);
#else
    HELIX_FAIL("accumulate: CUDA tensor {} in a CPU-only build", dst.str());
#endif
  }
  if (d == DType::kF64) {
    double* p = static_cast<double*>(dst.data_ptr());
    const double* q = static_cast<const double*>(src.data_ptr());
    for (int64_t i = 0; i < dst.numel(); ++i) p[i] += q[i];
  } else if (d == DType::kF32) {
    s == DType::kF32 ? accumulate_cpu<float, float>(dst, src)
                     : accumulate_cpu<float, bf16_t>(dst, src);
  } else {
    s == DType::kF32 ? accumulate_cpu<bf16_t, float>(dst, src)
                     : accumulate_cpu<bf16_t, bf16_t>(dst, src);
  }
}

}  // namespace helix
