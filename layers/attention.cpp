#include "layers/attention.h"

#include <cmath>

#include "kernels/qkv/qkv.h"
#include "kernels/rotary/rotary.h"

namespace helix {

AttentionInputs AttentionInputs::from_batch(const ThdBatch& batch, int heads, int head_dim) {
  AttentionInputs a;
  const Device d = batch.tokens.device();
  const Tensor cu_host = batch.cu_seqlens_host.defined() ? batch.cu_seqlens_host : batch.cu_seqlens.to(Device::cpu());
  const Tensor cup_host =
      batch.cu_seqlens_padded_host.defined() ? batch.cu_seqlens_padded_host : batch.cu_seqlens_padded.to(Device::cpu());
  const std::vector<int32_t> cu = cu_host.to_vector<int32_t>();
  const std::vector<int32_t> cup = cup_host.to_vector<int32_t>();
  a.seqlens.cu_seqlens_q = CuSeqlens::wrap(batch.cu_seqlens, cu_host);
  a.seqlens.cu_seqlens_kv = a.seqlens.cu_seqlens_q;
  if (cu != cup) {
    a.seqlens.cu_seqlens_q_padded = CuSeqlens::wrap(batch.cu_seqlens_padded, cup_host);
    a.seqlens.cu_seqlens_kv_padded = a.seqlens.cu_seqlens_q_padded;
  }
  a.seqlens.max_seqlen_q = a.seqlens.max_seqlen_kv = batch.max_seqlen;
  a.positions = batch.positions;
  a.cu_seqlens_padded = batch.cu_seqlens_padded;
  HELIX_CHECK(batch.cu_seqlens.device() == d, "attention: cu_seqlens on {}, tokens on {}", batch.cu_seqlens.device().str(),
              d.str());
  a.heads = heads;
  a.head_dim = head_dim;
  a.softmax_scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  return a;
}

namespace {
RotaryPositions rotary_positions(const AttentionInputs& in) {
  RotaryPositions p;
  if (in.positions.defined()) p.positions = in.positions;
  else p.cu_seqlens = in.cu_seqlens_padded;
  return p;
}
// The rotary fused into qkv_split (forward) and qkv_join_grad (backward, the inverse rotation).
QkvRotary qkv_rotary(const AttentionInputs& in) { return {.head_dim = in.head_dim, .pos = rotary_positions(in)}; }
}  // namespace

std::vector<Tensor> AttentionNode::forward(const std::vector<Tensor>& in, const Stream& stream) {
  const Tensor& qkv = in[0];
  const int64_t t = qkv.dim(0), h = in_->heads, d = in_->head_dim;
  HELIX_CHECK(qkv.dim(1) == 3 * h * d, "attention: expected qkv [T, {}], got {}", 3 * h * d, qkv.str());
  const Device dev = qkv.device();
  Tensor q = Tensor::empty({t, h, d}, qkv.dtype(), dev, stream);
  Tensor k = Tensor::empty({t, h, d}, qkv.dtype(), dev, stream);
  Tensor v = Tensor::empty({t, h, d}, qkv.dtype(), dev, stream);
  qkv_split({.qkv = qkv, .q = q, .k = k, .v = v, .rotary = qkv_rotary(*in_)}, stream);  // q, k rotated
  ThdAttentionFwdParams p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.layout = in_->seqlens;
  p.softmax_scale = in_->softmax_scale;
  p.o = Tensor::empty({t, h, d}, qkv.dtype(), dev, stream);
  p.lse = Tensor::empty({h, t}, DType::kF32, dev, stream);
  if (in_->cp_plan) {
    cp_attention_fwd(CpAttentionFwdParams{.comm = in_->cp_comm, .plan = in_->cp_plan.get(), .q = q, .k = k,
                                          .v = v, .local = p.layout, .softmax_scale = p.softmax_scale,
                                          .o = p.o, .lse = p.lse},
                     stream);
  } else {
    thd_attention_fwd(p, stream);
  }
  q_ = save(q);
  k_ = save(k);
  v_ = save(v);
  o_ = save(p.o);
  lse_ = save(p.lse);
  return {p.o.view({t, h * d})};
}

void AttentionNode::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) {
  if (!gin[0].defined()) return;
  const Tensor& q = saved(q_);
  const int64_t t = q.dim(0), h = in_->heads, d = in_->head_dim;
  ThdAttentionBwdParams p;
  p.q = q;
  p.k = saved(k_);
  p.v = saved(v_);
  p.o = saved(o_);
  p.d_o = gout[0].view({t, h, d});
  p.lse = saved(lse_);
  p.layout = in_->seqlens;
  p.softmax_scale = in_->softmax_scale;
  p.d_q = Tensor::empty(q.shape(), q.dtype(), q.device(), stream);
  p.d_k = Tensor::empty(q.shape(), q.dtype(), q.device(), stream);
  p.d_v = Tensor::empty(q.shape(), q.dtype(), q.device(), stream);
  if (in_->cp_plan) {
    cp_attention_bwd(CpAttentionBwdParams{.comm = in_->cp_comm, .plan = in_->cp_plan.get(), .q = p.q, .k = p.k,
                                          .v = p.v, .o = p.o, .d_o = p.d_o, .lse = p.lse, .local = p.layout,
                                          .softmax_scale = p.softmax_scale, .mode = p.mode, .d_q = p.d_q,
                                          .d_k = p.d_k, .d_v = p.d_v},
                     stream);
  } else {
    thd_attention_bwd(p, stream);
  }
  qkv_join_grad({.dq = p.d_q.view({t, h * d}), .dk = p.d_k.view({t, h * d}), .dv = p.d_v.view({t, h * d}),
                 .dqkv = gin[0], .rotary = qkv_rotary(*in_)},
                stream);  // dq, dk rotated back
}

}  // namespace helix
