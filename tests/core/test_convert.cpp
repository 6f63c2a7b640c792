// bf16 / fp8 conversions: exhaustive fp8 round trips, hand-checked edge cases, and on a GPU the CPU
// conversion against CUDA's hardware conversion for 10^7 random floats plus the edge cases.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/convert.h"
#include "core/philox.h"
#include "core/tensor.h"
#include "test_util.h"

namespace helix {
namespace {

TEST(Fp8, EveryCodeRoundTrips) {
  for (Fp8Format fmt : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
    for (int c = 0; c < 256; ++c) {
      const uint8_t code = static_cast<uint8_t>(c);
      const float f = fp8_bits_to_float(code, fmt);
      if (std::isnan(f)) {
        EXPECT_EQ(float_to_fp8_bits(f, fmt), 0x7F) << "code " << c;
        continue;
      }
      if (std::isinf(f)) {  // E5M2 +-inf saturate to +-max
        EXPECT_EQ(float_to_fp8_bits(f, fmt), (code & 0x80) | 0x7B) << "code " << c;
        continue;
      }
      EXPECT_EQ(float_to_fp8_bits(f, fmt), code) << "fmt " << int(fmt) << " code " << c << " value " << f;
    }
  }
}

TEST(Fp8, KnownValues) {
  const auto e4 = [](float f) { return float_to_fp8_bits(f, Fp8Format::kE4M3); };
  const auto e5 = [](float f) { return float_to_fp8_bits(f, Fp8Format::kE5M2); };
  EXPECT_EQ(fp8_bits_to_float(0x7E, Fp8Format::kE4M3), 448.0f);
  EXPECT_EQ(fp8_bits_to_float(0x7B, Fp8Format::kE5M2), 57344.0f);
  EXPECT_EQ(fp8_bits_to_float(0x01, Fp8Format::kE4M3), std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8_bits_to_float(0x01, Fp8Format::kE5M2), std::ldexp(1.0f, -16));
  EXPECT_EQ(e4(1.0f), 0x38);
  EXPECT_EQ(e4(-2.0f), 0xC0);
  EXPECT_EQ(e4(1e9f), 0x7E);                                     // saturation
  EXPECT_EQ(e4(-std::numeric_limits<float>::infinity()), 0xFE);  // -inf -> -max
  EXPECT_EQ(e4(464.0f), 0x7E);                                   // midpoint rounds to even = max
  EXPECT_EQ(e4(std::nanf("")), 0x7F);
  EXPECT_EQ(e4(-std::nanf("")), 0x7F);  // NaN is canonical, sign dropped
  EXPECT_EQ(e4(std::ldexp(1.0f, -10)), 0x00);                    // half the smallest subnormal -> 0
  EXPECT_EQ(e4(std::ldexp(1.1f, -10)), 0x01);                    // just above -> smallest subnormal
  EXPECT_EQ(e4(-0.0f), 0x80);
  EXPECT_EQ(e4(1.0625f), 0x38);  // exactly between 1.0 and 1.125: to even (1.0)
  EXPECT_EQ(e4(1.1875f), 0x3A);  // between 1.125 (odd) and 1.25: to even (1.25)
  EXPECT_EQ(e5(61440.0f), 0x7B);  // CUDA saturates the E5M2 overflow midpoint
  EXPECT_EQ(e5(std::numeric_limits<float>::infinity()), 0x7B);
  EXPECT_EQ(e5(1.0f), 0x3C);
  EXPECT_EQ(e5(std::ldexp(1.0f, -17)), 0x00);
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16_bits(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16_bits(bits_float(0x3F808000u)), 0x3F80);  // tie, even stays
  EXPECT_EQ(float_to_bf16_bits(bits_float(0x3F818000u)), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(float_to_bf16_bits(bits_float(0x3F808001u)), 0x3F81);
  EXPECT_EQ(float_to_bf16_bits(std::nanf("")), 0x7FFF);
  EXPECT_EQ(float_to_bf16_bits(bits_float(0x7F7FFFFFu)), 0x7F80);  // FLT_MAX rounds to inf
  EXPECT_EQ(bf16_bits_to_float(0xC040), -3.0f);
  for (uint32_t b = 0; b < 0x10000; ++b) {  // every non-NaN bf16 value survives a round trip
    const float f = bf16_bits_to_float(static_cast<uint16_t>(b));
    if (!std::isnan(f)) ASSERT_EQ(float_to_bf16_bits(f), b);
  }
}

TEST(Convert, TensorCastOnCpuMatchesScalar) {
  std::vector<float> v = {0.f, 1.f, -3.5f, 1000.f, 1e-7f, std::nanf("")};
  Tensor t = Tensor::from_vector(v, {6});
  Tensor e = t.to(DType::kE4M3);
  for (size_t i = 0; i < v.size(); ++i)
    EXPECT_EQ(e.data<e4m3_t>()[i].bits, float_to_fp8_bits(v[i], Fp8Format::kE4M3));
}

// Random floats spanning every exponent (bits are uniform), plus edge cases.
std::vector<float> conversion_inputs(size_t n) {
  std::vector<float> v;
  v.reserve(n + 64);
  const float inf = std::numeric_limits<float>::infinity();
  for (float f : {0.f, -0.f, inf, -inf, std::nanf(""), -std::nanf(""), 448.f, 464.f, 465.f, 57344.f,
                  61439.f, 61440.f, 1e30f, -1e30f, std::ldexp(1.f, -9), std::ldexp(1.f, -10),
                  std::ldexp(1.5f, -10), std::ldexp(1.f, -16), std::ldexp(1.f, -17),
                  std::ldexp(1.5f, -17), std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), std::numeric_limits<float>::max(), 1.0625f,
                  1.1875f, bits_float(0x3F808000u), bits_float(0x3F818000u)})
    v.push_back(f);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t bits = philox_u32(12345, 0, i);
    // Half the draws scaled into the fp8 range so rounding, not saturation, is exercised.
    v.push_back(i % 2 ? bits_float(bits) : std::ldexp(u32_to_uniform(bits) * 2.f - 1.f, int(bits % 40) - 24));
  }
  return v;
}

TEST(ConvertGpu, CpuEqualsCudaHardwareConversion) {
  HELIX_REQUIRE_CUDA();
  const std::vector<float> v = conversion_inputs(10'000'000);
  Tensor host = Tensor::from_vector(v, {static_cast<int64_t>(v.size())});
  Tensor dev = host.to(Device::cuda());
  for (DType dt : {DType::kBF16, DType::kE4M3, DType::kE5M2}) {
    // The CUDA path of Tensor::to uses the hardware conversions (cvt.rn[.satfinite]).
    Tensor on_gpu = dev.to(dt).to(Device::cpu());
    Tensor on_cpu = host.to(dt);
    const auto* a = static_cast<const uint8_t*>(on_gpu.data_ptr());
    const auto* b = static_cast<const uint8_t*>(on_cpu.data_ptr());
    const size_t es = dtype_size(dt);
    size_t mismatches = 0, first = 0;
    for (size_t i = 0; i < v.size(); ++i) {
      if (std::memcmp(a + i * es, b + i * es, es) != 0 && mismatches++ == 0) first = i;
    }
    EXPECT_EQ(mismatches, 0u) << dtype_name(dt) << ": first mismatch at input " << v[first]
                              << " (bits 0x" << std::hex << float_bits(v[first]) << ")";
    // And back to float.
    Tensor back_gpu = on_gpu.to(Device::cuda()).to(DType::kF32).to(Device::cpu());
    Tensor back_cpu = on_cpu.to(DType::kF32);
    EXPECT_EQ(std::memcmp(back_gpu.data_ptr(), back_cpu.data_ptr(), back_cpu.nbytes()), 0) << dtype_name(dt);
  }
}

}  // namespace
}  // namespace helix
