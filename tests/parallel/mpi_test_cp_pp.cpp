// Context parallelism under pipeline parallelism (CPU ranks): PP=2 x CP=2 on 4 ranks. Every stage
// shards the same padded micro-batch with cp_split_batch; the activation between stages is the
// rank's local rows (both ends share the cp coordinate and so the row count); the last stage's
// loss is summed over cp and the gradients over dp x cp (GradSync), as without pipelining.
// Against one rank running the same micro-batches unpadded and unsharded: the loss, every gradient,
// the gradient norm and the parameters after two AdamW steps; with every sequence chunked
// (split_min_len 0) and with sequence-aware placement (short sequences whole on one cp rank, so
// the two cp ranks exchange different row counts), 1F1B and interleaved.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "esm2_test_batch.h"
#include "layers/esm2.h"
#include "layers/esm2_pipeline.h"
#include "layers/grad_sync.h"
#include "layers/optimizer.h"
#include "mpi_test_util.h"

namespace helix {
namespace {

ModelConfig cp_pp_config(int layers) {
  ModelConfig c;
  c.name = "tiny-cp-pp";
  c.layers = layers;
  c.hidden = 64;
  c.heads = 4;
  c.ffn = 128;
  return c;
}

constexpr int64_t kBudget = 40;  // the largest micro-batch has 33 tokens

ThdBatch make_micro(int step, int mb) {
  return testing::synthetic_esm2_batch({5 + mb % 4, 13 - step + mb % 3, 6 + (mb * 5) % 9},
                                       0x9E3779B97F4A7C15ull * static_cast<uint64_t>(3 + step * 131 + mb * 17), 25,
                                       Device::cpu());
}

double max_rel(const Tensor& got, const Tensor& want) {
  const std::vector<float> g = got.to_floats(), w = want.to_floats();
  double diff = 0, scale = 1e-3;
  for (size_t i = 0; i < g.size(); ++i) {
    diff = std::max(diff, std::abs(double(g[i]) - double(w[i])));
    scale = std::max(scale, std::abs(double(w[i])));
  }
  return diff / scale;
}

struct CpPipeCase {
  int virtual_stages = 1;
  int layers = 3;
  std::vector<int> split;
  int32_t split_min_len = 0;
  int micro_batches = 4;
};

void run_cp_pipeline(const CpPipeCase& pc) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.cp = 2, .pp = 2});
  const ModelConfig cfg = cp_pp_config(pc.layers);
  const uint64_t seed = 7;
  Esm2Model ref(cfg, Esm2Options{.device = Device::cpu(), .compute = DType::kF32});
  ref.init_random(seed);
  Esm2Options po{.device = Device::cpu(), .compute = DType::kF32};
  po.parallel = &ctx;
  po.cp = CpOptions{.comm = CpComm::kRing, .split_min_len = pc.split_min_len};
  po.layer_ranges = pipeline_layer_ranges(pc.split, 2, ctx.coords().pp);
  Esm2Model stage(cfg, po);
  stage.init_random(seed);
  Esm2Pipeline pipe(stage, ctx,
                    Esm2PipelineOptions{.virtual_stages = pc.virtual_stages,
                                        .token_budget = kBudget,
                                        .layers_per_stage = pc.split});
  // The premise of the sequence-aware case: the two cp ranks hold different row counts, and the
  // row count varies over the micro-batches (so no fixed message shape would do).
  if (pc.split_min_len > 0) {
    bool unequal = false;
    for (int m = 0; m < pc.micro_batches; ++m) {
      const ThdBatch b = pad_thd_batch(make_micro(0, m), kBudget, cfg.pad_token_id);
      const CpShardOptions so{.split_min_len = pc.split_min_len, .pad_id = cfg.pad_token_id};
      unequal |= cp_split_batch(b, 2, 0, so).local.total_tokens() != cp_split_batch(b, 2, 1, so).local.total_tokens();
    }
    EXPECT_TRUE(unequal) << "expected unequal local row counts over the cp ranks";
  }
  const AdamWConfig acfg{.weight_decay = 0.01, .clip_norm = 0.05};
  AdamW ref_opt(ref.params(), acfg);
  AdamW opt(stage.params(), acfg);
  GradSync sync(stage.params(), &ctx);
  constexpr double kLr = 1e-3;
  for (int step = 0; step < 2; ++step) {
    const std::string at = " at step " + std::to_string(step);
    std::vector<ThdBatch> micro;
    int64_t labels = 0;
    for (int m = 0; m < pc.micro_batches; ++m) {
      micro.push_back(make_micro(step, m));
      labels += micro.back().num_labels;
    }
    const float scale = 1.0f / static_cast<float>(labels);
    ref.params().zero_grads(Stream());
    double ref_loss = 0;
    for (const ThdBatch& b : micro) {
      Tape tape;
      Var loss = ref.loss(tape, ref.forward(tape, b), b, scale);
      tape.backward(loss);
      ref_loss += loss.data().to_floats()[0];
    }
    sync.zero_grads(Stream());
    const double loss = pipe.train_step(micro, scale, Stream());
    sync.reduce(Stream());
    EXPECT_NEAR(loss, ref_loss, 1e-5 * std::abs(ref_loss)) << "loss" << at;
    for (const Parameter& p : stage.params().all())
      EXPECT_LE(max_rel(stage.full_grad(p), ref.params().get(p.name).grad()), 1e-4)
          << "gradient of " << p.name << at;
    const OptimizerStepResult rr = ref_opt.step(kLr, true, Stream());
    const OptimizerStepResult pr = opt.step(kLr, true, Stream(), pipe.norm_reduce(sync.norm_reduce()));
    EXPECT_TRUE(rr.applied && pr.applied);
    EXPECT_NEAR(pr.grad_norm, rr.grad_norm, 1e-5 * rr.grad_norm) << "gradient norm" << at;
    if (!testing::all_ranks(!::testing::Test::HasFailure())) return;
  }
  for (const Parameter& p : stage.params().all()) {
    const std::vector<float> g = stage.full_master(p).to_floats(), w = ref.params().get(p.name).master.to_floats();
    double diff = 0;
    for (size_t j = 0; j < g.size(); ++j) diff = std::max(diff, std::abs(double(g[j]) - double(w[j])));
    EXPECT_LE(diff, 0.01 * kLr) << "parameter " << p.name << " after 2 steps";
  }
}

TEST(CpPipeline, OneFOneBEverySequenceChunked) {
  if (testing::world_size() != 4) GTEST_SKIP() << "needs 4 ranks (pp 2 x cp 2)";
  run_cp_pipeline({.split = {2, 1}});
}

TEST(CpPipeline, OneFOneBSequenceAwarePlacement) {  // short sequences whole: unequal local rows
  if (testing::world_size() != 4) GTEST_SKIP() << "needs 4 ranks (pp 2 x cp 2)";
  run_cp_pipeline({.split = {2, 1}, .split_min_len = 12});
}

TEST(CpPipeline, InterleavedTwoChunks) {
  if (testing::world_size() != 4) GTEST_SKIP() << "needs 4 ranks (pp 2 x cp 2)";
  run_cp_pipeline({.virtual_stages = 2, .layers = 5, .split = {2, 1, 1, 1}});
}

}  // namespace
}  // namespace helix
