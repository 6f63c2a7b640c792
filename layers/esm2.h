#pragma once
// The ESM-2 masked language model as a graph of fused layers (pre-LayerNorm transformer with rotary
// attention, GELU MLP, tied LM head), its parameters under Hugging Face EsmForMaskedLM names, random
// initialisation as Hugging Face does it, and safetensors import/export in that layout.
//
// Internally the three attention projections are one fused tensor per layer,
//   esm.encoder.layer.{i}.attention.self.qkv.weight [3H, H] = [query; key; value]  (bias [3H]),
// split and joined on import/export, so one GEMM produces q, k and v.
//
// Tensor and sequence parallelism (Esm2Options::parallel with tp > 1): QKV and FC1 column-parallel
// (rank r holds heads / FFN columns [r*n/tp, (r+1)*n/tp); its qkv shard is [q; k; v] of its heads),
// out-proj and FC2 row-parallel, the vocabulary parallel: the tied embedding / decoder table and
// lm_head.bias split by vocab rows (V padded to Vp, a multiple of tp, with zero rows never trained;
// rank r holds [r*Vp/tp, (r+1)*Vp/tp)), the logits [T, the rank's real columns] and the loss from
// per-row statistics gathered over tp. Communication comes from the autograd pairs of
// parallel/comm_ops.h, inserted by the graph builder; the layers hold no policy.
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/safetensors.h"
#include "core/thd_batch.h"
#include "layers/model_config.h"
#include "layers/parameter.h"
#include "parallel/context.h"
#include "parallel/cp_attention.h"

namespace helix {

// Called by forward() around the transformer layers: begin_forward before the embedding, and
// enter_layer / leave_layer right before and after layer i's segment, each returning x or an
// identity of it (a node whose backward runs right after / before the layer's backward). ZeRO-3
// gathers a layer's parameters there and frees them after (layers/zero_sync.h).
class Esm2LayerHooks {
 public:
  virtual ~Esm2LayerHooks() = default;
  virtual void begin_forward(Tape& tape) = 0;
  virtual Var enter_layer(Tape& tape, int layer, const Var& x) = 0;
  virtual Var leave_layer(Tape& tape, int layer, const Var& x) = 0;
};
class Fp8ScalingManager;

struct Esm2Options {
  Device device;
  DType compute = DType::kF32;  // activations and the model copy of the weights: f32 or bf16
  RecomputePolicy recompute = RecomputePolicy::kNone;
  // Tensor parallelism over parallel->tp() (null or tp = 1: the single-device graph). Data
  // parallelism is the caller's (the model only reads its tp coordinate).
  const ParallelContext* parallel = nullptr;
  // Context parallelism over parallel->cp() (forward with a CpBatch): K/V exchange mode and the
  // trainer's sequence-aware placement threshold (parallel/cp_attention.h).
  CpOptions cp;
  // Sequence parallelism: LayerNorm / residual regions split along T over the tp group (T padded
  // to a multiple of tp with a dummy <pad> sequence that carries no label). Needs tp > 1.
  bool sequence_parallel = false;
  Esm2LayerHooks* layer_hooks = nullptr;  // null: none (ZeRO-3 installs its own)
  // FP8 delayed scaling (layers/fp8_scaling.h): QKV, out-proj, FC1, FC2 run as FP8 GEMMs with the
  // manager's scales, T is padded to a multiple of 16 with a dummy <pad> sequence. Null: no FP8.
  Fp8ScalingManager* fp8 = nullptr;
  // Pipeline parallelism (layers/esm2_pipeline.h): the transformer layers this model holds, as
  // ranges [first, last) of global layer indices, one per model chunk, ascending. Empty: every
  // layer. The embedding is held when a range starts at 0, the final LayerNorm and LM head when one
  // ends at the last layer (the tied embedding / decoder table is then held at both ends).
  std::vector<std::pair<int, int>> layer_ranges;
};

// A part of the forward graph (pipeline parallelism): layers [begin, end) (end < 0: the last
// layer). It starts with the embedding when begin == 0, else from `input`, the activation
// [T, H] ([ceil(T/tp), H] under sequence parallelism) of the layers before; it ends with the LM head
// (logits) when end is the last layer, else returns the activation. Default: the whole model.
struct Esm2Span {
  int begin = 0;
  int end = -1;
  Var input;
};

class Esm2Model {
 public:
  Esm2Model(ModelConfig config, Esm2Options options);

  const ModelConfig& config() const { return config_; }
  const Esm2Options& options() const { return opts_; }
  void set_layer_hooks(Esm2LayerHooks* hooks) { opts_.layer_hooks = hooks; }
  ParameterSet& params() { return params_; }
  const ParameterSet& params() const { return params_; }

  int tp_size() const { return opts_.parallel ? opts_.parallel->sizes().tp : 1; }
  int tp_rank() const { return opts_.parallel ? opts_.parallel->coords().tp : 0; }

  // Hugging Face's _init_weights: Linear and embedding weights ~ N(0, 0.02) (the <pad> row of the
  // embedding zeroed), biases 0, LayerNorm gains 1 and biases 0. Deterministic in `seed`.
  // Under TP every rank draws the full tensor and keeps its shard, so shards equal the slices of
  // the single-device initialisation.
  void init_random(uint64_t seed);

  // Import from / export to the EsmForMaskedLM safetensors layout. Import checks that every tensor the
  // model needs is present with the right shape and names what is missing or wrong.
  void load_hf(const SafetensorsReader& file);
  // Collective over tp (shards are gathered); only world rank 0 writes the file.
  void save_hf(const std::string& path) const;
  // The model's full tensors under Hugging Face names (qkv split), f32, on the CPU. Collective over
  // tp: shards are gathered.
  std::vector<std::pair<std::string, Tensor>> hf_tensors() const;
  // The full (unsharded) f32 CPU tensor of a parameter's master, or of its gradient. Collective over
  // tp for sharded parameters.
  Tensor full_master(const Parameter& p) const;
  Tensor full_grad(const Parameter& p) const;
  // This rank's shard of a full tensor of parameter `p` (f32, CPU).
  Tensor shard_of(const Parameter& p, const Tensor& full) const;

  // Builds the forward graph of one packed batch (on the model's device) and returns the logits
  // [T, vocab] (compute dtype); under TP this rank's vocabulary columns [T, Vr] (pad columns left out).
  // Context parallelism: `batch` is cp->local and the logits are the rank's rows. Pipeline
  // parallelism: `span` picks the layers (Esm2Span).
  Var forward(Tape& tape, const ThdBatch& batch, const CpBatch* cp = nullptr, const Esm2Span& span = {});
  // Masked-LM loss node: returns the loss sum over labelled tokens [1] f32; its gradient is scaled by
  // `grad_scale` (1 / labelled tokens of the whole step, over micro-batches and ranks).
  Var loss(Tape& tape, const Var& logits, const ThdBatch& batch, float grad_scale);

  std::string layer_prefix(int i) const { return "esm.encoder.layer." + std::to_string(i) + "."; }
  // Whether this model holds parameter `name` (always, without layer_ranges).
  bool holds(const std::string& name) const;

 private:
  Var forward_tp(Tape& tape, const ThdBatch& batch, const CpBatch* cp, const Esm2Span& span);
  Tensor gather_shards(const Parameter& p, const Tensor& local) const;

  ModelConfig config_;
  Esm2Options opts_;
  ParameterSet params_;
  std::vector<uint64_t> init_stream_;  // per parameter: its index in the whole model (init RNG stream)
};

}  // namespace helix
