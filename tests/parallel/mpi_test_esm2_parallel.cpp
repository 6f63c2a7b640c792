// Tensor, sequence and data parallelism of the ESM-2 model on CPU ranks: loss, every gradient
// (gathered to full shape), the gradient norm and the parameters after 3 AdamW steps equal one rank
// running the same global batch (all dp shards as micro-batches of one step); sharded
// initialisation equals the slice of the single-device one. The vocabulary is sharded over tp (33
// rows padded to 34 or 36): each rank's logits equal its columns of the single-rank logits, and the
// pad rows of the table stay zero through training.
#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <cmath>
#include <cstdint>
#include <vector>

#include "esm2_test_batch.h"
#include "layers/esm2.h"
#include "layers/grad_sync.h"
#include "layers/optimizer.h"
#include "mpi_test_util.h"

namespace helix {
namespace {

ModelConfig tiny_config() { return testing::tiny_esm2_config(); }

// A packed batch of 3 proteins (odd total T, so SP pads) for data shard `shard` of step `step`.
ThdBatch make_batch(int step, int shard) {
  return testing::synthetic_esm2_batch({7 + shard, 12 - step, 6 + 2 * shard + step},
                                       0x9E3779B97F4A7C15ull * static_cast<uint64_t>(1 + step * 7 + shard), 25,
                                       Device::cpu());
}

// max |a - b| <= tol * max(max |b|, 1e-3): relative to the tensor's scale (fp32 sums in another order).
void expect_close(const Tensor& got, const Tensor& want, double tol, const std::string& what) {
  ASSERT_EQ(got.shape(), want.shape()) << what;
  const std::vector<float> g = got.to_floats(), w = want.to_floats();
  double diff = 0, scale = 1e-3;
  for (size_t i = 0; i < g.size(); ++i) {
    diff = std::max(diff, std::abs(double(g[i]) - double(w[i])));
    scale = std::max(scale, std::abs(double(w[i])));
  }
  EXPECT_LE(diff, tol * scale) << what << ": max abs difference " << diff << ", scale " << scale;
}

// Vocabulary parallel: rank r of tp holds rows [r*Vp/tp, (r+1)*Vp/tp) of the tied table and of
// lm_head.bias, Vp = the vocabulary padded to a multiple of tp, the pad rows zero. Checked with plain
// index loops against the single-rank tensor; `pad_only` checks just that the pad rows are zero.
void expect_vocab_shard(const Esm2Model& par, const Esm2Model& ref, const std::string& name, bool pad_only) {
  const int tp = par.tp_size(), r = par.tp_rank();
  const Tensor got = par.params().get(name).master, want = ref.params().get(name).master;
  const int64_t v = want.dim(0), vp = (v + tp - 1) / tp * tp, rows = vp / tp, width = want.numel() / v;
  ASSERT_EQ(got.dim(0), rows) << name;
  const std::vector<float> g = got.to_floats(), w = want.to_floats();
  int64_t bad = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = r * rows + i;
    if (pad_only && row < v) continue;
    for (int64_t j = 0; j < width; ++j) bad += g[i * width + j] != (row < v ? w[row * width + j] : 0.f);
  }
  EXPECT_EQ(bad, 0) << name << " on tp rank " << r << (pad_only ? ": pad rows not zero" : ": not the row slice");
}

struct Layout {
  int tp = 1;
  bool sp = false;
};

constexpr double kLr = 1e-3;

void run_equivalence(Layout layout) {
  const int world = testing::world_size();
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = layout.tp});
  const int dp = ctx.sizes().dp, my_dp = ctx.coords().dp;
  const ModelConfig cfg = tiny_config();
  const uint64_t seed = 7;
  ASSERT_EQ(dp * layout.tp, world);

  Esm2Model ref(cfg, Esm2Options{.device = Device::cpu(), .compute = DType::kF32});
  ref.init_random(seed);
  Esm2Options po{.device = Device::cpu(), .compute = DType::kF32};
  po.parallel = &ctx;
  po.sequence_parallel = layout.sp;
  Esm2Model par(cfg, po);
  par.init_random(seed);
  for (size_t i = 0; i < par.params().all().size(); ++i) {  // sharded init == slice, bitwise
    const Parameter& p = par.params().all()[i];
    expect_close(p.master, par.shard_of(p, ref.params().all()[i].master), 0.0, "init of " + p.name);
  }
  for (const char* name : {"esm.embeddings.word_embeddings.weight", "lm_head.bias"})
    expect_vocab_shard(par, ref, name, /*pad_only=*/false);

  const AdamWConfig acfg{.weight_decay = 0.01, .clip_norm = 0.05};  // small clip: the norm matters
  AdamW ref_opt(ref.params(), acfg);
  AdamW par_opt(par.params(), acfg);
  GradSync sync(par.params(), &ctx);
  const Stream stream;
  for (int step = 0; step < 3; ++step) {
    // Reference: the whole global batch (every dp shard) as micro-batches on one rank.
    int64_t labels = 0;
    for (int d = 0; d < dp; ++d) labels += make_batch(step, d).num_labels;
    const float scale = 1.0f / static_cast<float>(labels);
    ref.params().zero_grads(stream);
    double ref_loss = 0;
    Tensor ref_logits;  // [T, V] of this rank's dp shard
    for (int d = 0; d < dp; ++d) {
      const ThdBatch b = make_batch(step, d);
      Tape tape;
      Var logits = ref.forward(tape, b);
      if (d == my_dp) ref_logits = logits.data().clone();
      Var loss = ref.loss(tape, logits, b, scale);
      tape.backward(loss);
      ref_loss += loss.data().to_floats()[0];
    }
    // Parallel: this rank's dp shard; labelled tokens and loss summed over dp.
    const ThdBatch b = make_batch(step, my_dp);
    Tensor count = Tensor::from_floats({static_cast<float>(b.num_labels)}, Shape{1}, DType::kF32);
    sync.sum_over_dp(count, stream);
    ASSERT_EQ(count.to_floats()[0], static_cast<float>(labels));
    sync.zero_grads(stream);
    Tape tape;
    Var logits = par.forward(tape, b);
    {  // this rank's logits: the columns of its real vocabulary rows
      const int64_t v = cfg.vocab, rows = (v + layout.tp - 1) / layout.tp, start = ctx.coords().tp * rows;
      const int64_t cols = std::min(v - start, rows), t = ref_logits.dim(0);
      const std::vector<float> w = ref_logits.to_floats();
      std::vector<float> mine;
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < cols; ++j) mine.push_back(w[i * v + start + j]);
      expect_close(logits.data(), Tensor::from_floats(mine, Shape{t, cols}, DType::kF32), step == 0 ? 1e-5 : 1e-3,
                   "logits of step " + std::to_string(step));
    }
    Var loss = par.loss(tape, logits, b, 1.0f / count.to_floats()[0]);
    tape.backward(loss);
    Tensor loss_sum = loss.data().clone();
    sync.sum_over_dp(loss_sum, stream);
    sync.reduce(stream);
    expect_close(loss_sum, Tensor::from_floats({static_cast<float>(ref_loss)}, Shape{1}, DType::kF32), 1e-5,
                 "loss of step " + std::to_string(step));
    for (size_t i = 0; i < par.params().all().size(); ++i) {
      const Parameter& p = par.params().all()[i];
      // Step 0 starts from bitwise-equal weights; later steps from weights that AdamW moved apart by
      // a little (its update is ~lr * sign(g) where g is tiny and summed in another order).
      expect_close(par.full_grad(p), ref.params().all()[i].grad(), step == 0 ? 1e-4 : 1e-3,
                   "gradient of " + p.name + " at step " + std::to_string(step));
    }
    const OptimizerStepResult rr = ref_opt.step(kLr, true, stream);
    const OptimizerStepResult pr = par_opt.step(kLr, true, stream, sync.norm_reduce());
    ASSERT_TRUE(rr.applied && pr.applied);
    EXPECT_NEAR(pr.grad_norm, rr.grad_norm, 1e-5 * rr.grad_norm) << "step " << step;
  }
  for (size_t i = 0; i < par.params().all().size(); ++i) {
    const Parameter& p = par.params().all()[i];
    const Tensor got = par.full_master(p), want = ref.params().all()[i].master;
    const std::vector<float> g = got.to_floats(), w = want.to_floats();
    double diff = 0;
    for (size_t j = 0; j < g.size(); ++j) diff = std::max(diff, std::abs(double(g[j]) - double(w[j])));
    // Each AdamW update moves an element by at most ~lr: allow 1% of one update.
    EXPECT_LE(diff, 0.01 * kLr) << "parameter " << p.name << " after 3 steps";
  }
  for (const char* name : {"esm.embeddings.word_embeddings.weight", "lm_head.bias"})
    expect_vocab_shard(par, ref, name, /*pad_only=*/true);
}

