#pragma once
// Token embedding lookup out[t] = table[ids[t]], with ESM-2's token dropout as Hugging Face's
// EsmEmbeddings applies it (optional): rows of mask tokens are zeroed and every row of a sequence
// is scaled by (1 - 0.15*0.8) / (1 - fraction of that sequence's tokens that are mask tokens).
// Backward accumulates dtable (f32) deterministically without float atomics: token indices are
// radix-sorted by id (stable, so each id's tokens stay in token order), each id's run is cut into
// pieces of at most 128 tokens summed in order, then the pieces of each id are added in order.
#include <cstdint>

#include "core/device.h"
#include "core/tensor.h"

namespace helix {

struct EmbeddingTokenDropout {
  bool enabled = false;
  int32_t mask_token_id = -1;  // required when enabled, in [0, V) (ESM-2's <mask> is 32)
  Tensor cu_seqlens;  // [b+1] i32, required when enabled: the sequences whose masked fraction
                      // scales their rows; tokens past cu_seqlens[b] form one more segment
};

// Forward numerics follow HF in fp32: v = table row value; with token dropout, mask rows are 0 and
// otherwise v = round_to_table_dtype(v * 0.88f) / (1 - float(masked) / float(length)), then rounded
// once to out's dtype. ids outside [0, V): the CPU throws; CUDA (which cannot check without a sync)
// writes a NaN row, which the non-finite checks catch, and never reads out of bounds.
struct EmbeddingFwdParams {
  Tensor ids;    // [T] i32
  Tensor table;  // [V, C] f32 or bf16
  Tensor out;    // [T, C] f32 or bf16
  EmbeddingTokenDropout token_dropout;
};

// dtable[v] += sum over tokens t with ids[t] == v of dout[t] * scale(t), in f32, where scale(t) is
// the forward's factor 0.88f / (1 - masked fraction) (1 without token dropout) and mask tokens add
// nothing (their rows were zeroed). Out-of-range ids add nothing on CUDA and throw on the CPU.
struct EmbeddingBwdParams {
  Tensor ids;                           // [T] i32
  Tensor dout;                          // [T, C] f32 or bf16
  Tensor dtable;                        // [V, C] f32, accumulated (+=)
  EmbeddingTokenDropout token_dropout;  // the forward's
};

// Dispatch on the tensors' device; CUDA work is ordered on `stream`.
void embedding_fwd(const EmbeddingFwdParams& p, const Stream& stream);
void embedding_bwd(const EmbeddingBwdParams& p, const Stream& stream);

// (1 - 0.15 * 0.8) as Hugging Face computes it (a Python double, used as fp32).
inline constexpr float kEsmTokenDropoutKeep = static_cast<float>(1.0 - 0.15 * 0.8);

namespace detail {
void embedding_fwd_cpu(const EmbeddingFwdParams& p);
void embedding_bwd_cpu(const EmbeddingBwdParams& p);
#if HELIX_WITH_CUDA
void embedding_fwd_cuda(const EmbeddingFwdParams& p, const Stream& stream);
void embedding_bwd_cuda(const EmbeddingBwdParams& p, const Stream& stream);
#endif
}  // namespace detail

}  // namespace helix
