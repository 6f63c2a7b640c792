#pragma once
// Context parallelism in the model graph: the pieces Esm2Model inserts when it runs a CP shard.
// The embedding runs on the GLOBAL micro-batch (ESM-2's token dropout rescales each sequence by its
// masked fraction, a whole-sequence statistic) and CpTakeRowsNode keeps the rank's rows; attention
// gets the batch's K/V exchange plan (cp_attention_inputs). Everything else is per token.
#include <memory>

#include "core/autograd.h"
#include "layers/attention.h"
#include "parallel/cp_attention.h"

namespace helix {

// Input: x [T_global, C]. Output: [rows, C] = x at the rank's global rows (CpLayout::global_row);
// rows the shard added as padding (-1) and rows past the layout (sequence-parallel padding) are
// zero. Backward adds the rows' gradients back at their global rows.
class CpTakeRowsNode final : public Node {
 public:
  CpTakeRowsNode(const CpLayout& layout, int64_t rows);
  std::string name() const override { return "cp_take_rows"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                const Stream& stream) override;

 private:
  struct Run {
    int64_t local = 0, global = 0, len = 0;
  };
  std::vector<Run> runs_;  // contiguous stretches of consecutive global rows
  int64_t rows_ = 0;
};

// `base` (from the rank's batch) with the CP plan of `batch` on the cp group `comm`.
std::shared_ptr<const AttentionInputs> cp_attention_inputs(AttentionInputs base,
                                                           const CpBatch& batch, Communicator& comm,
                                                           CpComm mode);

}  // namespace helix
