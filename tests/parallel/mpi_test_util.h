#pragma once
// Helpers for the multi-rank tests (run under mpirun; main() in mpi_main.cpp owns MPI). Every rank
// runs every test; skip conditions must be the same on every rank, or the collectives mismatch.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <string>

#include "core/device.h"
#include "parallel/context.h"
#include "test_util.h"

namespace helix::testing {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// This rank's GPU when GPUs are shared round-robin (several ranks may share one).
inline Device rank_gpu() { return Device::cuda(world_rank() % cuda_device_count()); }

inline ParallelContext make_context(ParallelSizes sizes, CommBackend backend = CommBackend::kMpi,
                                    Device device = Device::cpu()) {
  ParallelOptions o;
  o.sizes = sizes;
  o.backend = backend;
  o.device = device;
  return ParallelContext::create(MPI_COMM_WORLD, o);
}

// NCCL needs one GPU per rank of a communicator.
#define HELIX_REQUIRE_GPU_PER_RANK()                                                              \
  do {                                                                                            \
    if (::helix::cuda_device_count() < ::helix::testing::world_size())                            \
      GTEST_SKIP() << "NCCL needs one GPU per rank: " << ::helix::testing::world_size()           \
                   << " ranks, " << ::helix::cuda_device_count() << " GPUs ("                     \
                   << (::helix::cuda_available() ? std::string("too few")                         \
                                                 : ::helix::cuda_unavailable_reason())            \
                   << ")";                                                                        \
  } while (0)

// True on every rank when the condition holds on every rank (for EXPECTs that must agree).
inline bool all_ranks(bool ok) {
  int v = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&v, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

}  // namespace helix::testing
