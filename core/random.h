#pragma once
// Random fills of tensors from the Philox stream (seed, subsequence): element i draws philox_u32(i)
// (uniform) or a Box-Muller pair from block i/2 (normal). The uniform fill is bit-identical on the
// CPU and the GPU; the normal fill agrees to float rounding (log/cos differ in the last ulp).
#include <cstdint>

#include "core/tensor.h"

namespace helix {

// Values uniform in [lo, hi), written into a float tensor (f32, bf16, f64) on any device.
void fill_uniform(Tensor& t, uint64_t seed, uint64_t subsequence, float lo, float hi,
                  const Stream& stream = Stream());
// Normal(mean, std) values.
void fill_normal(Tensor& t, uint64_t seed, uint64_t subsequence, float mean, float std,
                 const Stream& stream = Stream());

namespace detail {
void cuda_fill_random(Tensor& t, uint64_t seed, uint64_t subsequence, float a, float b, bool normal,
                      void* stream);
}

}  // namespace helix
