#include "parallel/context.h"

#include "parallel/checks.h"
#include "parallel/mpi_communicator.h"
#include "parallel/nccl_communicator.h"

namespace helix {

CommBackend preferred_backend(Device device, int world_size) {
#if HELIX_WITH_NCCL
  if (device.is_cuda() && cuda_device_count() >= world_size) return CommBackend::kNccl;
#endif
  (void)device;
  (void)world_size;
  return CommBackend::kMpi;
}

ParallelContext ParallelContext::create(MPI_Comm world, const ParallelOptions& options) {
  int rank = 0, size = 0;
  MPI_CHECK(MPI_Comm_rank(world, &rank));
  MPI_CHECK(MPI_Comm_size(world, &size));
#if !HELIX_WITH_NCCL
  HELIX_CHECK(
      options.backend != CommBackend::kNccl,
      "NCCL backend requested, but helix was built without NCCL (HELIX_CUDA=OFF): use the MPI "
      "backend");
#endif
  set_current_device(options.device);  // this rank's GPU, before any stream or kernel touches it
  HELIX_CHECK(options.backend != CommBackend::kNccl || options.device.is_cuda(),
              "NCCL backend: expected this rank's CUDA device, got {}", options.device.str());

  ParallelContext ctx;
  ctx.groups_ = make_rank_groups(size, options.sizes);  // throws alike on every rank
  ctx.world_rank_ = rank;
  ctx.coords_ = ctx.groups_.coords(rank);
  ctx.backend_ = options.backend;
  ctx.device_ = options.device;
  WatchdogOptions wopts;
  wopts.timeout_s = options.timeout_s < 0 ? comm_timeout_from_env() : options.timeout_s;
  wopts.world_rank = rank;
  ctx.watchdog_ = std::make_shared<Watchdog>(wopts);

  // Our own copy of the world, so helix traffic never matches a caller's messages.
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_dup(world, &dup));
  MPI_CHECK(MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN));

  const auto& g = ctx.groups_;
  for (size_t k = 0; k < kAllGroupKinds.size(); ++k) {
    const GroupKind kind = kAllGroupKinds[k];
    // A kind whose partition equals an earlier kind's shares its communicator. The partition is the
    // same on every rank, so every rank skips the same splits.
    size_t same = k;
    for (size_t j = 0; j < k && same == k; ++j)
      if (g.groups(kAllGroupKinds[j]) == g.groups(kind)) same = j;
    if (same != k) {
      ctx.comms_[k] = ctx.comms_[same];
      continue;
    }
    GroupInfo info;
    for (size_t j = k; j < kAllGroupKinds.size(); ++j)
      if (g.groups(kAllGroupKinds[j]) == g.groups(kind))
        info.name +=
            (info.name.empty() ? "" : "/") + std::string(group_kind_name(kAllGroupKinds[j]));
    info.index = g.group_index(kind, rank);
    info.ranks = g.group_of(kind, rank);
    info.rank = g.rank_in_group(kind, rank);
    MPI_Comm sub = MPI_COMM_NULL;
    MPI_CHECK(MPI_Comm_split(dup, info.index, info.rank, &sub));
    auto mpi = std::make_unique<MpiCommunicator>(sub, std::move(info), ctx.watchdog_);
#if HELIX_WITH_NCCL
    if (options.backend == CommBackend::kNccl) {
      ctx.comms_[k] =
          std::make_shared<NcclCommunicator>(std::move(mpi), options.device, ctx.watchdog_);
      continue;
    }
#endif
    ctx.comms_[k] = std::move(mpi);
  }
  MPI_CHECK(MPI_Comm_free(&dup));
  return ctx;
}

}  // namespace helix
