#include "layers/model_config.h"

#include "core/error.h"

namespace helix {

int64_t ModelConfig::num_params() const {
  const int64_t h = hidden, f = ffn, v = vocab;
  const int64_t per_layer = 4 * (h * h + h)  // q, k, v, out-proj with biases
                            + 2 * 2 * h      // two LayerNorms
                            + h * f + f + f * h + h;
  return v * h                    // embedding (tied with the LM-head decoder)
         + layers * per_layer     //
         + 2 * h                  // final LayerNorm
         + h * h + h + 2 * h + v; // LM head: dense, LayerNorm, output bias
}

int64_t ModelConfig::num_matmul_params() const {
  const int64_t h = hidden, f = ffn, v = vocab;
  return layers * (4 * h * h + 2 * h * f) + h * h + h * v;
}

double ModelConfig::train_flops(const std::vector<int>& seqlens) const {
  double tokens = 0, sq = 0;
  for (int s : seqlens) {
    tokens += s;
    sq += double(s) * s;
  }
  return 6.0 * double(num_matmul_params()) * tokens + 12.0 * double(hidden) * layers * sq;
}

void ModelConfig::validate() const {
  HELIX_CHECK(layers > 0 && hidden > 0 && heads > 0 && ffn > 0 && vocab > 0,
              "model '{}': layers, hidden, heads, ffn and vocab must be positive (got {}, {}, {}, {}, {})", name,
              layers, hidden, heads, ffn, vocab);
  HELIX_CHECK(hidden % heads == 0, "model '{}': hidden {} is not divisible by heads {}", name, hidden, heads);
  HELIX_CHECK(head_dim() % 2 == 0, "model '{}': head dim {} must be even for rotary embeddings", name, head_dim());
  HELIX_CHECK(mask_token_id < vocab && pad_token_id < vocab, "model '{}': special token ids exceed vocab {}", name,
              vocab);
}

namespace {
struct Preset {
  const char* name;
  int layers, hidden, heads, ffn;
};
// ESM-2 (Lin et al. 2023) and an ESM3-scale configuration for scaling studies.
constexpr Preset kPresets[] = {
    {"esm2-8m", 6, 320, 20, 1280},      {"esm2-35m", 12, 480, 20, 1920},
    {"esm2-150m", 30, 640, 20, 2560},   {"esm2-650m", 33, 1280, 20, 5120},
    {"esm2-3b", 36, 2560, 40, 10240},   {"esm2-15b", 48, 5120, 40, 20480},
    {"esm3-98b", 216, 6144, 96, 24576},
};
}  // namespace

ModelConfig model_config(const std::string& name) {
  for (const Preset& p : kPresets) {
    if (name == p.name) {
      ModelConfig c;
      c.name = p.name;
      c.layers = p.layers;
      c.hidden = p.hidden;
      c.heads = p.heads;
      c.ffn = p.ffn;
      return c;
    }
  }
  std::string known;
  for (const Preset& p : kPresets) known += std::string(known.empty() ? "" : ", ") + p.name;
  HELIX_FAIL("--model: unknown model '{}' (known: {}; or give --layers/--hidden/--heads/--ffn)", name, known);
}

std::vector<std::string> model_config_names() {
  std::vector<std::string> n;
  for (const Preset& p : kPresets) n.push_back(p.name);
  return n;
}

}  // namespace helix
