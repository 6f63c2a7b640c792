// The `helix` command line. Every error ends here as one line on stderr and a non-zero exit; under
// mpirun (more than one rank) the line goes through abort_all, which ends every rank so none waits
// in a collective.
#include <cstdio>
#include <exception>

#include "launch/cli.h"
#include "parallel/mpi_communicator.h"
#include "parallel/watchdog.h"

int main(int argc, char** argv) {
  helix::MpiSession mpi(&argc, &argv);
  const int world = mpi.world_size();
  try {
    return helix::run_cli(argc, argv);
  } catch (const std::exception& e) {
    if (world > 1) helix::abort_all(e.what());
    std::fprintf(stderr, "helix: error: %s\n", e.what());
    return 1;
  }
}
