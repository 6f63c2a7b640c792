// End-to-end parity with the reference implementation: a golden file written by
// examples/parity/make_golden.py from transformers' EsmForMaskedLM (float64) holds the weights, a packed
// batch of real proteins, the logits, the loss, every parameter gradient and the losses of 3 AdamW
// steps. helix loads the weights through its Hugging Face importer and runs the real training path:
// on the CPU in f32 (tight tolerances), and on a GPU in bf16 (bf16 tolerances).
#include <gtest/gtest.h>

#include <cmath>

#include "core/json.h"
#include "core/safetensors.h"
#include "layers/esm2.h"
#include "layers/optimizer.h"
#include "test_util.h"

namespace helix {
namespace {

const std::string kGolden = std::string(HELIX_SOURCE_DIR) + "/tests/data/esm2_golden.safetensors";

ModelConfig golden_config(const SafetensorsReader& f) {
  const Json j = Json::parse(f.metadata().at("config"), "golden config");
  ModelConfig c;
  c.name = "golden";
  c.layers = static_cast<int>(j.at("num_hidden_layers").as_int());
  c.hidden = static_cast<int>(j.at("hidden_size").as_int());
  c.heads = static_cast<int>(j.at("num_attention_heads").as_int());
  c.ffn = static_cast<int>(j.at("intermediate_size").as_int());
  c.vocab = static_cast<int>(j.at("vocab_size").as_int());
  c.layer_norm_eps = static_cast<float>(j.at("layer_norm_eps").as_double());
  c.token_dropout = j.at("token_dropout").as_bool();
  return c;
}

ThdBatch golden_batch(const SafetensorsReader& f, Device d) {
  ThdBatch b;
  b.tokens = f.load("batch.input_ids");
  b.labels = f.load("batch.labels");
  b.cu_seqlens = f.load("batch.cu_seqlens");
  b.cu_seqlens_padded = b.cu_seqlens;
  const std::vector<int32_t> cu = b.cu_seqlens.to_vector<int32_t>();
  for (size_t i = 0; i + 1 < cu.size(); ++i) b.max_seqlen = std::max(b.max_seqlen, cu[i + 1] - cu[i]);
  b.num_tokens = cu.back();
  for (int32_t l : b.labels.to_vector<int32_t>()) b.num_labels += l != -100;
  return b.to(d);
}

// max |a - b| / max |b| over a tensor: a scale-aware error.
double rel_err(const Tensor& a, const Tensor& b) {
  const std::vector<float> x = a.to_floats(), y = b.to_floats();
  double num = 0, den = 1e-30;
  for (size_t i = 0; i < x.size(); ++i) {
    num = std::max(num, std::abs(double(x[i]) - double(y[i])));
    den = std::max(den, std::abs(double(y[i])));
  }
  return num / den;
}

struct ParityTolerance {
  double logits, loss, grad, step_loss;
};

void run_parity(Device device, DType compute, ParityTolerance tol) {
  SafetensorsReader f(kGolden);
  const ModelConfig cfg = golden_config(f);
  Esm2Model model(cfg, Esm2Options{.device = device, .compute = compute});
  model.load_hf(f);
  const ThdBatch batch = golden_batch(f, device);
  const Stream stream = device.is_cuda() ? Stream::cuda_default() : Stream();

  TapeOptions to;
  to.stream = stream;
  Tape tape(to);
  Var logits = model.forward(tape, batch);
  EXPECT_LT(rel_err(logits.data().to(DType::kF32), f.load("out.logits")), tol.logits) << "logits";
  const float scale = 1.0f / static_cast<float>(batch.num_labels);
  Var loss = model.loss(tape, logits, batch, scale);
  const double mean = loss.data().to_floats()[0] * scale;
  const double want = f.load("out.loss").to_floats()[0];
  EXPECT_NEAR(mean, want, tol.loss * want) << "loss";
  tape.backward(loss);

  // Every parameter gradient, under Hugging Face names (qkv split into query/key/value).
  const int64_t h = cfg.hidden;
  int checked = 0;
  for (const Parameter& p : model.params().all()) {
    const Tensor g = p.grad().to(Device::cpu());
    const auto qkv = p.name.find("attention.self.qkv.");
    if (qkv == std::string::npos) {
      EXPECT_LT(rel_err(g, f.load("grad." + p.name)), tol.grad) << p.name;
      ++checked;
      continue;
    }
    const std::string prefix = p.name.substr(0, qkv) + "attention.self.";
    const std::string kind = p.name.substr(qkv + std::string("attention.self.qkv.").size());
    const char* parts[] = {"query", "key", "value"};
    for (int j = 0; j < 3; ++j) {
      EXPECT_LT(rel_err(g.slice(j * h, (j + 1) * h), f.load("grad." + prefix + parts[j] + "." + kind)), tol.grad)
          << prefix << parts[j] << "." << kind;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 16 * cfg.layers + 8);

  // Three AdamW steps (the optimizer of make_golden.py: no clipping, decay on matrices only).
  const std::vector<float> losses = f.load("out.step_losses").to_floats();
  AdamW opt(model.params(), AdamWConfig{.beta1 = 0.9, .beta2 = 0.98, .eps = 1e-8, .weight_decay = 0.01, .clip_norm = 0});
  ASSERT_TRUE(opt.step(1e-3, true, stream).applied);
  for (size_t s = 1; s < losses.size(); ++s) {
    model.params().zero_grads(stream);
    Tape t(to);
    Var lg = model.forward(t, batch);
    Var l = model.loss(t, lg, batch, scale);
    const double m = l.data().to_floats()[0] * scale;
    EXPECT_NEAR(m, losses[s], tol.step_loss * losses[s]) << "loss after AdamW step " << s;
    if (s + 1 < losses.size()) {
      t.backward(l);
      ASSERT_TRUE(opt.step(1e-3, true, stream).applied);
    }
  }
}

TEST(HfParity, CpuF32MatchesTransformers) {
  run_parity(Device::cpu(), DType::kF32, {.logits = 5e-6, .loss = 2e-6, .grad = 1e-5, .step_loss = 1e-5});
}

TEST(HfParityGpu, CudaBf16MatchesTransformers) {
  HELIX_REQUIRE_CUDA();
  run_parity(Device::cuda(), DType::kBF16, {.logits = 3e-2, .loss = 5e-3, .grad = 6e-2, .step_loss = 1e-2});
}

}  // namespace
}  // namespace helix
