#pragma once
// The checkpoint flags of `helix train` (--save, --save-every, --keep, --resume, --stop-after),
// kept apart from train_options so that the trainer's option table only adds this group.
#include <boost/program_options/options_description.hpp>
#include <cstdint>
#include <string>

namespace helix {

struct CheckpointOptions {
  std::string save_dir;    // --save: run directory receiving step_XXXXXXXX/ checkpoints ("" = none)
  int64_t save_every = 0;  // --save-every: steps between saves (0: only at the end of the process)
  int keep = 0;            // --keep: newest complete checkpoints kept (0: all)
  std::string
      resume;  // --resume: a run directory (its newest complete checkpoint) or one checkpoint
  int64_t stop_after = 0;  // --stop-after: this process ends after this global step (0: --steps);
                           // the schedule still spans --steps (time-limited jobs, resume tests)
};

// The option group, writing into `o`.
boost::program_options::options_description checkpoint_options_description(CheckpointOptions& o);
// Throws naming the flag: negative values, --stop-after past --steps, --save-every without --save.
void validate_checkpoint_options(const CheckpointOptions& o, int64_t steps);

}  // namespace helix
