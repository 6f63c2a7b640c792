#include "layers/embedding.h"

#include "kernels/axpy/axpy.h"
#include "kernels/embedding/embedding.h"

namespace helix {
namespace {
EmbeddingTokenDropout dropout_of(const EmbeddingOptions& o, const Tensor& cu) {
  EmbeddingTokenDropout d;
  d.enabled = o.token_dropout;
  if (o.token_dropout) {
    // Vocabulary parallel: <mask> maps to the extended table's last row on every rank.
    d.mask_token_id = o.vocab_rows > 0 ? static_cast<int32_t>(o.vocab_rows + 1) : o.mask_token_id;
    d.cu_seqlens = cu;
  }
  return d;
}
}  // namespace

EmbeddingNode::EmbeddingNode(const ThdBatch& batch, EmbeddingOptions opts, DType compute)
    : ids_(batch.tokens), cu_seqlens_(batch.cu_seqlens_padded), opts_(opts), compute_(compute) {
  if (opts_.vocab_rows <= 0) return;
  // Local ids: [0, rows) for this rank's rows, rows for foreign ids (a zero row), rows + 1 for
  // <mask> under token dropout (a zero row, counted as masked by the kernel).
  std::vector<int32_t> ids = batch.tokens.to(Device::cpu()).to_vector<int32_t>();
  const int64_t lo = opts_.vocab_start, rows = opts_.vocab_rows;
  for (int32_t& id : ids) {
    if (opts_.token_dropout && id == opts_.mask_token_id) {
      id = static_cast<int32_t>(rows + 1);
    } else {
      id = id >= lo && id < lo + rows ? static_cast<int32_t>(id - lo) : static_cast<int32_t>(rows);
    }
  }
  ids_ = Tensor::from_vector<int32_t>(ids, batch.tokens.shape()).to(batch.tokens.device());
}

std::vector<Tensor> EmbeddingNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  Tensor table = in[0];
  if (opts_.vocab_rows > 0) {
    HELIX_CHECK(table.dim(0) == opts_.vocab_rows, "embedding: expected a table shard of {} rows, got {}",
                opts_.vocab_rows, table.str());
    Tensor ext = Tensor::zeros({table.dim(0) + 2, table.dim(1)}, table.dtype(), table.device(), stream);
    Tensor head = ext.slice(0, table.dim(0));
    head.copy_from(table, stream);
    table = ext;
  }
  Tensor out = Tensor::empty({ids_.numel(), table.dim(1)}, compute_, table.device(), stream);
  embedding_fwd(EmbeddingFwdParams{.ids = ids_, .table = table, .out = out,
                                   .token_dropout = dropout_of(opts_, cu_seqlens_)},
                stream);
  return {out};
}

void EmbeddingNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  if (!gin[0].defined()) return;
  if (opts_.vocab_rows <= 0) {
    embedding_bwd(EmbeddingBwdParams{.ids = ids_, .dout = gout[0], .dtable = gin[0],
                                     .token_dropout = dropout_of(opts_, cu_seqlens_)},
                  stream);
    return;
  }
  const int64_t rows = gin[0].dim(0);
  Tensor ext = Tensor::zeros({rows + 2, gin[0].dim(1)}, DType::kF32, gin[0].device(), stream);
  embedding_bwd(EmbeddingBwdParams{.ids = ids_, .dout = gout[0], .dtable = ext,
                                   .token_dropout = dropout_of(opts_, cu_seqlens_)},
                stream);
  axpy(1.0f, ext.slice(0, rows), gin[0], stream);
}

}  // namespace helix
