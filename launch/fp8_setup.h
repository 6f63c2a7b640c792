#pragma once
// `helix train` FP8 setup: turns the --fp8* flags into an Fp8ScalingManager for the model (or none
// for --fp8 none), refusing GPUs without FP8 tensor cores and naming the CPU emulation in the log.
// Kept apart from trainer.cpp so the trainer gains two lines.
#include <memory>

#include "launch/train_options.h"
#include "layers/fp8_scaling.h"
#include "parallel/context.h"

namespace helix {

// Null for --fp8 none. Throws (one line naming --fp8) on a GPU of compute capability < 8.9.
std::unique_ptr<Fp8ScalingManager> make_fp8_manager(const TrainOptions& o, const ParallelContext& ctx,
                                                    Device device, bool log);

// The recipe the flags describe (validated: each bad value names its flag).
Fp8Recipe fp8_recipe_of(const TrainOptions& o);

}  // namespace helix
