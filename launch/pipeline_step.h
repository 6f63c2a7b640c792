#pragma once
// Pipeline parallelism in `helix train` (--pp, --pp-virtual, --pp-layers): validation of the flags,
// the layer split (given, or balanced for the model), the stage's layer ranges and the Esm2Pipeline
// that runs each step's micro-batches through the schedule. The schedules live in
// parallel/pipeline_schedule.h, the model side in layers/esm2_pipeline.h; docs/pipeline.md.
#include <memory>
#include <string>
#include <vector>

#include "launch/train_options.h"
#include "layers/esm2_pipeline.h"

namespace helix {

// "9,8,8,8" -> {9, 8, 8, 8}; throws naming --pp-layers on anything else.
std::vector<int> parse_pp_layers(const std::string& text);
// Every pipeline rule that needs no data and no MPI (called by validate_train_options).
void validate_pipeline_options(const TrainOptions& o);
// Layers per virtual stage: --pp-layers, or esm2_pipeline_split for pp * pp_virtual parts.
std::vector<int> pipeline_split(const TrainOptions& o);
// The stage model's Esm2Options::layer_ranges (empty when --pp 1).
std::vector<std::pair<int, int>> pipeline_stage_ranges(const TrainOptions& o,
                                                       const ParallelContext& ctx);
// The pipeline of this rank (null when --pp 1). Every micro-batch is padded to `token_budget`.
std::unique_ptr<Esm2Pipeline> make_train_pipeline(const TrainOptions& o, Esm2Model& model,
                                                  const ParallelContext& ctx, int64_t token_budget);
// One line for the log: stages, chunks, the split and the predicted bubble.
std::string describe_pipeline(const TrainOptions& o);

}  // namespace helix
