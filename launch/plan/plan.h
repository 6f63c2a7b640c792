#pragma once
// `helix plan`: per-rank memory, FLOPs, communication, pipeline bubble and predicted step time of a
// training layout (tp, cp, pp, virtual stages, ZeRO, micro-batches, recompute, FP8) for any model
// config, from closed-form counts of what each rank holds and moves and the rates of a calibration
// file. The counts follow the code (layers/esm2.cpp's shards and saved tensors) so that tests can
// hold them against a built model; docs/scaling.md derives every formula.
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "launch/plan/calibration.h"
#include "layers/model_config.h"

namespace helix {

enum class RecomputeMode { kNone, kSelective, kFull };
enum class Fp8Mode { kOff, kDelayed };
const char* recompute_name(RecomputeMode r);

struct PlanLayout {
  int tp = 1, cp = 1, pp = 1;
  int virtual_stages =
      1;         // --pp-virtual: model chunks per pipeline rank (interleaved 1F1B when > 1)
  int zero = 0;  // 1: optimizer state (fp32 master + moments) sharded over dp; 2: + gradients;
                 // 3: + the model copy
  int micro_batches = 1;  // per optimizer step and data-parallel rank
  RecomputeMode recompute = RecomputeMode::kNone;
  bool sequence_parallel = true;  // only read when tp > 1
  std::string str() const;
};

struct PlanInput {
  ModelConfig model;
  int gpus = 1;
  int64_t tokens_per_step = 16384;  // over all micro-batches and data-parallel ranks
  double seq_len = 504;    // token-weighted mean sequence length, sum s^2 / sum s (attention cost)
  int max_seq_len = 1024;  // longest sample (crop + 2): a micro-batch must hold it
  Fp8Mode fp8 = Fp8Mode::kOff;
  // Layers per virtual stage (helix train --pp-layers), pp * virtual_stages entries; empty: the
  // trainer's automatic split (esm2_pipeline_split).
  std::vector<int> pp_layers;
  bool bf16 =
      true;  // compute dtype bf16 (GPU); false: f32, the model copy is the master (CPU runs)
  PlanLayout layout;
};

// Bytes one rank holds, by kind.
struct MemoryBytes {
  double master = 0;        // fp32 master weights
  double model_copy = 0;    // compute copy (bf16) and FP8 weight copies
  double grads = 0;         // fp32 gradients
  double optimizer = 0;     // AdamW exp_avg and exp_avg_sq (fp32)
  double activations = 0;   // saved for backward, at the schedule's peak (micro-batches in flight)
  double comm_buffers = 0;  // ZeRO buckets and gathered layers, pipeline send/recv, CP K/V gathers
  double workspace = 0;     // the largest transient of one layer's backward
  double total() const {
    return master + model_copy + grads + optimizer + activations + comm_buffers + workspace;
  }
};

struct StagePlan {
  int layers = 0;
  std::vector<std::pair<int, int>> layer_ranges;  // [first, last) per chunk, as the trainer builds it
  bool first = false, last = false;
  int64_t param_elements = 0;  // this rank's share before ZeRO (tensor-parallel shard)
  MemoryBytes memory;
  double fwd_seconds = 0, bwd_seconds = 0;  // one micro-batch through all chunks of this stage
  double optimizer_seconds = 0;
};

struct CommBytes {
  double tp = 0, cp = 0, dp = 0, pp = 0;  // bytes each rank receives per step, by group
};

struct StepTime {
  double gemm = 0, attention = 0, memory_bound = 0;  // per micro-batch, slowest stage
  double tp_comm = 0, cp_comm = 0, pp_comm = 0;      // per micro-batch, exposed
  double pipeline = 0;    // (m + (p-1)/v) * (fwd + bwd) of the slowest stage
  double bubble = 0;      // the idle part of `pipeline`
  double dp_exposed = 0;  // data-parallel communication not hidden behind backward
  double optimizer = 0;
  double host = 0;  // batch packing on the host before the step's GPU work
  double total = 0;
};

struct PlanResult {
  std::string error;  // non-empty: the layout is invalid (the rule it breaks); nothing else is set
  int dp = 1;
  std::vector<StagePlan> stages;
  int worst_stage = 0;  // the stage with the most memory
  MemoryBytes memory;   // of worst_stage
  double capacity_bytes = 0, reserved_bytes = 0;
  bool fits = false;
  int64_t tokens_per_micro_batch = 0;          // per data-parallel rank (before CP splits it)
  double model_flops = 0, hardware_flops = 0;  // per step, all GPUs
  CommBytes comm;
  double bubble_fraction = 0;
  StepTime time;
  double tokens_per_second = 0, mfu = 0;
  std::string comm_placement;         // which groups run on NVLink / the network
  std::vector<std::string> warnings;  // what the current code does not support yet
  double layer_factor =
      1;  // measured / modelled layer time of a calibration `layers` row (1: none)
};

// Parameter elements one rank holds for a stage of `layers` transformer layers under tensor
// parallelism tp (vocabulary padded to a multiple of tp), plus the embedding (first stage; and the
// last stage's tied decoder when pp > 1) and the final LayerNorm + LM head (last stage).
int64_t stage_param_elements(const ModelConfig& m, int tp, int layers, bool first, bool last,
                             bool pp);
// Bytes of one layer's saved activations of one micro-batch of `tokens` tokens per rank.
double layer_activation_bytes(const ModelConfig& m, int64_t tokens, const PlanLayout& l, bool bf16);
// Model FLOPs of a step of `tokens` tokens whose sum s^2 / sum s is `seq_len`
// (== ModelConfig::train_flops for such a batch).
double plan_model_flops(const ModelConfig& m, double tokens, double seq_len);
// Layers per virtual stage as the trainer splits them (launch/pipeline_step.cpp pipeline_split):
// in.pp_layers, else esm2_pipeline_split over pp * virtual_stages parts; rank s holds virtual
// stages s, s + pp, ... (pipeline_layer_ranges).
std::vector<int> plan_layer_split(const PlanInput& in);
// The first rule the layout breaks (divisibility, sizes), or "".
std::string layout_error(const PlanInput& in);
PlanResult make_plan(const PlanInput& in, const Calibration& cal);

}  // namespace helix
