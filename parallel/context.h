#pragma once
// ParallelContext: built once at start-up from the world communicator and the parallel sizes, then
// passed down by reference (helix keeps no global parallel state). Holds this rank's coordinates,
// the rank groups, one watchdog, and one communicator per group kind (tp, cp, dp, pp, dp_cp, amax,
// world). Kinds whose groups coincide (e.g. amax and world when pp = 1) share one communicator.
#include <mpi.h>

#include <array>
#include <memory>

#include "parallel/communicator.h"
#include "parallel/rank_groups.h"
#include "parallel/watchdog.h"

namespace helix {

enum class CommBackend : uint8_t {
  kMpi,   // every tensor through MPI; CUDA tensors staged through host memory
  kNccl,  // CUDA tensors through NCCL on `device`, CPU tensors through MPI
};

// The backend for a rank on `device` in a world of `world_size` processes: NCCL when the device is
// a GPU and there is one GPU per process (and helix has NCCL), else the host-staged MPI backend
// (CPU ranks, or ranks sharing GPUs, which NCCL refuses).
CommBackend preferred_backend(Device device, int world_size);

struct ParallelOptions {
  ParallelSizes sizes;
  CommBackend backend = CommBackend::kMpi;
  Device device = Device::cpu();  // this rank's device; the NCCL backend needs a GPU
  double timeout_s = -1;          // < 0: HELIX_COMM_TIMEOUT_S or 600 s; 0: no watchdog
};

class ParallelContext {
 public:
  // Collective over `world` (which is duplicated, not kept): every rank calls it with the same
  // sizes and backend. Throws (on every rank alike) when the sizes do not fit the world size.
  static ParallelContext create(MPI_Comm world, const ParallelOptions& options);

  ParallelContext(ParallelContext&&) = default;
  ParallelContext& operator=(ParallelContext&&) = default;

  int world_rank() const { return world_rank_; }
  int world_size() const { return groups_.world(); }
  const ParallelSizes& sizes() const { return groups_.sizes(); }  // dp filled in
  const RankCoords& coords() const { return coords_; }
  const RankGroups& groups() const { return groups_; }
  CommBackend backend() const { return backend_; }
  Device device() const { return device_; }
  Watchdog& watchdog() const { return *watchdog_; }

  Communicator& comm(GroupKind kind) const { return *comms_[static_cast<size_t>(kind)]; }
  Communicator& tp() const { return comm(GroupKind::kTP); }
  Communicator& cp() const { return comm(GroupKind::kCP); }
  Communicator& dp() const { return comm(GroupKind::kDP); }
  Communicator& pp() const { return comm(GroupKind::kPP); }
  Communicator& dp_cp() const { return comm(GroupKind::kDpCp); }  // gradient averaging under CP
  Communicator& amax() const { return comm(GroupKind::kAmax); }   // FP8 amax all-reduce(MAX)
  Communicator& world() const { return comm(GroupKind::kWorld); }

 private:
  ParallelContext() = default;

  RankGroups groups_;
  RankCoords coords_;
  int world_rank_ = 0;
  CommBackend backend_ = CommBackend::kMpi;
  Device device_;
  std::shared_ptr<Watchdog> watchdog_;
  std::array<std::shared_ptr<Communicator>, kNumGroupKinds> comms_;
};

}  // namespace helix
