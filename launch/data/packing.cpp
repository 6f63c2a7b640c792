#include "launch/data/packing.h"

#include <algorithm>
#include <limits>

#include "core/error.h"
#include "launch/data/tokenizer.h"

namespace helix {

void check_packing_options(const PackingOptions& p) {
  HELIX_CHECK(p.max_residues >= 1, "packing: expected max_residues >= 1, got {}", p.max_residues);
  HELIX_CHECK(p.pad_to_multiple >= 1, "packing: expected pad_to_multiple >= 1, got {}",
              p.pad_to_multiple);
  HELIX_CHECK(p.tokens_per_batch >= 3 && p.tokens_per_batch <= std::numeric_limits<int32_t>::max(),
              "packing: expected --tokens-per-batch in [3, 2^31), got {}", p.tokens_per_batch);
}

int64_t sample_tokens(int64_t length, int64_t max_residues) {
  return std::min(length, max_residues) + 2;
}

int64_t padded_tokens(int64_t tokens, int64_t multiple) {
  return (tokens + multiple - 1) / multiple * multiple;
}

std::vector<BatchRange> plan_batches(const ProteinDataset& data, std::span<const int64_t> order,
                                     const PackingOptions& opt) {
  check_packing_options(opt);
  std::vector<BatchRange> batches;
  int64_t used = 0;
  for (size_t k = 0; k < order.size(); ++k) {
    const int64_t i = order[k];
    const int64_t s = sample_tokens(data.length(i), opt.max_residues);
    const int64_t need = padded_tokens(s, opt.pad_to_multiple);
    HELIX_CHECK(
        need <= opt.tokens_per_batch,
        "packing: protein {} needs {} tokens (min({} residues, max_residues {}) + <cls> + <eos>, "
        "padded to a multiple of {}), expected at most --tokens-per-batch {}",
        i, need, data.length(i), opt.max_residues, opt.pad_to_multiple, opt.tokens_per_batch);
    if (batches.empty() || used + need > opt.tokens_per_batch) {
      batches.push_back({static_cast<int64_t>(k), static_cast<int64_t>(k)});
      used = 0;
    }
    batches.back().end = static_cast<int64_t>(k) + 1;
    used += need;
  }
  return batches;
}

PackedBatch pack_batch(const ProteinDataset& data, std::span<const int64_t> indices,
                       const PackParams& p) {
  check_packing_options(p.packing);
  check_masking_options(p.masking);
  HELIX_CHECK(!indices.empty(), "pack_batch: expected at least one protein, got none");
  const auto b = static_cast<int64_t>(indices.size());
  PackedBatch out;
  out.indices.assign(indices.begin(), indices.end());
  out.epoch = p.epoch;
  std::vector<int32_t> cu(static_cast<size_t>(b + 1), 0), cu_pad(static_cast<size_t>(b + 1), 0);
  for (int64_t k = 0; k < b; ++k) {
    const int64_t i = indices[static_cast<size_t>(k)];
    HELIX_CHECK(i >= 0 && i < data.size(),
                "pack_batch: expected dataset indices in [0, {}), got {}", data.size(), i);
    const int64_t s = sample_tokens(data.length(i), p.packing.max_residues);
    const int64_t sp = padded_tokens(s, p.packing.pad_to_multiple);
    cu[static_cast<size_t>(k + 1)] = cu[static_cast<size_t>(k)] + static_cast<int32_t>(s);
    cu_pad[static_cast<size_t>(k + 1)] = cu_pad[static_cast<size_t>(k)] + static_cast<int32_t>(sp);
    out.max_seqlen = std::max(out.max_seqlen, static_cast<int32_t>(s));
    out.max_seqlen_padded = std::max(out.max_seqlen_padded, static_cast<int32_t>(sp));
  }
  const int64_t t = cu_pad.back();
  HELIX_CHECK(t <= p.packing.tokens_per_batch,
              "pack_batch: {} proteins need {} tokens, expected at most --tokens-per-batch {}", b,
              t, p.packing.tokens_per_batch);
  out.tokens = Tensor::empty({t}, DType::kI32);
  out.labels = Tensor::empty({t}, DType::kI32);
  int32_t* tok = out.tokens.data<int32_t>();
  int32_t* lab = out.labels.data<int32_t>();
  std::fill(tok, tok + t, kEsmPadId);
  std::fill(lab, lab + t, kIgnoreLabel);
  SampleParams sp{p.seed, p.epoch, 0, p.packing.max_residues, p.masking};
  for (int64_t k = 0; k < b; ++k) {
    sp.index = indices[static_cast<size_t>(k)];
    const int64_t off = cu_pad[static_cast<size_t>(k)];
    make_sample(data.residues(sp.index), sp, tok + off, lab + off);
  }
  out.num_tokens = cu.back();
  out.num_labels = std::count_if(lab, lab + t, [](int32_t l) { return l != kIgnoreLabel; });
  out.cu_seqlens = Tensor::from_vector(cu, {b + 1});
  out.cu_seqlens_padded = Tensor::from_vector(cu_pad, {b + 1});
  return out;
}

ThdBatch to_thd_batch(const PackedBatch& b, Device device) {
  ThdBatch t;
  t.tokens = b.tokens;
  t.labels = b.labels;
  t.cu_seqlens = b.cu_seqlens;
  t.cu_seqlens_padded = b.cu_seqlens_padded;
  t.max_seqlen = b.max_seqlen;
  t.num_tokens = b.num_tokens;
  t.num_labels = b.num_labels;
  return t.to(device);
}

}  // namespace helix
