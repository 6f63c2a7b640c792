#pragma once
// Context-parallel batch sharding as pure functions on a CPU ThdBatch (no communication): each
// split sequence is padded to a multiple of 2*cp and cut into 2*cp chunks, rank r keeps chunks r and
// 2*cp-1-r (the Transformer Engine / Megatron load-balanced layout); with split_min_len, short
// sequences stay whole on one rank, placed greedily by attention cost. docs/context-parallel.md.
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "core/thd_batch.h"

namespace helix {

struct CpShardOptions {
  // Sequences whose global padded length (cu_seqlens_padded slot) is < split_min_len are placed whole
  // on one rank; the others are chunked. 0 = chunk every sequence (the plain TE/Megatron layout).
  int32_t split_min_len = 0;
  int32_t pad_id = 1;  // <pad> written to rows beyond a sequence's global slot (ESM-2's <pad> is 1)
};

// What the rank holds, per local sequence i (host vectors of length b_local, in global sequence
// order), and the global row of every local row. Positions are within the sequence (0-based).
// A split sequence's rank rows are [chunk0_begin, chunk0_end) followed by [chunk1_begin, chunk1_end)
// in sequence positions; its queries attend to keys of the whole sequence (global_len real tokens,
// padded to padded_len over all cp ranks). A whole sequence has chunk0 = [0, slot), chunk1 empty.
struct CpLayout {
  int cp = 1;
  int rank = 0;
  std::vector<int32_t> seq_index;     // [b_local] index of the sequence in the global batch
  std::vector<uint8_t> split;         // [b_local] 1 = chunked over the cp ranks, 0 = whole here
  std::vector<int32_t> global_len;    // [b_local] real length s of the whole sequence
  std::vector<int32_t> padded_len;    // [b_local] split: s padded to a multiple of 2*cp; whole: slot
  std::vector<int32_t> chunk0_begin;  // [b_local] sequence positions of the first chunk
  std::vector<int32_t> chunk0_end;    // [b_local]
  std::vector<int32_t> chunk1_begin;  // [b_local] sequence positions of the second chunk (empty
  std::vector<int32_t> chunk1_end;    // [b_local]   for whole sequences)
  std::vector<int64_t> global_row;    // [T_local] row of the global batch, -1 = padding added here
};

struct CpShard {
  ThdBatch batch;  // CPU tensors; positions = position within the sequence (rotary)
  CpLayout layout;
};

// Which rank holds each global sequence whole, or -1 for split sequences (deterministic; see
// docs/context-parallel.md for the greedy rule and its tie-breaking). Host cu_seqlens of the global
// batch are read.
std::vector<int> cp_place_sequences(const ThdBatch& global, int cp, const CpShardOptions& opt);

// Rank `rank`'s share of `global` (CPU tensors) under context parallelism of size cp.
CpShard cp_shard_batch(const ThdBatch& global, int cp, int rank, const CpShardOptions& opt = {});

// The inverse for tests and gathers: per-rank row tensors ([T_local_r, ...], CPU, any dtype,
// contiguous) back to global row order [global_rows, ...]. Every global row must be covered
// exactly once; rows added as padding by the shard (global_row -1) are dropped.
Tensor cp_unshard_rows(const std::vector<Tensor>& rank_rows, const std::vector<CpLayout>& layouts,
                       int64_t global_rows);

}  // namespace helix
