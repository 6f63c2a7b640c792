#include "core/random.h"

#include "core/random_math.h"

namespace helix {
namespace {

void fill_random(Tensor& t, uint64_t seed, uint64_t sub, float a, float b, bool normal, const Stream& stream) {
  HELIX_CHECK(t.dtype() == DType::kF32 || t.dtype() == DType::kBF16 || t.dtype() == DType::kF64,
              "random fill: expected an f32, bf16 or f64 tensor, got {}", t.str());
  const int64_t n = t.numel();
  if (t.is_cuda()) {
    detail::cuda_fill_random(t, seed, sub, a, b, normal, stream.handle());
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float v = detail::random_value(seed, sub, static_cast<uint64_t>(i), a, b, normal);
    switch (t.dtype()) {
      case DType::kF32: t.data<float>()[i] = v; break;
      case DType::kBF16: t.data<bf16_t>()[i] = bf16_t::from_float(v); break;
      default: t.data<double>()[i] = v; break;
    }
  }
}

}  // namespace

void fill_uniform(Tensor& t, uint64_t seed, uint64_t subsequence, float lo, float hi, const Stream& stream) {
  fill_random(t, seed, subsequence, lo, hi, false, stream);
}
void fill_normal(Tensor& t, uint64_t seed, uint64_t subsequence, float mean, float std, const Stream& stream) {
  fill_random(t, seed, subsequence, mean, std, true, stream);
}

#if !HELIX_WITH_CUDA
void detail::cuda_fill_random(Tensor&, uint64_t, uint64_t, float, float, bool, void*) {
  HELIX_FAIL("CUDA random fill requested, but helix was built without CUDA");
}
#endif

}  // namespace helix
