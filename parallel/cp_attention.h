#pragma once
// Attention under context parallelism over packed THD, forward and backward. Each rank holds the
// queries, keys and values of its CpLayout rows (parallel/cp_shard.h). Whole (unsplit) sequences
// attend locally; split sequences also need the keys of the other cp ranks, which travel as one
// packed "block" per rank (the rows of its split sequences only, the same count on every rank):
// `all-gather` gathers every block, `ring` passes them around the ring (overlapped with compute on
// the GPU under NCCL). Partial outputs over disjoint key sets are merged through the LSE
// (lse_merge_fwd); the backward computes every block's dQ, dK, dV from the FINAL O and LSE (the
// probabilities exp(s - lse) are then the true ones, so no merge backward is needed) and returns
// dK/dV to their owners (reduce-scatter, or around the ring). docs/context-parallel.md.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/thd_batch.h"
#include "kernels/attention/attention.h"
#include "parallel/communicator.h"
#include "parallel/cp_shard.h"

namespace helix {

enum class CpComm : uint8_t { kAllGather, kRing };
std::string_view cp_comm_name(CpComm c);  // "all-gather", "ring"
// "all-gather" | "ring"; throws naming --cp-comm otherwise.
CpComm parse_cp_comm(const std::string& s);

// Default --cp-split-min-len: above ESM-2's longest crop (1024 residues + 2 = 1026 tokens), so
// protein batches never move K/V, and low enough that long sequences (the reason for CP) are split.
// The argument (bytes per layer vs load balance) is in docs/context-parallel.md.
inline constexpr int32_t kDefaultCpSplitMinLen = 2048;

// The cp settings of a model (Esm2Options::cp) and of the trainer's batch sharding.
struct CpOptions {
  CpComm comm = CpComm::kRing;
  int32_t split_min_len = kDefaultCpSplitMinLen;
};

// What every CP rank derives from the global micro-batch (a pure function of it): its shard and
// every rank's layout (to know the key layout of the other ranks' blocks).
struct CpBatch {
  ThdBatch global;                // the global micro-batch (token dropout reads whole sequences)
  ThdBatch local;                 // this rank's shard (cp_shard_batch)
  std::vector<CpLayout> layouts;  // [cp] every rank's layout, rank r at index r
  int rank = 0;

  CpBatch to(Device device) const;  // global and local on `device`
};

// Shards a CPU batch for `rank` of `cp`. When sequence-aware placement would leave a rank without
// any row, the batch is sharded with split_min_len = 0 instead (every sequence chunked), so that
// every rank holds rows; every rank takes the same decision.
CpBatch cp_split_batch(const ThdBatch& global, int cp, int rank, const CpShardOptions& opt);

// The exchange plan of one batch, shared by every attention layer (host work and host-to-device
// copies of the layouts once per batch).
struct CpAttentionPlan {
  int cp = 1;
  int rank = 0;
  CpComm comm = CpComm::kRing;
  int num_split = 0;       // split sequences (the same on every rank, in global order)
  int64_t block_rows = 0;  // R: rows of every rank's packed block (sum of split slots / cp)
  int64_t local_rows = 0;  // rows of the rank's CpLayout (the tensors may have more at the end)
  // Local rows [begin, end) copied, in order, into the rank's packed block (merged runs).
  std::vector<std::pair<int64_t, int64_t>> runs;
  // [cp]: remote[s] = the rank's queries of split sequences against rank s's block (a leading
  // empty sequence makes the padded offsets start at 0); remote[rank] is unused.
  std::vector<ThdAttentionLayout> remote;
  // CUDA: the second stream the ring's transfers run on when the communicator enqueues on streams
  // (NCCL), created once per batch; the CPU stream otherwise.
  Stream comm_stream;
};

std::shared_ptr<const CpAttentionPlan> make_cp_attention_plan(const std::vector<CpLayout>& layouts,
                                                              int rank, CpComm comm, Device device);

struct CpAttentionFwdParams {
  Communicator* comm = nullptr;  // the cp group (size plan->cp, this rank plan->rank)
  const CpAttentionPlan* plan = nullptr;
  Tensor q;                  // [T, H, D] the rank's rows, rotated (rotary before K/V travel)
  Tensor k;                  // [T, H, D]
  Tensor v;                  // [T, H, D]
  ThdAttentionLayout local;  // the rank's batch: every local sequence against its local keys
  float softmax_scale = 0.f;
  Tensor o;    // [T, H, D] written
  Tensor lse;  // [H, T] f32 written
};

struct CpAttentionBwdParams {
  Communicator* comm = nullptr;
  const CpAttentionPlan* plan = nullptr;
  Tensor q, k, v;  // [T, H, D] as in the forward
  Tensor o;        // [T, H, D] the forward's (merged) output
  Tensor d_o;      // [T, H, D]
  Tensor lse;      // [H, T] f32 the forward's (merged) LSE
  ThdAttentionLayout local;
  float softmax_scale = 0.f;
  AttentionBwdMode mode = AttentionBwdMode::kAtomic;
  Tensor d_q, d_k, d_v;  // [T, H, D] written
};

// Collective over the cp group: every rank calls it with plans built from the same layouts.
void cp_attention_fwd(const CpAttentionFwdParams& p, const Stream& stream);
void cp_attention_bwd(const CpAttentionBwdParams& p, const Stream& stream);

// Bytes one rank sends per attention layer (both modes move the same amount): forward (cp-1)
// blocks of K and V, backward (cp-1) blocks of K and V again plus (cp-1) blocks of dK and dV.
struct CpAttentionBytes {
  int64_t fwd = 0;
  int64_t bwd = 0;
};
CpAttentionBytes cp_attention_bytes(const CpAttentionPlan& plan, int64_t heads, int64_t head_dim,
                                    int64_t elem_bytes);

}  // namespace helix
