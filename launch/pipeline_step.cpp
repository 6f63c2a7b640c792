#include "launch/pipeline_step.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <sstream>

#include "core/error.h"
#include "parallel/pipeline_schedule.h"

namespace helix {

std::vector<int> parse_pp_layers(const std::string& text) {
  std::vector<int> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t used = 0;
    int v = 0;
    try {
      v = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    HELIX_CHECK(used > 0 && used == item.size(),
                "--pp-layers: expected comma-separated layer counts like 9,8,8,8, got '{}'", text);
    out.push_back(v);
  }
  HELIX_CHECK(!out.empty(),
              "--pp-layers: expected comma-separated layer counts like 9,8,8,8, got '{}'", text);
  return out;
}

void validate_pipeline_options(const TrainOptions& o) {
  HELIX_CHECK(o.pp >= 1, "--pp: expected >= 1, got {}", o.pp);
  HELIX_CHECK(o.pp_virtual >= 1, "--pp-virtual: expected >= 1, got {}", o.pp_virtual);
  HELIX_CHECK(o.pp > 1 || (o.pp_virtual == 1 && o.pp_layers.empty()),
              "--pp-virtual / --pp-layers: need --pp > 1, got --pp {}", o.pp);
  if (o.pp == 1) return;
  HELIX_CHECK(o.cp == 1 || o.fp8 == "none",
              "--cp {} with --pp {} and --fp8 {}: FP8 of a context-parallel pipeline is not "
              "implemented",
              o.cp, o.pp, o.fp8);
  HELIX_CHECK(o.cp == 1 || o.zero == 0,
              "--cp {} with --pp {} and --zero {}: ZeRO of a context-parallel pipeline is not "
              "implemented",
              o.cp, o.pp, o.zero);
  validate_pipeline_schedule(
      {.stages = o.pp, .virtual_stages = o.pp_virtual, .micro_batches = o.micro_batches});
  const int parts = o.pp * o.pp_virtual;
  HELIX_CHECK(o.model_config.layers >= parts,
              "--pp {} x --pp-virtual {}: the model's {} layers cannot fill {} pipeline stages "
              "(one layer each at least)",
              o.pp, o.pp_virtual, o.model_config.layers, parts);
  if (!o.pp_layers.empty()) validate_layer_split(o.pp_layers, o.model_config.layers, parts);
}

std::vector<int> pipeline_split(const TrainOptions& o) {
  if (!o.pp_layers.empty()) return o.pp_layers;
  return esm2_pipeline_split(o.model_config, o.pp * o.pp_virtual);
}

std::vector<std::pair<int, int>> pipeline_stage_ranges(const TrainOptions& o,
                                                       const ParallelContext& ctx) {
  if (o.pp == 1) return {};
  return pipeline_layer_ranges(pipeline_split(o), o.pp, ctx.coords().pp);
}

std::unique_ptr<Esm2Pipeline> make_train_pipeline(const TrainOptions& o, Esm2Model& model,
                                                  const ParallelContext& ctx,
                                                  int64_t token_budget) {
  if (o.pp == 1) return nullptr;
  return std::make_unique<Esm2Pipeline>(model, ctx,
                                        Esm2PipelineOptions{.virtual_stages = o.pp_virtual,
                                                            .token_budget = token_budget,
                                                            .layers_per_stage = pipeline_split(o)});
}

std::string describe_pipeline(const TrainOptions& o) {
  const std::vector<int> split = pipeline_split(o);
  PipelineCosts costs;
  for (int s : split) costs.stage_weight.push_back(s);
  const PipelineScheduleParams p{
      .stages = o.pp, .virtual_stages = o.pp_virtual, .micro_batches = o.micro_batches};
  return fmt::format(
      "pipeline: {} stages x {} chunks ({}), layers per virtual stage {}, {} micro-batches, "
      "predicted bubble {:.1f}%",
      o.pp, o.pp_virtual, o.pp_virtual > 1 ? "interleaved 1F1B" : "1F1B", fmt::join(split, ","),
      o.micro_batches, 100 * pipeline_bubble_fraction(p, costs));
}

}  // namespace helix
