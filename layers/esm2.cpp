#include "layers/esm2.h"

#include "core/random.h"
#include "layers/attention.h"
#include "layers/embedding.h"
#include "layers/layernorm_linear.h"
#include "layers/layernorm_mlp.h"
#include "layers/linear.h"
#include "layers/masked_lm_loss.h"

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

// ---- Forward graph --------------------------------------------------------------------------------
namespace helix {

Var Esm2Model::forward(Tape& tape, const ThdBatch& batch) {
  const ModelConfig& c = config_;
  const float eps = c.layer_norm_eps;
  HELIX_CHECK(batch.tokens.device() == opts_.device, "forward: batch on {}, model on {}", batch.tokens.device().str(),
              opts_.device.str());
  // Captures by value: under recompute a segment's function runs again during backward.
  const ParameterSet* params = &params_;
  const auto w = [params](const std::string& n) -> const Var& { return params->get(n).var; };

  EmbeddingOptions eo;
  eo.token_dropout = c.token_dropout;
  eo.mask_token_id = c.mask_token_id;
  Var x = tape.apply1(std::make_shared<EmbeddingNode>(batch, eo, opts_.compute), {w(kEmbedding)});

  auto attn = std::make_shared<const AttentionInputs>(AttentionInputs::from_batch(batch, c.heads, c.head_dim()));
  for (int i = 0; i < c.layers; ++i) {
    const std::string p = layer_prefix(i);
    auto layer = [w, p, eps, attn](Tape& t, const std::vector<Var>& in) -> std::vector<Var> {
      Var qkv = t.apply1(std::make_shared<LayerNormLinearNode>(eps),
                         {in[0], w(p + "attention.LayerNorm.weight"), w(p + "attention.LayerNorm.bias"),
                          w(p + "attention.self.qkv.weight"), w(p + "attention.self.qkv.bias")});
      Var a = t.apply1(std::make_shared<AttentionNode>(attn), {qkv});
      Var h = t.apply1(std::make_shared<LinearResidualNode>(),
                       {a, w(p + "attention.output.dense.weight"), w(p + "attention.output.dense.bias"), in[0]});
      return {t.apply1(std::make_shared<LayerNormMlpNode>(eps),
                       {h, w(p + "LayerNorm.weight"), w(p + "LayerNorm.bias"), w(p + "intermediate.dense.weight"),
                        w(p + "intermediate.dense.bias"), w(p + "output.dense.weight"), w(p + "output.dense.bias")})};
    };
    x = tape.segment("layer" + std::to_string(i), layer, {x})[0];
  }
  x = tape.apply1(std::make_shared<LayerNormNode>(eps), {x, w(kFinalLnW), w(kFinalLnB)});
  return tape.apply1(std::make_shared<LmHeadNode>(eps),
                     {x, w("lm_head.dense.weight"), w("lm_head.dense.bias"), w("lm_head.layer_norm.weight"),
                      w("lm_head.layer_norm.bias"), w(kEmbedding), w("lm_head.bias")});
}

Var Esm2Model::loss(Tape& tape, const Var& logits, const ThdBatch& batch, float grad_scale) {
  return tape.apply(std::make_shared<MaskedLmLossNode>(batch.labels, grad_scale), {logits})[0];
}

}  // namespace helix
