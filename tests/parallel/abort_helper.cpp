// A two-rank job that fails on purpose, for the abort tests (tests/parallel/CMakeLists.txt). Its
// main() is shaped like the CLI's: errors reach one top-level catch that calls abort_all.
//   throw      rank 1 throws before an all-reduce that rank 0 is already waiting in
//   timeout    rank 1 never joins the all-reduce; rank 0's watchdog must abort the job
//   mpi_error  rank 1 sends to a rank that does not exist (MPI_CHECK throws); rank 0 waits in a
//   barrier
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "core/error.h"
#include "parallel/checks.h"
#include "parallel/context.h"
#include "parallel/mpi_communicator.h"

namespace {

int run(const std::string& mode, int rank) {
  using namespace helix;
  ParallelContext ctx =
      ParallelContext::create(MPI_COMM_WORLD, ParallelOptions{.sizes = {.tp = 2}});
  Tensor t = Tensor::zeros({1000}, DType::kF32);
  if (mode == "throw") {
    if (rank == 1) HELIX_FAIL("rank 1 failed on purpose before all_reduce");
    ctx.tp().all_reduce(t, ReduceOp::kSum, Stream());
  } else if (mode == "timeout") {
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::seconds(60));  // ended by rank 0's MPI_Abort
      return 0;
    }
    ctx.tp().all_reduce(t, ReduceOp::kSum, Stream());
  } else if (mode == "mpi_error") {
    if (rank == 1) {
      auto& mpi = dynamic_cast<MpiCommunicator&>(ctx.tp());
      int v = 1;
      MPI_CHECK(MPI_Send(&v, 1, MPI_INT, 99, 0, mpi.comm()));
    }
    ctx.tp().barrier();
  } else {
    HELIX_FAIL("abort_helper: unknown mode '{}' (throw, timeout, mpi_error)", mode);
  }
  std::printf("rank %d: the collective returned, which it must not\n", rank);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  helix::MpiSession mpi(&argc, &argv);
  try {
    return run(argc > 1 ? argv[1] : "", mpi.world_rank());
  } catch (const std::exception& e) {
    helix::abort_all(e.what());
  }
}
