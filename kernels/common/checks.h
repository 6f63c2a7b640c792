#pragma once
// Launcher-side validation shared by the ops: every message names the op and the input and reads
// "expected X, got Y". Kernels assume what these check.
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

}  // namespace helix::checks
