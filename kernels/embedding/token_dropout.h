#pragma once
// ESM-2 token dropout arithmetic shared by the CPU reference and the CUDA kernels, in the op order
// of Hugging Face's EsmEmbeddings (fp32): embeddings * 0.88 (in the embedding dtype), then divided
// by (1 - masked / length) as an fp32 tensor.
#include <cstdint>

#include "kernels/common/elem.h"
#include "kernels/embedding/embedding.h"

namespace helix::token_dropout {

// 1 - fraction of mask tokens in a segment of `length` tokens (NaN for an empty segment: no rows).
HELIX_HD float denom(int64_t masked, int64_t length) {
  return 1.f - static_cast<float>(masked) / static_cast<float>(length);
}

// A kept row element v of a table of type W: HF multiplies in W (rounding there), divides in fp32.
template <typename W>
HELIX_HD float apply(float v, float d) {
  return elem::to_float(elem::from_float<W>(v * kEsmTokenDropoutKeep)) / d;
}

// d out / d table for a kept row.
HELIX_HD float grad_scale(float d) { return kEsmTokenDropoutKeep / d; }

}  // namespace helix::token_dropout
