#include "layers/esm2.h"

#include "core/random.h"

namespace helix {

namespace {
constexpr const char* kEmbedding = "esm.embeddings.word_embeddings.weight";
constexpr const char* kFinalLnW = "esm.encoder.emb_layer_norm_after.weight";
constexpr const char* kFinalLnB = "esm.encoder.emb_layer_norm_after.bias";
}  // namespace

Esm2Model::Esm2Model(ModelConfig config, Esm2Options options) : config_(std::move(config)), opts_(options) {
  config_.validate();
  const int64_t h = config_.hidden, f = config_.ffn, v = config_.vocab;
  const Device d = opts_.device;
  const DType c = opts_.compute;
  params_.add(kEmbedding, {v, h}, true, d, c);
  for (int i = 0; i < config_.layers; ++i) {
    const std::string p = layer_prefix(i);
    params_.add(p + "attention.LayerNorm.weight", {h}, false, d, c);
    params_.add(p + "attention.LayerNorm.bias", {h}, false, d, c);
    params_.add(p + "attention.self.qkv.weight", {3 * h, h}, true, d, c);
    params_.add(p + "attention.self.qkv.bias", {3 * h}, false, d, c);
    params_.add(p + "attention.output.dense.weight", {h, h}, true, d, c);
    params_.add(p + "attention.output.dense.bias", {h}, false, d, c);
    params_.add(p + "LayerNorm.weight", {h}, false, d, c);
    params_.add(p + "LayerNorm.bias", {h}, false, d, c);
    params_.add(p + "intermediate.dense.weight", {f, h}, true, d, c);
    params_.add(p + "intermediate.dense.bias", {f}, false, d, c);
    params_.add(p + "output.dense.weight", {h, f}, true, d, c);
    params_.add(p + "output.dense.bias", {h}, false, d, c);
  }
  params_.add(kFinalLnW, {h}, false, d, c);
  params_.add(kFinalLnB, {h}, false, d, c);
  params_.add("lm_head.dense.weight", {h, h}, true, d, c);
  params_.add("lm_head.dense.bias", {h}, false, d, c);
  params_.add("lm_head.layer_norm.weight", {h}, false, d, c);
  params_.add("lm_head.layer_norm.bias", {h}, false, d, c);
  params_.add("lm_head.bias", {v}, false, d, c);
  HELIX_CHECK(params_.num_elements() == config_.num_params(), "model '{}': {} parameters created, config says {}",
              config_.name, params_.num_elements(), config_.num_params());
}

void Esm2Model::init_random(uint64_t seed) {
  uint64_t sub = 0;
  for (Parameter& p : params_.all()) {
    const std::string& n = p.name;
    const bool is_norm = n.find("LayerNorm") != std::string::npos || n.find("layer_norm") != std::string::npos ||
                         n.find("emb_layer_norm") != std::string::npos;
    Tensor host = Tensor::empty(p.master.shape(), DType::kF32);
    if (is_norm && n.ends_with(".weight")) {
      host.fill(1.0);
    } else if (n.ends_with(".bias")) {
      host.zero();
    } else {
      fill_normal(host, seed, sub, 0.0f, 0.02f);
      if (n == kEmbedding) {  // padding_idx row
        const int64_t h = config_.hidden;
        for (int64_t j = 0; j < h; ++j) host.data<float>()[config_.pad_token_id * h + j] = 0.f;
      }
    }
    ++sub;
    p.master.copy_from(host, Stream());
  }
  params_.sync_model_copies(Stream());
}

std::vector<std::pair<std::string, Tensor>> Esm2Model::hf_tensors() const {
  std::vector<std::pair<std::string, Tensor>> out;
  const int64_t h = config_.hidden;
  for (const Parameter& p : params_.all()) {
    Tensor host = p.master.to(Device::cpu());
    const auto qkv = p.name.find("attention.self.qkv.");
    if (qkv == std::string::npos) {
      out.emplace_back(p.name, host);
      continue;
    }
    const std::string prefix = p.name.substr(0, qkv) + "attention.self.";
    const std::string kind = p.name.substr(qkv + std::string("attention.self.qkv.").size());  // weight | bias
    const char* parts[] = {"query", "key", "value"};
    for (int j = 0; j < 3; ++j) out.emplace_back(prefix + parts[j] + "." + kind, host.slice(j * h, (j + 1) * h).clone());
  }
  // The tied decoder, so that transformers finds every weight it expects.
  out.emplace_back("lm_head.decoder.weight", params_.get(kEmbedding).master.to(Device::cpu()));
  return out;
}

void Esm2Model::save_hf(const std::string& path) const {
  save_safetensors(path, hf_tensors(), {{"format", "pt"}, {"helix_model", config_.name}});
}

void Esm2Model::load_hf(const SafetensorsReader& file) {
  const int64_t h = config_.hidden;
  const auto load_f32 = [&](const std::string& name, const Shape& shape) {
    HELIX_CHECK(file.has(name), "'{}': tensor '{}' is missing (not an ESM-2 checkpoint, or another model size?)",
                file.path(), name);
    const SafetensorsEntry& e = file.entry(name);
    HELIX_CHECK(e.shape == shape, "'{}': tensor '{}' has shape {}, model '{}' needs {}", file.path(), name,
                e.shape.str(), config_.name, shape.str());
    Tensor t = file.load(name);
    return t.dtype() == DType::kF32 ? t : t.to(DType::kF32);
  };
  for (Parameter& p : params_.all()) {
    const auto qkv = p.name.find("attention.self.qkv.");
    if (qkv == std::string::npos) {
      p.master.copy_from(load_f32(p.name, p.master.shape()), Stream());
      continue;
    }
    const std::string prefix = p.name.substr(0, qkv) + "attention.self.";
    const std::string kind = p.name.substr(qkv + std::string("attention.self.qkv.").size());
    const bool is_weight = kind == "weight";
    Tensor joined = Tensor::empty(p.master.shape(), DType::kF32);
    const char* parts[] = {"query", "key", "value"};
    for (int j = 0; j < 3; ++j) {
      Tensor part = load_f32(prefix + parts[j] + "." + kind, is_weight ? Shape{h, h} : Shape{h});
      Tensor dst = joined.slice(j * h, (j + 1) * h);
      dst.copy_from(part);
    }
    p.master.copy_from(joined, Stream());
  }
  params_.sync_model_copies(Stream());
}

}  // namespace helix
