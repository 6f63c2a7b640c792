#pragma once
// Token embedding of a packed batch as a node, with ESM-2's token dropout (mask rows zeroed, each
// sequence rescaled by 0.88 / (1 - its masked fraction), as Hugging Face's EsmEmbeddings does).
// Under padded layouts a sequence's padded slot counts as its length for the masked fraction.
// Vocabulary parallel (EmbeddingOptions::vocab_rows > 0): the table is this rank's rows
// [vocab_start, vocab_start + vocab_rows); ids outside give zero rows (the TP all-reduce after the
// node sums the ranks' rows) and backward accumulates only the local rows. The ids are remapped on
// the host once per batch into an extended table [rows + 2, H] whose last two rows are zero: one for
// foreign ids and one for <mask>, so every rank counts the masked fraction of token dropout alike.
#include "core/autograd.h"
#include "core/thd_batch.h"

namespace helix {

struct EmbeddingOptions {
  bool token_dropout = true;
  int32_t mask_token_id = 32;
  int64_t vocab_start = 0;  // vocabulary parallel: first global id of the local table rows
  int64_t vocab_rows = 0;   // vocabulary parallel: local table rows (0 = the whole table, no remap)
};

// Inputs: table [V, H]. Output: [T, H] in `compute` dtype. Token ids come from the batch.
class EmbeddingNode final : public Node {
 public:
  EmbeddingNode(const ThdBatch& batch, EmbeddingOptions opts, DType compute);
  std::string name() const override { return "embedding"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  Tensor ids_;         // i32 [T] (vocabulary parallel: local ids into the extended table)
  Tensor cu_seqlens_;  // i32 [b+1] padded offsets
  EmbeddingOptions opts_;
  DType compute_;
};

}  // namespace helix