TEST(Esm2Parallel, DataParallelEqualsOneRank) { run_equivalence({.tp = 1}); }  // DP=2 / DP=4

TEST(Esm2Parallel, TensorParallelEqualsOneRank) {  // TP=2 (x DP=2 on 4 ranks)
  run_equivalence({.tp = 2});
}

TEST(Esm2Parallel, SequenceParallelEqualsOneRank) {  // TP=2 + SP (x DP=2 on 4 ranks)
  run_equivalence({.tp = 2, .sp = true});
}

TEST(Esm2Parallel, TensorParallelOverFourRanks) {
  if (testing::world_size() != 4) GTEST_SKIP() << "needs 4 ranks";
  run_equivalence({.tp = 4, .sp = true});
}

// Hugging Face export under TP gathers the vocabulary shards (pad rows dropped) into the single-rank
// tensors; import slices them back into padded shards.
TEST(Esm2Parallel, HfExportImportGathersAndSlicesVocabRows) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = testing::world_size()});
  const ModelConfig cfg = tiny_config();
  Esm2Model ref(cfg, Esm2Options{.device = Device::cpu(), .compute = DType::kF32});
  ref.init_random(11);
  Esm2Options po{.device = Device::cpu(), .compute = DType::kF32};
  po.parallel = &ctx;
  Esm2Model par(cfg, po);
  par.init_random(11);
  const auto want = ref.hf_tensors();
  const auto got = par.hf_tensors();
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].first, want[i].first);
    expect_close(got[i].second, want[i].second, 0.0, "export of " + got[i].first);
  }
  // Import: every rank reads the file rank 0 wrote from the single-rank model.
  // One name per source tree and world size (the np2 and np4 runs hold one lock).
  const std::string path = "/tmp/helix_vocab_tp_" + std::to_string(std::hash<std::string>{}(HELIX_SOURCE_DIR)) + "_" +
                           std::to_string(ctx.world_size()) + ".safetensors";
  if (ctx.world_rank() == 0) ref.save_hf(path);
  ctx.world().barrier();
  Esm2Model loaded(cfg, po);
  loaded.load_hf(SafetensorsReader(path));
  ctx.world().barrier();
  if (ctx.world_rank() == 0) std::remove(path.c_str());
  for (const char* name : {"esm.embeddings.word_embeddings.weight", "lm_head.bias"})
    expect_vocab_shard(loaded, ref, name, /*pad_only=*/false);
}

TEST(Esm2Parallel, BadCombinationsRefusedNamingTheFlag) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = testing::world_size()});
  ModelConfig c = tiny_config();
  c.heads = 3 * testing::world_size() + 1;
  c.hidden = 4 * c.heads;
  Esm2Options o{.device = Device::cpu(), .compute = DType::kF32};
  o.parallel = &ctx;
  const auto expect_refused = [](const ModelConfig& cfg, const Esm2Options& opts, const std::string& flag) {
    try {
      Esm2Model m(cfg, opts);
      ADD_FAILURE() << "expected a refusal naming " << flag;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(flag), std::string::npos) << e.what();
    }
  };
  expect_refused(c, o, "--tp");
  ParallelContext one = testing::make_context(ParallelSizes{.tp = 1});
  o.parallel = &one;
  o.sequence_parallel = true;
  expect_refused(tiny_config(), o, "--sequence-parallel");
}

}  // namespace
}  // namespace helix
