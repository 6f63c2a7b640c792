#include "launch/train_options.h"

#include <boost/program_options.hpp>
#include <fstream>
#include <iostream>

#include "core/error.h"
#include "launch/pipeline_step.h"
#include "launch/fp8_setup.h"

namespace po = boost::program_options;

namespace helix {

bool parse_train_options(const std::vector<std::string>& args, TrainOptions& o) {
  int layers = 0, hidden = 0, heads = 0, ffn = 0;
  std::string decay = "linear", config, pp_layers;
  po::options_description general("General");
  general.add_options()("help,h", "show this help")(
      "config", po::value(&config), "INI file with any of the options below (command line wins)");
  po::options_description model("Model");
  model.add_options()("model", po::value(&o.model)->default_value(o.model),
                      "esm2-8m | esm2-35m | esm2-150m | esm2-650m | esm2-3b | esm2-15b | esm3-98b")(
      "layers", po::value(&layers), "override the number of layers")("hidden", po::value(&hidden),
                                                                     "override the hidden size")(
      "heads", po::value(&heads), "override the number of attention heads")("ffn", po::value(&ffn),
                                                                            "override the MLP size");
  po::options_description data("Data");
  data.add_options()("data", po::value(&o.data), "FASTA or FASTA.gz file of proteins (required)")(
      "valid-fraction", po::value(&o.valid_fraction)->default_value(o.valid_fraction),
      "share of proteins held out for validation (by id hash)")(
      "skip-bad-records", po::bool_switch(&o.skip_bad_records), "skip and count malformed records instead of stopping")(
      "max-residues", po::value(&o.max_residues)->default_value(o.max_residues), "random crop length")(
      "pad-to-multiple", po::value(&o.pad_to_multiple)->default_value(o.pad_to_multiple),
      "pad every sequence to a multiple of this many tokens");
  po::options_description batch("Batching");
  batch.add_options()("tokens-per-step", po::value(&o.tokens_per_step)->default_value(o.tokens_per_step),
                      "tokens per optimizer step (all micro-batches)")(
      "micro-batches", po::value(&o.micro_batches)->default_value(o.micro_batches),
      "micro-batches per step (gradient accumulation)");
  po::options_description optim("Optimization");
  optim.add_options()("steps", po::value(&o.steps)->default_value(o.steps), "optimizer steps")(
      "lr", po::value(&o.lr.peak_lr)->default_value(4e-4, "4e-4"), "peak learning rate")(
      "min-lr", po::value(&o.lr.min_lr)->default_value(0.0, "0"), "learning rate at the end of decay")(
      "warmup", po::value(&o.lr.warmup_steps)->default_value(0), "linear warmup steps")(
      "lr-decay", po::value(&decay)->default_value(decay), "constant | linear | cosine")(
      "weight-decay", po::value(&o.weight_decay)->default_value(o.weight_decay, "0.01"),
      "AdamW decoupled weight decay (weights and embeddings; not biases or LayerNorm)")(
      "beta1", po::value(&o.beta1)->default_value(o.beta1, "0.9"), "AdamW beta1")(
      "beta2", po::value(&o.beta2)->default_value(o.beta2, "0.98"), "AdamW beta2")(
      "adam-eps", po::value(&o.adam_eps)->default_value(o.adam_eps, "1e-8"), "AdamW epsilon")(
      "clip-norm", po::value(&o.clip_norm)->default_value(o.clip_norm, "1.0"), "global gradient norm clip (0: off)")(
      "seed", po::value(&o.seed)->default_value(o.seed), "seed of initialisation, shuffling, crops and masking");
  po::options_description out("Evaluation and output");
  out.add_options()("eval-interval", po::value(&o.eval_interval)->default_value(o.eval_interval),
                    "steps between validation runs (0: at the end only)")(
      "eval-batches", po::value(&o.eval_batches)->default_value(o.eval_batches), "validation micro-batches per run")(
      "log-interval", po::value(&o.log_interval)->default_value(o.log_interval), "steps between progress lines")(
      "out", po::value(&o.out), "output directory (metrics.jsonl, model.safetensors)");
  po::options_description exec("Execution");
  exec.add_options()("device", po::value(&o.device)->default_value(o.device), "auto | cpu | cuda")(
      "dtype", po::value(&o.dtype)->default_value(o.dtype), "auto (bf16 on CUDA, f32 on CPU) | f32 | bf16")(
      "recompute", po::value(&o.recompute)->default_value(o.recompute),
      "activation recompute: none | full (re-run each layer's forward in backward)")(
      "tp", po::value(&o.tp)->default_value(o.tp), "tensor-parallel size (ranks per TP group)")(
      "cp", po::value(&o.cp)->default_value(o.cp), "context-parallel size (ranks sharing each sequence)")(
      "cp-comm", po::value(&o.cp_comm)->default_value(o.cp_comm), "K/V exchange under --cp: all-gather | ring")(
      "cp-split-min-len", po::value(&o.cp_split_min_len)->default_value(o.cp_split_min_len),
      "under --cp, sequences shorter than this stay whole on one cp rank (0: split every sequence)")(
      "dp", po::value(&o.dp)->default_value(o.dp), "data-parallel size (0: world size / tp)")(
      "sequence-parallel", po::bool_switch(&o.sequence_parallel), "split LayerNorm/residual regions along T over tp")(
      "pp", po::value(&o.pp)->default_value(o.pp), "pipeline-parallel stages (1F1B over the micro-batches)")(
      "pp-virtual", po::value(&o.pp_virtual)->default_value(o.pp_virtual),
      "model chunks per pipeline rank (> 1: interleaved 1F1B; --micro-batches a multiple of --pp)")(
      "pp-layers", po::value(&pp_layers), "layers per (virtual) stage, e.g. 9,8,8,8 (default: balanced)")(
      "zero", po::value(&o.zero)->default_value(o.zero),
      "ZeRO sharding over dp: 0 off | 1 optimizer state | 2 + gradients | 3 + parameters");
  po::options_description fp8("FP8 (docs/fp8.md)");
  fp8.add_options()("fp8", po::value(&o.fp8)->default_value(o.fp8), "none | delayed (FP8 GEMMs with delayed scaling)")(
      "fp8-format", po::value(&o.fp8_format)->default_value(o.fp8_format),
      "e4m3 | hybrid (E4M3 forward, E5M2 gradients)")(
      "amax-history", po::value(&o.amax_history)->default_value(o.amax_history), "amax history length (steps)")(
      "amax-algo", po::value(&o.amax_algo)->default_value(o.amax_algo), "max | most_recent")(
      "fp8-margin", po::value(&o.fp8_margin)->default_value(o.fp8_margin), "scale = fp8_max / amax / 2^margin")(
      "fp8-amax-group", po::value(&o.fp8_amax_group)->default_value(o.fp8_amax_group),
      "ranks sharing amaxes: tp | tp-cp-dp");
  po::options_description all;
  all.add(general).add(model).add(data).add(batch).add(optim).add(out).add(exec).add(fp8);
  all.add(checkpoint_options_description(o.checkpoint));

  po::variables_map vm;
  po::store(po::command_line_parser(args).options(all).run(), vm);
  if (vm.count("help")) {
    std::cout << "usage: helix train --data FILE [options]\n" << all;
    return false;
  }
  if (vm.count("config")) {
    const std::string path = vm["config"].as<std::string>();
    std::ifstream f(path);
    HELIX_CHECK(f.good(), "--config: cannot open '{}'", path);
    po::store(po::parse_config_file(f, all), vm);
  }
  po::notify(vm);
  o.lr.decay = parse_lr_decay(decay);
  o.lr.total_steps = o.steps;
  o.model_config = model_config(o.model);
  if (layers) o.model_config.layers = layers;
  if (hidden) o.model_config.hidden = hidden;
  if (heads) o.model_config.heads = heads;
  if (ffn) o.model_config.ffn = ffn;
  if (layers || hidden || heads || ffn) o.model_config.name = o.model + "-custom";
  if (!pp_layers.empty()) o.pp_layers = parse_pp_layers(pp_layers);
  validate_train_options(o);
  return true;
}

void validate_train_options(const TrainOptions& o) {
  HELIX_CHECK(!o.data.empty(), "--data: a FASTA file is required");
  o.model_config.validate();
  HELIX_CHECK(o.steps > 0, "--steps: expected a positive number, got {}", o.steps);
  HELIX_CHECK(o.micro_batches > 0, "--micro-batches: expected a positive number, got {}", o.micro_batches);
  HELIX_CHECK(o.tokens_per_step % o.micro_batches == 0,
              "--tokens-per-step {} is not divisible by --micro-batches {}", o.tokens_per_step, o.micro_batches);
  const int64_t longest = o.max_residues + 2;
  HELIX_CHECK(o.tokens_per_micro_batch() >= longest,
              "--tokens-per-step: {} tokens per micro-batch is less than the longest crop ({} residues + 2 = {} "
              "tokens); raise --tokens-per-step or lower --max-residues",
              o.tokens_per_micro_batch(), o.max_residues, longest);
  HELIX_CHECK(o.max_residues + 2 <= o.model_config.max_positions,
              "--max-residues {} + 2 exceeds the model's {} positions", o.max_residues, o.model_config.max_positions);
  HELIX_CHECK(o.lr.peak_lr > 0 && o.lr.min_lr >= 0 && o.lr.min_lr <= o.lr.peak_lr,
              "--lr / --min-lr: expected 0 <= min-lr <= lr and lr > 0, got lr {} min-lr {}", o.lr.peak_lr, o.lr.min_lr);
  HELIX_CHECK(o.lr.warmup_steps >= 0 && o.lr.warmup_steps <= o.steps, "--warmup: expected 0..{} steps, got {}",
              o.steps, o.lr.warmup_steps);
  HELIX_CHECK(o.valid_fraction >= 0 && o.valid_fraction < 1, "--valid-fraction: expected [0, 1), got {}",
              o.valid_fraction);
  HELIX_CHECK(o.pad_to_multiple >= 1, "--pad-to-multiple: expected >= 1, got {}", o.pad_to_multiple);
  HELIX_CHECK(o.device == "auto" || o.device == "cpu" || o.device == "cuda",
              "--device: expected auto, cpu or cuda, got '{}'", o.device);
  HELIX_CHECK(o.dtype == "auto" || o.dtype == "f32" || o.dtype == "bf16", "--dtype: expected auto, f32 or bf16, got '{}'",
              o.dtype);
  HELIX_CHECK(o.tp >= 1, "--tp: expected >= 1, got {}", o.tp);
  HELIX_CHECK(o.cp >= 1, "--cp: expected >= 1, got {}", o.cp);
  HELIX_CHECK(o.cp_comm == "ring" || o.cp_comm == "all-gather", "--cp-comm: expected all-gather or ring, got '{}'",
              o.cp_comm);
  HELIX_CHECK(o.cp_split_min_len >= 0, "--cp-split-min-len: expected >= 0, got {}", o.cp_split_min_len);
  HELIX_CHECK(o.dp >= 0, "--dp: expected >= 0 (0: derived), got {}", o.dp);
  HELIX_CHECK(o.model_config.heads % o.tp == 0, "--tp {}: expected the number of attention heads ({}) divisible by tp",
              o.tp, o.model_config.heads);
  HELIX_CHECK(o.model_config.ffn % o.tp == 0, "--tp {}: expected the FFN size ({}) divisible by tp", o.tp,
              o.model_config.ffn);
  HELIX_CHECK(!o.sequence_parallel || o.tp > 1, "--sequence-parallel: needs --tp > 1, got --tp {}", o.tp);
  HELIX_CHECK(o.zero >= 0 && o.zero <= 3, "--zero: expected 0, 1, 2 or 3, got {}", o.zero);
  HELIX_CHECK(o.zero == 0 || o.dp != 1, "--zero {}: shards over the data-parallel group, but --dp is 1", o.zero);
  HELIX_CHECK(o.fp8 == "none" || o.fp8 == "delayed", "--fp8: expected none or delayed, got '{}'", o.fp8);
  if (o.fp8 == "delayed") (void)fp8_recipe_of(o);  // each bad --fp8-* value names its flag
  HELIX_CHECK(o.fp8 == "none" || (o.model_config.hidden % (16 * o.tp) == 0 && o.model_config.ffn % (16 * o.tp) == 0),
              "--fp8 delayed: expected hidden ({}) and ffn ({}) divisible by 16 * tp = {} (FP8 GEMM sizes)",
              o.model_config.hidden, o.model_config.ffn, 16 * o.tp);
  HELIX_CHECK(o.recompute == "none" || o.recompute == "full", "--recompute: expected none or full, got '{}'",
              o.recompute);
  validate_pipeline_options(o);
  HELIX_CHECK(o.eval_batches >= 0 && o.eval_interval >= 0 && o.log_interval >= 1,
              "--eval-batches/--eval-interval must be >= 0 and --log-interval >= 1");
  HELIX_CHECK(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1 && o.adam_eps > 0,
              "--beta1/--beta2 must be in [0, 1) and --adam-eps > 0");
  validate_checkpoint_options(o.checkpoint, o.steps);
}

}  // namespace helix
