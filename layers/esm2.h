#pragma once
// The ESM-2 masked language model as a graph of fused layers (pre-LayerNorm transformer with rotary
// attention, GELU MLP, tied LM head), its parameters under Hugging Face EsmForMaskedLM names, random
// initialisation as Hugging Face does it, and safetensors import/export in that layout.
//
// Internally the three attention projections are one fused tensor per layer,
//   esm.encoder.layer.{i}.attention.self.qkv.weight [3H, H] = [query; key; value]  (bias [3H]),
// split and joined on import/export, so one GEMM produces q, k and v.
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/safetensors.h"
#include "core/thd_batch.h"
#include "layers/model_config.h"
#include "layers/parameter.h"

namespace helix {

struct Esm2Options {
  Device device;
  DType compute = DType::kF32;  // activations and the model copy of the weights: f32 or bf16
  RecomputePolicy recompute = RecomputePolicy::kNone;
};

class Esm2Model {
 public:
  Esm2Model(ModelConfig config, Esm2Options options);

  const ModelConfig& config() const { return config_; }
  const Esm2Options& options() const { return opts_; }
  ParameterSet& params() { return params_; }
  const ParameterSet& params() const { return params_; }

  // Hugging Face's _init_weights: Linear and embedding weights ~ N(0, 0.02) (the <pad> row of the
  // embedding zeroed), biases 0, LayerNorm gains 1 and biases 0. Deterministic in `seed`.
  void init_random(uint64_t seed);

  // Import from / export to the EsmForMaskedLM safetensors layout. Import checks that every tensor the
  // model needs is present with the right shape and names what is missing or wrong.
  void load_hf(const SafetensorsReader& file);
  void save_hf(const std::string& path) const;
  // The model's tensors under Hugging Face names (qkv split), f32, on the CPU.
  std::vector<std::pair<std::string, Tensor>> hf_tensors() const;

  // Builds the forward graph of one packed batch (on the model's device) and returns the logits
  // [T, vocab] (compute dtype).
  Var forward(Tape& tape, const ThdBatch& batch);
  // Masked-LM loss node: returns the loss sum over labelled tokens [1] f32; its gradient is scaled by
  // `grad_scale` (1 / labelled tokens of the whole step, over micro-batches and ranks).
  Var loss(Tape& tape, const Var& logits, const ThdBatch& batch, float grad_scale);

  std::string layer_prefix(int i) const { return "esm.encoder.layer." + std::to_string(i) + "."; }

 private:
  ModelConfig config_;
  Esm2Options opts_;
  ParameterSet params_;
};

}  // namespace helix
