#pragma once
// One masked-LM sample from one protein: a random crop to at most max_residues residues, then
// <cls> crop <eos>, then ESM-2/BERT masking of the residue positions (never <cls>, <eos> or
// padding). All randomness is Philox (core/philox.h) addressed by (seed, epoch, dataset index): the
// key is derived from (seed, epoch, stream), the subsequence is the dataset index, the counter the
// residue position. A sample is therefore a pure function of those numbers, whatever batch it lands
// in.
#include <cstdint>
#include <span>

namespace helix {

// SplitMix64 finaliser (Steele et al.): a bijective 64-bit mixer used to derive Philox keys.
constexpr uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Independent Philox streams of one run: sequence order, crop offsets, masking decisions.
enum class RandomStream : uint64_t { kShuffle = 1, kCrop = 2, kMask = 3 };

// Philox key of (seed, epoch, stream).
uint64_t stream_key(uint64_t seed, int64_t epoch, RandomStream stream);

struct MaskingOptions {
  double select_prob = 0.15;  // share of residue positions that get a label
  double mask_prob = 0.8;     // of the selected: input becomes <mask>
  double random_prob = 0.1;   // of the selected: input becomes a random amino acid (ids 4..23)
  // The remaining selected positions (1 - mask_prob - random_prob = 0.1) keep their input.
};
// Throws unless every probability is in [0, 1] and mask_prob + random_prob <= 1.
void check_masking_options(const MaskingOptions& m);

struct SampleParams {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t index = 0;            // dataset index of the protein (the Philox subsequence)
  int64_t max_residues = 1022;  // crop length; + <cls> and <eos> = 1024 tokens
  MaskingOptions masking;
};

struct CropWindow {
  int64_t start = 0;   // first residue kept
  int64_t length = 0;  // residues kept: min(protein length, max_residues)
};

// Uniform start in [0, length - max_residues] for proteins longer than max_residues, else the
// whole.
CropWindow crop_window(int64_t length, const SampleParams& p);

// Writes the sample of `residues` (one protein, ids 4..30): tokens [n + 2] = <cls> crop' <eos>
// where crop' is the crop with the masking applied, labels [n + 2] = the original id at selected
// positions and kIgnoreLabel elsewhere (always at <cls> and <eos>). Returns n + 2.
int64_t make_sample(std::span<const uint8_t> residues, const SampleParams& p, int32_t* tokens,
                    int32_t* labels);

}  // namespace helix
