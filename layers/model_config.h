#pragma once
// Model shapes: the published ESM-2 configurations, the esm3-98b scaling configuration, and custom
// shapes. Parameter and FLOP counts live here so the trainer (MFU) and `helix plan` agree.
#include <cstdint>
#include <string>
#include <vector>

namespace helix {

struct ModelConfig {
  std::string name;
  int layers = 0;
  int hidden = 0;
  int heads = 0;
  int ffn = 0;                    // intermediate size of the MLP
  int vocab = 33;                 // ESM alphabet
  int max_positions = 1026;       // 1022 residues + <cls> + <eos>
  float layer_norm_eps = 1e-5f;
  bool token_dropout = true;      // ESM-2's rescaling of embeddings by the observed mask ratio
  int mask_token_id = 32;
  int pad_token_id = 1;

  int head_dim() const { return hidden / heads; }
  // Total parameters (the LM-head decoder is tied to the embedding and counted once).
  int64_t num_params() const;
  // Parameters that take part in GEMMs per token (QKV, out-proj, FC1, FC2, LM-head dense and decoder).
  int64_t num_matmul_params() const;
  // Model FLOPs of one training step (forward + backward = 3x forward) for a packed batch with
  // sequence lengths `seqlens`: 6 * matmul params per token plus attention 12 * H * s^2 per sequence
  // and layer (QK^T and PV, 2 FLOPs per multiply-add, forward + 2x backward). No recompute counted.
  double train_flops(const std::vector<int>& seqlens) const;
  // Checks divisibility rules and ranges; throws helix::Error naming the field.
  void validate() const;
};

// Presets: esm2-8m, esm2-35m, esm2-150m, esm2-650m, esm2-3b, esm2-15b, esm3-98b.
ModelConfig model_config(const std::string& name);
std::vector<std::string> model_config_names();

}  // namespace helix
