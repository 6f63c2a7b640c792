#pragma once
// Token embedding of a packed batch as a node, with ESM-2's token dropout (mask rows zeroed, each
// sequence rescaled by 0.88 / (1 - its masked fraction), as Hugging Face's EsmEmbeddings does).
// Under padded layouts a sequence's padded slot counts as its length for the masked fraction.
#include "core/autograd.h"
#include "core/thd_batch.h"

namespace helix {

struct EmbeddingOptions {
  bool token_dropout = true;
  int32_t mask_token_id = 32;
};

// Inputs: table [V, H]. Output: [T, H] in `compute` dtype. Token ids come from the batch.
class EmbeddingNode final : public Node {
 public:
  EmbeddingNode(const ThdBatch& batch, EmbeddingOptions opts, DType compute)
      : ids_(batch.tokens), cu_seqlens_(batch.cu_seqlens_padded), opts_(opts), compute_(compute) {}
  std::string name() const override { return "embedding"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  Tensor ids_;         // i32 [T]
  Tensor cu_seqlens_;  // i32 [b+1] padded offsets
  EmbeddingOptions opts_;
  DType compute_;
};

}  // namespace helix
