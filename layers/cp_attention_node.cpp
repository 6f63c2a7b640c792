#include "layers/cp_attention_node.h"

#include "kernels/axpy/axpy.h"

namespace helix {

CpTakeRowsNode::CpTakeRowsNode(const CpLayout& layout, int64_t rows) : rows_(rows) {
  const std::vector<int64_t>& g = layout.global_row;
  HELIX_CHECK(rows >= static_cast<int64_t>(g.size()),
              "cp_take_rows: expected at least the layout's {} rows, got {}", g.size(), rows);
  for (size_t j = 0; j < g.size(); ++j) {
    if (g[j] < 0) continue;
    if (!runs_.empty() && runs_.back().local + runs_.back().len == static_cast<int64_t>(j) &&
        runs_.back().global + runs_.back().len == g[j]) {
      ++runs_.back().len;
    } else {
      runs_.push_back({static_cast<int64_t>(j), g[j], 1});
    }
  }
}

std::vector<Tensor> CpTakeRowsNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor& x = in[0];
  HELIX_CHECK(x.ndim() == 2, "cp_take_rows: expected x [T, C], got {}", x.str());
  Tensor out = Tensor::zeros({rows_, x.dim(1)}, x.dtype(), x.device(), stream);
  for (const Run& r : runs_) {
    HELIX_CHECK(r.global + r.len <= x.dim(0), "cp_take_rows: global row {} outside x {}",
                r.global + r.len - 1, x.str());
    Tensor dst = out.slice(r.local, r.local + r.len);
    dst.copy_from(x.slice(r.global, r.global + r.len), stream);
  }
  return {out};
}

void CpTakeRowsNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                              const Stream& stream) {
  if (!gin[0].defined() || !gout[0].defined()) return;
  for (const Run& r : runs_)
    axpy(1.0f, gout[0].slice(r.local, r.local + r.len), gin[0].slice(r.global, r.global + r.len),
         stream);
}

std::shared_ptr<const AttentionInputs> cp_attention_inputs(AttentionInputs base,
                                                           const CpBatch& batch, Communicator& comm,
                                                           CpComm mode) {
  base.cp_plan =
      make_cp_attention_plan(batch.layouts, batch.rank, mode, batch.local.tokens.device());
  base.cp_comm = &comm;
  return std::make_shared<const AttentionInputs>(std::move(base));
}

}  // namespace helix
