// CPU references of the casts: element loops through convert.h (the bit-exact twin of the GPU's
// conversions), amax as an unsigned max over |x|'s bit pattern exactly as the GPU's atomicMax.
#include <cstdint>
#include <vector>

#include "core/convert.h"
#include "kernels/cast/cast.h"
#include "kernels/gelu/gelu_math.h"

namespace helix {
namespace {

float load(const Tensor& t, int64_t i) {
  return t.dtype() == DType::kF32 ? t.data<float>()[i] : t.data<bf16_t>()[i].to_float();
}

Fp8Format fp8_format(DType t) { return t == DType::kE4M3 ? Fp8Format::kE4M3 : Fp8Format::kE5M2; }

// The scaled fp8 code of x, as the CUDA kernels compute it (one fp32 multiply, then cvt.satfinite).
uint8_t to_fp8(float x, float scale, Fp8Format fmt) { return float_to_fp8_bits(x * scale, fmt); }

// amax = max(amax, bits of |x| over the input) in the unsigned order of the bit patterns.
void update_amax(const Tensor& amax, uint32_t local_bits) {
  if (!amax.defined()) return;
  float* a = amax.data<float>();
  if (local_bits > float_bits(*a)) *a = bits_float(local_bits);
}

uint8_t* fp8_data(const Tensor& t) { return static_cast<uint8_t*>(t.data_ptr()); }

}  // namespace

void detail::cast_fp8_cpu(const CastFp8Params& p) {
  const float scale = p.scale.data<float>()[0];
  const Fp8Format fmt = fp8_format(p.out.dtype());
  uint8_t* out = fp8_data(p.out);
  uint32_t amax_bits = 0;
  for (int64_t i = 0; i < p.in.numel(); ++i) {
    const float x = load(p.in, i);
    const uint32_t abs_bits = float_bits(x) & 0x7FFFFFFFu;
    if (abs_bits > amax_bits) amax_bits = abs_bits;
    out[i] = to_fp8(x, scale, fmt);
  }
  update_amax(p.amax, amax_bits);
}

void detail::cast_transpose_fp8_cpu(const CastTransposeFp8Params& p) {
  const float scale = p.scale.data<float>()[0];
  const Fp8Format fmt = fp8_format(p.out.dtype());
  const int64_t m = p.in.dim(0), n = p.in.dim(1);
  uint8_t* out = fp8_data(p.out);
  uint8_t* out_t = p.out_t.defined() ? fp8_data(p.out_t) : nullptr;
  const bool bf16 = p.in.dtype() == DType::kBF16;
  // The value the unfused op would have stored in in's dtype (gelu_fwd / gelu_bwd round once).
  auto value = [&](int64_t i) {
    float v = load(p.in, i);
    if (p.act == CastActivation::kGelu) v = gelu_math::value(v);
    if (p.act == CastActivation::kGeluGrad) v = v * gelu_math::grad(load(p.pre, i));
    return bf16 ? bf16_t::from_float(v).to_float() : v;
  };
  std::vector<float> colsum(p.dbias.defined() ? n : 0, 0.f);
  uint32_t amax_bits = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const float x = value(i * n + j);
      const uint32_t abs_bits = float_bits(x) & 0x7FFFFFFFu;
      if (abs_bits > amax_bits) amax_bits = abs_bits;
      const uint8_t code = to_fp8(x, scale, fmt);
      out[i * n + j] = code;
      if (out_t) out_t[j * m + i] = code;
      if (!colsum.empty()) colsum[j] += x;
    }
  }
  update_amax(p.amax, amax_bits);
  if (!colsum.empty()) {
    float* db = p.dbias.data<float>();
    for (int64_t j = 0; j < n; ++j) db[j] += colsum[j];
  }
}

void detail::cast_cpu(const CastParams& p) {
  const int64_t n = p.in.numel();
  if (p.in.dtype() == DType::kF32) {
    const float* in = p.in.data<float>();
    bf16_t* out = p.out.data<bf16_t>();
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_t::from_float(in[i]);
  } else {
    const bf16_t* in = p.in.data<bf16_t>();
    float* out = p.out.data<float>();
    for (int64_t i = 0; i < n; ++i) out[i] = in[i].to_float();
  }
}

}  // namespace helix
