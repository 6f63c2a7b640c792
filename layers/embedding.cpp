#include "layers/embedding.h"

#include "kernels/embedding/embedding.h"

namespace helix {
namespace {
EmbeddingTokenDropout dropout_of(const EmbeddingOptions& o, const Tensor& cu) {
  EmbeddingTokenDropout d;
  d.enabled = o.token_dropout;
  if (o.token_dropout) {
    d.mask_token_id = o.mask_token_id;
    d.cu_seqlens = cu;
  }
  return d;
}
}  // namespace

std::vector<Tensor> EmbeddingNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor& table = in[0];
  Tensor out = Tensor::empty({ids_.numel(), table.dim(1)}, compute_, table.device(), stream);
  embedding_fwd(EmbeddingFwdParams{.ids = ids_, .table = table, .out = out,
                                   .token_dropout = dropout_of(opts_, cu_seqlens_)},
                stream);
  return {out};
}

void EmbeddingNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  if (!gin[0].defined()) return;
  embedding_bwd(EmbeddingBwdParams{.ids = ids_, .dout = gout[0], .dtable = gin[0],
                                   .token_dropout = dropout_of(opts_, cu_seqlens_)},
                stream);
}

}  // namespace helix
