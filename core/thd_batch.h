#pragma once
// A packed (THD) batch as every layer of helix sees it: `b` sequences of lengths s_i laid back to
// back, T = cu_seqlens_padded[b] tokens. The data pipeline builds it, context parallelism shards it,
// the model consumes it. Sequence i occupies tokens [cu_seqlens_padded[i], cu_seqlens_padded[i] + s_i);
// the rest of its padded slot holds <pad> with label -100.
#include <cstdint>

#include "core/tensor.h"

namespace helix {

struct ThdBatch {
  Tensor tokens;             // i32 [T]
  Tensor labels;             // i32 [T]: target id at masked positions, -100 elsewhere
  Tensor cu_seqlens;         // i32 [b+1] cumulative real lengths
  Tensor cu_seqlens_padded;  // i32 [b+1] cumulative padded lengths (== cu_seqlens without padding)
  Tensor positions;          // i32 [T] optional: rotary position of each token (context parallelism
                             // gives global positions); undefined = derived from cu_seqlens_padded
  Tensor cu_seqlens_host;         // i32 [b+1] CPU copies, for launchers that validate on the host
  Tensor cu_seqlens_padded_host;  // i32 [b+1]
  int32_t max_seqlen = 0;         // max s_i
  int64_t num_tokens = 0;         // real tokens, sum of s_i
  int64_t num_labels = 0;         // tokens with a label

  int64_t total_tokens() const { return tokens.defined() ? tokens.numel() : 0; }
  int64_t num_sequences() const { return cu_seqlens.defined() ? cu_seqlens.numel() - 1 : 0; }
  // The batch on `device` (host copies stay on the CPU).
  ThdBatch to(Device device) const;
};

inline ThdBatch ThdBatch::to(Device device) const {
  ThdBatch b = *this;
  const auto move = [&](const Tensor& t) { return t.defined() ? t.to(device) : t; };
  b.tokens = move(tokens);
  b.labels = move(labels);
  b.cu_seqlens = move(cu_seqlens);
  b.cu_seqlens_padded = move(cu_seqlens_padded);
  b.positions = move(positions);
  if (!b.cu_seqlens_host.defined()) b.cu_seqlens_host = cu_seqlens.to(Device::cpu());
  if (!b.cu_seqlens_padded_host.defined()) b.cu_seqlens_padded_host = cu_seqlens_padded.to(Device::cpu());
  return b;
}

}  // namespace helix
