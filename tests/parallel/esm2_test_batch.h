#pragma once
// A synthetic packed ESM-2 batch for the parallel equivalence tests: sequences of the given lengths
// (<cls> ... <eos>), random residues, `mask_percent`% of the inner positions labelled (80% of those
// turned into <mask>), from a small LCG seeded by `seed` so every rank builds the same batch.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/thd_batch.h"
#include "layers/model_config.h"

namespace helix::testing {

// The tiny ESM-2 the parallel equivalence tests train: hidden 64, 4 heads (tp up to 4), FFN 128.
inline ModelConfig tiny_esm2_config(int layers = 2) {
  ModelConfig c;
  c.name = "tiny";
  c.layers = layers;
  c.hidden = 64;
  c.heads = 4;
  c.ffn = 128;
  return c;
}

inline ThdBatch synthetic_esm2_batch(const std::vector<int>& lens, uint64_t seed, int mask_percent, Device device) {
  uint64_t s = seed;
  const auto next = [&s](int n) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<int>((s >> 33) % static_cast<uint64_t>(n));
  };
  std::vector<int32_t> tokens, labels, cu{0};
  for (int len : lens) {
    for (int i = 0; i < len; ++i) {
      int32_t tok = 4 + next(20);
      int32_t lab = -100;
      if (i > 0 && i + 1 < len && next(100) < mask_percent) {
        lab = tok;
        if (next(10) < 8) tok = 32;  // <mask>
      }
      tokens.push_back(i == 0 ? 0 : i + 1 == len ? 2 : tok);
      labels.push_back(i == 0 || i + 1 == len ? -100 : lab);
    }
    cu.push_back(cu.back() + len);
  }
  ThdBatch b;
  const int64_t t = static_cast<int64_t>(tokens.size());
  b.tokens = Tensor::from_vector<int32_t>(tokens, Shape{t});
  b.labels = Tensor::from_vector<int32_t>(labels, Shape{t});
  b.cu_seqlens = Tensor::from_vector<int32_t>(cu, Shape{static_cast<int64_t>(cu.size())});
  b.cu_seqlens_padded = b.cu_seqlens.clone();
  b.max_seqlen = *std::max_element(lens.begin(), lens.end());
  b.num_tokens = t;
  b.num_labels = std::count_if(labels.begin(), labels.end(), [](int32_t l) { return l != -100; });
  return b.to(device);
}

}  // namespace helix::testing
