#pragma once
// Launcher-side validation shared by the ops: every message names the op and the input and reads
// "expected X, got Y". Kernels assume what these check.
#include <cstdint>
#include <initializer_list>
#include <utility>

#include "core/tensor.h"

namespace helix::checks {

using NamedTensors = std::initializer_list<std::pair<const Tensor*, const char*>>;

// Every defined tensor lives on ref's device and is contiguous.
inline void same_device_contiguous(const char* op, const Tensor& ref, NamedTensors tensors) {
  for (const auto& [t, name] : tensors) {
    if (!t->defined()) continue;
    HELIX_CHECK(t->device() == ref.device(), "{}: expected {} on {}, got {}", op, name,
                ref.device().str(), t->str());
    HELIX_CHECK(t->is_contiguous(), "{}: expected {} contiguous, got {}", op, name, t->str());
  }
}

inline void shape_dtype(const char* op, const Tensor& t, const char* name, const Shape& shape,
                        DType dtype) {
  HELIX_CHECK(t.defined(), "{}: expected {} {} {}, got undefined", op, name, dtype_name(dtype),
              shape.str());
  HELIX_CHECK(t.shape() == shape && t.dtype() == dtype, "{}: expected {} {} {}, got {}", op, name,
              dtype_name(dtype), shape.str(), t.str());
}

// True when t is undefined or its data starts on a multiple of `bytes` (vectorised access).
inline bool aligned_to(const Tensor& t, size_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

}  // namespace helix::checks
