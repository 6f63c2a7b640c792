#pragma once
// Internal: one element of any dtype read as / written from a double, shared by the Tensor's CPU
// paths and its CUDA fill/convert kernels (HELIX_HD), so both convert identically.
#include <cstdint>

#include "core/convert.h"
#include "core/dtype.h"

namespace helix::detail {

HELIX_HD double load_element(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF32: return static_cast<const float*>(p)[i];
    case DType::kF64: return static_cast<const double*>(p)[i];
    case DType::kBF16: return static_cast<const bf16_t*>(p)[i].to_float();
    case DType::kE4M3: return static_cast<const e4m3_t*>(p)[i].to_float();
    case DType::kE5M2: return static_cast<const e5m2_t*>(p)[i].to_float();
    case DType::kI32: return static_cast<const int32_t*>(p)[i];
    case DType::kI64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::kU8: return static_cast<const uint8_t*>(p)[i];
  }
  return 0;
}

HELIX_HD void store_element(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::kF64: static_cast<double*>(p)[i] = v; break;
    case DType::kBF16: static_cast<bf16_t*>(p)[i] = bf16_t::from_float(static_cast<float>(v)); break;
    case DType::kE4M3: static_cast<e4m3_t*>(p)[i] = e4m3_t::from_float(static_cast<float>(v)); break;
    case DType::kE5M2: static_cast<e5m2_t*>(p)[i] = e5m2_t::from_float(static_cast<float>(v)); break;
    case DType::kI32: static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case DType::kI64: static_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); break;
    case DType::kU8: static_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
  }
}

}  // namespace helix::detail
