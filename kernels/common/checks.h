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

// Values of a CPU cu_seqlens [b+1] i32 for T tokens: 0 = cu[0] <= cu[1] <= ... <= cu[b] <= T.
// (CUDA tensors are not read: that would synchronise the stream.)
inline void cu_seqlens_values(const char* op, const Tensor& cu_seqlens, int64_t T) {
  if (!cu_seqlens.is_cpu()) return;
  const int32_t* cu = cu_seqlens.data<int32_t>();
  const int64_t b = cu_seqlens.numel() - 1;
  HELIX_CHECK(cu[0] == 0, "{}: expected cu_seqlens[0] == 0, got {}", op, cu[0]);
  for (int64_t i = 0; i < b; ++i)
    HELIX_CHECK(cu[i] <= cu[i + 1],
                "{}: expected non-decreasing cu_seqlens, got cu_seqlens[{}] = {} > "
                "cu_seqlens[{}] = {}",
                op, i, cu[i], i + 1, cu[i + 1]);
  HELIX_CHECK(cu[b] <= T, "{}: expected cu_seqlens[b] <= T = {}, got {}", op, T, cu[b]);
}

// True when t is undefined or its data starts on a multiple of `bytes` (vectorised access).
inline bool aligned_to(const Tensor& t, size_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

}  // namespace helix::checks
