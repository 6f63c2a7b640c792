#include "launch/data/sample.h"

#include "core/error.h"
#include "core/philox.h"
#include "launch/data/tokenizer.h"

namespace helix {
namespace {

// x * n / 2^32: an index in [0, n) from 32 random bits (bias below n / 2^32, negligible here).
uint64_t scale_u32(uint32_t x, uint64_t n) { return (static_cast<uint64_t>(x) * n) >> 32; }

}  // namespace

uint64_t stream_key(uint64_t seed, int64_t epoch, RandomStream stream) {
  const uint64_t s = splitmix64(seed ^ (static_cast<uint64_t>(stream) * 0xD1B54A32D192ED03ull));
  return splitmix64(s ^ static_cast<uint64_t>(epoch));
}

void check_masking_options(const MaskingOptions& m) {
  auto in01 = [](double p) { return p >= 0.0 && p <= 1.0; };
  HELIX_CHECK(in01(m.select_prob) && in01(m.mask_prob) && in01(m.random_prob) &&
                  m.mask_prob + m.random_prob <= 1.0 + 1e-12,
              "masking: expected probabilities in [0, 1] with mask + random <= 1, got select {}, "
              "mask {}, random {}",
              m.select_prob, m.mask_prob, m.random_prob);
}

CropWindow crop_window(int64_t length, const SampleParams& p) {
  HELIX_CHECK(p.max_residues >= 1, "crop: expected max_residues >= 1, got {}", p.max_residues);
  if (length <= p.max_residues) return {0, length};
  const uint64_t key = stream_key(p.seed, p.epoch, RandomStream::kCrop);
  const uint32_t r = philox_block(key, static_cast<uint64_t>(p.index), 0).v[0];
  const auto starts = static_cast<uint64_t>(length - p.max_residues + 1);
  return {static_cast<int64_t>(scale_u32(r, starts)), p.max_residues};
}

int64_t make_sample(std::span<const uint8_t> residues, const SampleParams& p, int32_t* tokens,
                    int32_t* labels) {
  const CropWindow w = crop_window(static_cast<int64_t>(residues.size()), p);
  const uint64_t key = stream_key(p.seed, p.epoch, RandomStream::kMask);
  const MaskingOptions& m = p.masking;
  tokens[0] = kEsmClsId;
  labels[0] = kIgnoreLabel;
  for (int64_t j = 0; j < w.length; ++j) {
    const int64_t pos = w.start + j;  // position in the whole protein: masks do not move with crops
    const int32_t original = residues[static_cast<size_t>(pos)];
    // Word 0 selects, word 1 picks the replacement kind, word 2 the random amino acid.
    const U32x4 r = philox_block(key, static_cast<uint64_t>(p.index), static_cast<uint64_t>(pos));
    int32_t token = original, label = kIgnoreLabel;
    if (u32_to_uniform(r.v[0]) < m.select_prob) {
      label = original;
      const double action = u32_to_uniform(r.v[1]);
      if (action < m.mask_prob) {
        token = kEsmMaskId;
      } else if (action < m.mask_prob + m.random_prob) {
        token = kEsmFirstStandardId + static_cast<int32_t>(scale_u32(r.v[2], kEsmNumStandard));
      }
    }
    tokens[j + 1] = token;
    labels[j + 1] = label;
  }
  tokens[w.length + 1] = kEsmEosId;
  labels[w.length + 1] = kIgnoreLabel;
  return w.length + 2;
}

}  // namespace helix
