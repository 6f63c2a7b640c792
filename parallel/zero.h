#pragma once
// ZeRO / FSDP sharding over the data-parallel group, the parts that know nothing of layers: the flat
// per-unit buffer layout (a unit is what one collective moves: the parameters of one transformer
// layer, or the rest of the model), the shard layout a checkpoint needs, the per-rank memory formula
// that the trainer's measurement and `helix plan` share, and a gatherer that all-gathers a unit's
// shards into a full flat buffer, ahead of use on a communication stream (prefetch).
// Design: tensors sit back to back in a unit's flat buffer at offsets aligned to kZeroAlign elements;
// the buffer is padded to a multiple of kZeroAlign * dp, so every rank's shard has the same size and
// starts aligned, and shard slices feed the vectorised multi-tensor kernels. docs/fsdp.md.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/tensor.h"
#include "parallel/communicator.h"

namespace helix {

constexpr int64_t kZeroAlign = 64;  // elements: 256 B of f32, 128 B of bf16

// One unit's flat buffer. Rank r of dp holds [r * shard_numel, (r + 1) * shard_numel).
struct ZeroUnitLayout {
  std::string name;              // "layer3", "outer"
  std::vector<int64_t> numels;   // elements of each tensor, in unit order
  std::vector<int64_t> offsets;  // first element of each tensor (multiples of kZeroAlign)
  int64_t numel = 0;             // padded flat size: a multiple of kZeroAlign * dp
  int64_t shard_numel = 0;       // numel / dp
  int dp = 1;
};
// Worked example (dp = 2): tensors of 100 and 10 elements -> offsets 0 and 128, data ends at 138,
// numel = 256 (a multiple of 64 * 2), shard_numel 128: rank 0 holds tensor 0 and its padding,
// rank 1 holds tensor 1 and the tail padding.
ZeroUnitLayout make_zero_unit_layout(std::string name, const std::vector<int64_t>& numels, int dp);

// The part of tensor `tensor` that lies in a rank's shard: elements [tensor_begin, +numel) of the
// tensor are elements [shard_begin, +numel) of the shard.
struct ZeroShardPiece {
  size_t tensor = 0;
  int64_t tensor_begin = 0;
  int64_t shard_begin = 0;
  int64_t numel = 0;
};
std::vector<ZeroShardPiece> zero_shard_pieces(const ZeroUnitLayout& unit, int rank);

// What one rank holds of the whole model (checkpoints save and restore sharded optimizer state with
// it): the units in order, each unit's flat buffer placed at global_offsets[u] of the concatenation
// of all units, this rank's shard of unit u at global elements [shard_begin(u), +shard_numel).
// Tensor names are the callers' (unit_tensor_names[u][k] names units[u].numels[k]).
struct ZeroShardLayout {
  int stage = 0;
  int dp = 1;
  int rank = 0;
  std::vector<ZeroUnitLayout> units;
  std::vector<std::vector<std::string>> unit_tensor_names;
  std::vector<int64_t> global_offsets;  // [units.size()]
  int64_t global_numel = 0;             // sum of units' numel

  int64_t shard_begin(size_t unit) const { return global_offsets.at(unit) + rank * units.at(unit).shard_numel; }
};

// Per-rank bytes of the persistent buffers of each ZeRO stage (docs/fsdp.md gives the formula):
//   parameters = the model copy compute reads (compute dtype);
//   gradients  = f32 gradients held after the step's reduction;
//   optimizer  = f32 master weights (when not the model copy itself) and the two Adam moments.
// Stage 0 is the unsharded layout (tensors, no flat padding); stages 1-3 count padded flat buffers.
struct ZeroMemoryParams {
  int stage = 0;                                // 0..3
  int dp = 1;                                   // data-parallel (sharding) group size
  size_t compute_bytes = 2;                     // bytes per element of the model copy: 2 bf16, 4 f32
  std::vector<std::vector<int64_t>> unit_numels;  // per unit, its tensors' elements (this tp rank)
};
struct ZeroMemory {
  int64_t params = 0;
  int64_t grads = 0;
  int64_t optimizer = 0;
  int64_t total() const { return params + grads + optimizer; }
};
ZeroMemory zero_memory_bytes(const ZeroMemoryParams& p);

// All-gathers units' shards into full flat buffers over `comm` (the dp group, or dp_cp). On CUDA the
// gather runs on a communication stream after an event of the compute stream, so a prefetch issued
// one unit ahead overlaps compute; wait() makes the compute stream wait for it. On the CPU (and with
// the host-staged MPI backend) start() runs the collective inline. The full buffer is allocated on
// the communication stream after it waited for everything enqueued on the compute stream so far,
// which includes every read of a buffer dropped earlier: reusing freed memory there is safe.
class ZeroGatherer {
 public:
  ZeroGatherer(Communicator& comm, Device device, size_t num_units);
  ~ZeroGatherer();
  ZeroGatherer(const ZeroGatherer&) = delete;
  ZeroGatherer& operator=(const ZeroGatherer&) = delete;

  // Begins gathering `shard` [S] (the compute dtype) of `unit` into a new buffer [S * dp]. No-op
  // when the unit is already in flight.
  void start(size_t unit, const Tensor& shard, const Stream& compute);
  bool in_flight(size_t unit) const;
  // The gathered buffer (start() first if not in flight); `compute` waits for it.
  Tensor wait(size_t unit, const Tensor& shard, const Stream& compute);
  // Makes `compute` wait for every gather in flight: call before another collective of the same
  // group on the compute stream (NCCL needs the collectives of one communicator ordered alike on
  // every rank, not running concurrently on two streams).
  void order_after_in_flight(const Stream& compute) const;
  const Stream& comm_stream() const { return comm_stream_; }

 private:
  struct Pending;
  Communicator* comm_;
  Device device_;
  Stream comm_stream_;
  std::vector<std::unique_ptr<Pending>> pending_;
};

}  // namespace helix
