// The `helix` command line. Every error ends here as one line on stderr and a non-zero exit.
#include <cstdio>
#include <exception>

#include "launch/cli.h"

int main(int argc, char** argv) {
  try {
    return helix::run_cli(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "helix: error: %s\n", e.what());
    return 1;
  }
}
