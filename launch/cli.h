#pragma once
// The `helix` CLI: subcommand dispatch and top-level options (Boost.Program_options).
// Subcommands: info (build and device report). Training, planning and conversion arrive with
// their issues and register here.
namespace helix {

int run_cli(int argc, char** argv);

}  // namespace helix
