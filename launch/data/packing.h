#pragma once
// THD packing: whole samples (<cls> crop <eos>) laid back to back into one micro-batch of at most
// tokens_per_batch tokens. Each sample may be padded to a multiple (CP needs 2*cp, FP8 GEMMs 16);
// the budget counts padded tokens because padding occupies memory and compute. Batches are cut
// greedily in the given order: a sample that does not fit starts the next batch, never split.
#include <cstdint>
#include <span>
#include <vector>

#include "core/tensor.h"
#include "core/thd_batch.h"
#include "launch/data/dataset.h"
#include "launch/data/sample.h"

namespace helix {

struct PackingOptions {
  int64_t tokens_per_batch = 16384;  // budget of one micro-batch, in padded tokens
  int32_t pad_to_multiple = 1;       // each sample padded to a multiple of this (1 = no padding)
  int64_t max_residues = 1022;       // crop length; a sample holds at most max_residues + 2 tokens
};
// Throws (naming the option) unless the budget, multiple and crop length are positive.
void check_packing_options(const PackingOptions& p);

// Tokens of the sample of a protein of `length` residues: min(length, max_residues) + 2.
int64_t sample_tokens(int64_t length, int64_t max_residues);
// `tokens` rounded up to a multiple of `multiple`.
int64_t padded_tokens(int64_t tokens, int64_t multiple);

// One micro-batch in THD layout. Sample i occupies tokens [cu_seqlens_padded[i],
// cu_seqlens_padded[i] + s_i) with s_i = cu_seqlens[i+1] - cu_seqlens[i]; the rest of its padded
// slot holds <pad> with label kIgnoreLabel (Transformer Engine's convention for padded THD).
struct PackedBatch {
  Tensor tokens;             // i32 [T], T = cu_seqlens_padded[b]
  Tensor labels;             // i32 [T], original id at masked positions, kIgnoreLabel elsewhere
  Tensor cu_seqlens;         // i32 [b+1], cumulative real lengths s_i (cls + residues + eos)
  Tensor cu_seqlens_padded;  // i32 [b+1], cumulative padded lengths (equal to cu_seqlens without
                             // padding)
  int32_t max_seqlen = 0;    // max s_i
  int32_t max_seqlen_padded = 0;  // max padded s_i
  int64_t num_tokens = 0;         // real tokens, sum of s_i (= cu_seqlens[b])
  int64_t num_labels = 0;         // positions with a label (!= kIgnoreLabel)
  std::vector<int64_t> indices;   // [b] dataset index of each sample
  int64_t epoch = 0;              // epoch whose randomness made the batch
  int64_t global_index = -1;      // position of the batch in its epoch's plan (-1: built directly)
};

struct BatchRange {
  int64_t begin = 0, end = 0;  // [begin, end) into an order of dataset indices
};

// Cuts `order` (dataset indices) into consecutive batches within the budget. Throws, naming
// --tokens-per-batch, when one sample alone needs more than the budget even after the crop.
std::vector<BatchRange> plan_batches(const ProteinDataset& data, std::span<const int64_t> order,
                                     const PackingOptions& opt);

struct PackParams {
  uint64_t seed = 0;
  int64_t epoch = 0;
  PackingOptions packing;
  MaskingOptions masking;
};

// Builds the batch of the given proteins (in this order) on the CPU. Pure: the same dataset,
// indices and params give the same tensors.
PackedBatch pack_batch(const ProteinDataset& data, std::span<const int64_t> indices,
                       const PackParams& p);

// The packed batch as the model's ThdBatch on `device` (host copies of cu_seqlens kept).
ThdBatch to_thd_batch(const PackedBatch& b, Device device);

}  // namespace helix
