#pragma once
// DType: the element types helix stores. f32/bf16 compute, fp8 (OCP E4M3 / E5M2) for FP8 GEMMs,
// i32/i64/u8 for indices and masks, f64 for CPU-only reference math (fp64 gradient checks).
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace helix {

enum class DType : uint8_t { kF32, kBF16, kE4M3, kE5M2, kI32, kI64, kU8, kF64 };

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kE4M3: return 1;
    case DType::kE5M2: return 1;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
    case DType::kF64: return 8;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "f32";
    case DType::kBF16: return "bf16";
    case DType::kE4M3: return "e4m3";
    case DType::kE5M2: return "e5m2";
    case DType::kI32: return "i32";
    case DType::kI64: return "i64";
    case DType::kU8: return "u8";
    case DType::kF64: return "f64";
  }
  return "?";
}

constexpr bool dtype_is_float(DType t) {
  return t == DType::kF32 || t == DType::kBF16 || t == DType::kE4M3 || t == DType::kE5M2 ||
         t == DType::kF64;
}
constexpr bool dtype_is_fp8(DType t) { return t == DType::kE4M3 || t == DType::kE5M2; }

// Largest finite value of a floating type (fp8 scales are fp8_max / amax).
constexpr double dtype_max(DType t) {
  switch (t) {
    case DType::kE4M3: return 448.0;
    case DType::kE5M2: return 57344.0;
    case DType::kBF16: return 3.3895313892515355e38;
    case DType::kF32: return 3.4028234663852886e38;
    default: return 0.0;
  }
}

}  // namespace helix
