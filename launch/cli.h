#pragma once
// The `helix` CLI: subcommand dispatch and top-level options (Boost.Program_options).
// Subcommands: train (launch/trainer.h), info (build and device report).
namespace helix {

int run_cli(int argc, char** argv);

}  // namespace helix
