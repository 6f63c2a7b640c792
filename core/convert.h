#pragma once
// Scalar conversions float <-> bf16 / fp8, bit-exact with CUDA's: round to nearest even, bf16 NaN ->
// 0x7FFF, fp8 with saturation to the largest finite value (CUDA's __NV_SATFINITE; +-inf saturates too),
// fp8 NaN -> 0x7F with the input's sign dropped, inputs below half the smallest subnormal -> +-0.
// On the device the hardware conversions are used; the host code is their bit-exact twin (checked
// on the GPU for 10^7 random floats and every edge case), so kernels and CPU references agree.
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#endif

#if defined(__CUDACC__)
#define HELIX_HD __host__ __device__ __forceinline__
#else
#define HELIX_HD inline
#endif

namespace helix {

HELIX_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
HELIX_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// ---- bf16 --------------------------------------------------------------------------------------
HELIX_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));  // cvt.rn.bf16.f32
#endif
  const uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;  // canonical NaN
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}
HELIX_HD float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// ---- fp8 ---------------------------------------------------------------------------------------
enum class Fp8Format : uint8_t { kE4M3, kE5M2 };

// Round-to-nearest-even with saturation, following the OCP FP8 spec as CUDA's
// __nv_cvt_float_to_fp8(x, __NV_SATFINITE, fmt) implements it. Works on the float's bits directly.
HELIX_HD uint8_t float_to_fp8_bits(float f, Fp8Format fmt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  // The hardware conversion (cvt.rn.satfinite); the code below is its bit-exact host twin.
  return __nv_cvt_float_to_fp8(f, __NV_SATFINITE, fmt == Fp8Format::kE4M3 ? __NV_E4M3 : __NV_E5M2);
#endif
  const bool e4m3 = fmt == Fp8Format::kE4M3;
  const uint32_t u = float_bits(f);
  const uint32_t absu = u & 0x7FFFFFFFu;
  if (absu > 0x7F800000u) return 0x7F;  // NaN: canonical, positive
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const int mbits = e4m3 ? 3 : 2;                  // target mantissa bits
  const int bias = e4m3 ? 7 : 15;
  const uint32_t maxnorm = e4m3 ? 0x7Eu : 0x7Bu;  // 448, 57344
  // Saturation: E4M3 above 464 (max 448 plus half an ulp; 464 itself rounds to even = 448),
  // E5M2 at or above 61440 (CUDA saturates the midpoint rather than rounding it to inf).
  if (e4m3 ? absu > 0x43E80000u : absu >= 0x47700000u) return sign | static_cast<uint8_t>(maxnorm);
  const int exp = static_cast<int>(absu >> 23) - 127;  // unbiased exponent of the float
  const int min_exp = 1 - bias;                        // exponent of the smallest normal
  // Half of the smallest subnormal: 2^(min_exp - mbits - 1); at or below it -> zero.
  const int tiny_exp = min_exp - mbits - 1;
  if (absu <= (static_cast<uint32_t>(tiny_exp + 127) << 23)) return sign;
  uint32_t mant = (absu & 0x7FFFFFu) | 0x800000u;  // 24-bit significand with the implicit one
  int shift;                                      // how many low bits of mant are dropped
  uint32_t e_field;
  if (exp >= min_exp) {
    shift = 23 - mbits;
    e_field = static_cast<uint32_t>(exp + bias);
  } else {
    shift = 23 - mbits + (min_exp - exp);  // subnormal: extra right shift
    e_field = 0;
  }
  uint32_t kept = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  uint32_t code;
  if (e_field) {
    code = (e_field << mbits) | (kept & ((1u << mbits) - 1u));
  } else {
    code = kept;  // the implicit one shifted into the mantissa field, or out of it
  }
  if (rem > half || (rem == half && (code & 1u))) code += 1;  // carries into the exponent as needed
  return sign | static_cast<uint8_t>(code);
}

HELIX_HD float fp8_bits_to_float(uint8_t b, Fp8Format fmt) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t absb = b & 0x7Fu;
  if (fmt == Fp8Format::kE4M3) {
    if (absb == 0x7Fu) return bits_float(sign | 0x7FFFFFFFu);  // NaN
    const uint32_t e = absb >> 3, m = absb & 7u;
    if (e == 0) {  // subnormal: m * 2^-9
      const float v = static_cast<float>(m) * (1.0f / 512.0f);
      return bits_float(sign | float_bits(v));
    }
    return bits_float(sign | ((e - 7 + 127) << 23) | (m << 20));
  }
  const uint32_t e = absb >> 2, m = absb & 3u;
  if (e == 31) return bits_float(sign | (m ? 0x7FFFFFFFu : 0x7F800000u));
  if (e == 0) {  // subnormal: m * 2^-16
    const float v = static_cast<float>(m) * (1.0f / 65536.0f);
    return bits_float(sign | float_bits(v));
  }
  return bits_float(sign | ((e - 15 + 127) << 23) | (m << 21));
}

// Typed 16- and 8-bit storage so that tensors of these types are distinct C++ types.
struct bf16_t {
  uint16_t bits;
  HELIX_HD static bf16_t from_float(float f) { return bf16_t{float_to_bf16_bits(f)}; }
  HELIX_HD float to_float() const { return bf16_bits_to_float(bits); }
};
struct e4m3_t {
  uint8_t bits;
  HELIX_HD static e4m3_t from_float(float f) { return e4m3_t{float_to_fp8_bits(f, Fp8Format::kE4M3)}; }
  HELIX_HD float to_float() const { return fp8_bits_to_float(bits, Fp8Format::kE4M3); }
};
struct e5m2_t {
  uint8_t bits;
  HELIX_HD static e5m2_t from_float(float f) { return e5m2_t{float_to_fp8_bits(f, Fp8Format::kE5M2)}; }
  HELIX_HD float to_float() const { return fp8_bits_to_float(bits, Fp8Format::kE5M2); }
};

}  // namespace helix
