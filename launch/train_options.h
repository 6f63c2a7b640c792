#pragma once
// `helix train` options: every flag also reads from an INI config file (--config), command line
// winning. Parsing and validation are separate from training so that bad combinations stop before any
// work, with one line naming the flag and the rule.
#include <cstdint>
#include <string>
#include <vector>

#include "launch/checkpoint_options.h"
#include "launch/lr_schedule.h"
#include "layers/model_config.h"
#include "parallel/cp_attention.h"

namespace helix {

struct TrainOptions {
  // Model
  std::string model = "esm2-8m";
  ModelConfig model_config;  // the preset with any --layers/--hidden/--heads/--ffn overrides
  // Data
  std::string data;
  double valid_fraction = 0.01;
  bool skip_bad_records = false;
  int64_t max_residues = 1022;
  int pad_to_multiple = 1;
  // Batching: tokens_per_step over all micro-batches (and data-parallel ranks), in padded tokens.
  int64_t tokens_per_step = 16384;
  int micro_batches = 1;
  // Optimisation
  int64_t steps = 1000;
  LrSchedule lr;
  double weight_decay = 0.01;
  double beta1 = 0.9, beta2 = 0.98, adam_eps = 1e-8;
  double clip_norm = 1.0;
  uint64_t seed = 1;
  // Evaluation and output
  int64_t eval_interval = 0;  // 0: only at the end
  int64_t eval_batches = 8;
  int64_t log_interval = 1;
  std::string out;            // directory: metrics.jsonl, model.safetensors
  // Execution
  std::string device = "auto";   // auto | cpu | cuda
  std::string dtype = "auto";    // auto (bf16 on CUDA, f32 on CPU) | f32 | bf16
  std::string recompute = "none";  // none | full
  // Parallelism (launched with mpirun): rank order tp-dp, dp = world / tp unless given.
  int tp = 1;
  // Context parallelism (docs/context-parallel.md): ranks sharing each sequence, K/V exchange
  // (all-gather | ring), shorter sequences stay whole on one cp rank (0: split every sequence).
  int cp = 1;
  std::string cp_comm = "ring";
  int32_t cp_split_min_len = kDefaultCpSplitMinLen;
  int dp = 0;                      // 0: derived from the world size
  bool sequence_parallel = false;  // split LayerNorm / residual regions along T over tp
  int zero = 0;  // ZeRO stage over dp: 1 optimizer state, 2 + gradients, 3 + parameters (docs/fsdp.md)
  // FP8 (docs/fp8.md): none | delayed; recipe of the delayed scaling.
  std::string fp8 = "none";
  std::string fp8_format = "hybrid";      // e4m3 | hybrid (E4M3 forward, E5M2 grad-output)
  int64_t amax_history = 1024;
  std::string amax_algo = "max";          // max | most_recent
  int fp8_margin = 0;
  std::string fp8_amax_group = "tp-cp-dp";  // tp | tp-cp-dp
  // Checkpoints (--save, --save-every, --keep, --resume, --stop-after): launch/checkpoint.h
  CheckpointOptions checkpoint;
  int64_t last_step() const { return checkpoint.stop_after > 0 ? checkpoint.stop_after : steps; }
  // Pipeline parallelism (launch/pipeline_step.h): stages, model chunks per rank (> 1: interleaved
  // 1F1B), layers per virtual stage (empty: balanced).
  int pp = 1;
  int pp_virtual = 1;
  std::vector<int> pp_layers;

  int64_t tokens_per_micro_batch() const { return tokens_per_step / micro_batches; }
};

// Parses `helix train` arguments (without the command word). Returns false when --help was printed.
bool parse_train_options(const std::vector<std::string>& args, TrainOptions& out);

// Checks every rule that does not need the data; throws helix::Error naming the flag.
void validate_train_options(const TrainOptions& o);

}  // namespace helix
