#pragma once
// Rotary self-attention over a packed batch as one node: the [T, 3H] output of the fused QKV
// projection is split into q, k, v [T, heads, D], q and k are rotated (positions restart in every
// sequence, or come from the batch under context parallelism), and THD attention gives [T, H].
// Saved for backward: rotated q and k, v, the output and its log-sum-exp. Under context parallelism
// (AttentionInputs::cp_plan set) the attention itself is parallel/cp_attention.h's.
#include "core/autograd.h"
#include "core/thd_batch.h"
#include "kernels/attention/attention.h"
#include "parallel/cp_attention.h"

namespace helix {

// What every attention node of one batch shares (built once per batch, not per layer).
struct AttentionInputs {
  ThdAttentionLayout seqlens;  // cu_seqlens (host + device), padded offsets, max lengths
  Tensor positions;          // i32 [T] explicit rotary positions, or undefined
  Tensor cu_seqlens_padded;  // i32 [b+1] on the device: rotary positions restart at each slot
  int heads = 0;
  int head_dim = 0;
  float softmax_scale = 0.f;
  // Context parallelism: the batch's K/V exchange plan and the cp group (null: local attention).
  std::shared_ptr<const CpAttentionPlan> cp_plan;
  Communicator* cp_comm = nullptr;

  static AttentionInputs from_batch(const ThdBatch& batch, int heads, int head_dim);
};

// Inputs: qkv [T, 3H]. Output: [T, H].
class AttentionNode final : public Node {
 public:
  explicit AttentionNode(std::shared_ptr<const AttentionInputs> in) : in_(std::move(in)) {}
  std::string name() const override { return "thd_attention"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override;

 private:
  std::shared_ptr<const AttentionInputs> in_;  // shared by the attention nodes of one batch
  int q_ = -1, k_ = -1, v_ = -1, o_ = -1, lse_ = -1;
};

}  // namespace helix
