// FP8 delayed scaling under pipeline parallelism (CPU ranks, FP8 emulated): each stage's FP8 GEMMs
// use its own Fp8ScalingManager's slots of the layers it holds, update() runs once per step after
// the pipeline's last backward, the amax group stays within a stage (tp x cp x dp). Against one
// rank running the same micro-batches through the whole FP8 model (unpadded; the model pads each to
// a multiple of 16): the loss, every gradient, and the scales, scale-inverses and histories of every
// layer the stage holds equal to the single-rank manager's for that layer (layers it does not hold
// keep scale 1 and an empty history; bitwise where the data path is, see Fp8PipeCase), over 3 steps with AdamW updates in between (step 0 runs at
// scale 1, steps 1 and 2 at the calibrated scales). Cases: 1F1B over 2 and 4 stages, interleaved
// 2 x 2 chunks, PP=2 x DP=2 (amax group over dp), PP=2 x TP=2 with sequence parallelism.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "esm2_test_batch.h"
#include "layers/esm2.h"
#include "layers/esm2_pipeline.h"
#include "layers/fp8_scaling.h"
#include "layers/grad_sync.h"
#include "layers/optimizer.h"
#include "mpi_test_util.h"

namespace helix {
namespace {

ModelConfig fp8_pp_config(int layers) {
  ModelConfig c;
  c.name = "tiny-fp8-pp";
  c.layers = layers;
  c.hidden = 64;
  c.heads = 4;
  c.ffn = 128;
  return c;
}

// The pipeline's token budget: 34 tokens, rounded up by the pipeline to 48 (multiple of 16).
constexpr int64_t kBudget = 34;

// Micro-batch `mb` of data shard `shard` at step `step`: 3 proteins, 17..33 tokens, never a
// multiple of 16 (so the single-rank FP8 model pads every micro-batch too: the padding tokens'
// activations enter both runs' amaxes alike, see below).
ThdBatch make_micro(int step, int mb, int shard) {
  std::vector<int> lens{5 + (mb + shard) % 4, 9 - step + mb % 3, 6 + 2 * shard + (mb * 5) % 7};
  int t = 0;
  for (int l : lens) t += l;
  if (t % 16 == 0) ++lens[0];
  return testing::synthetic_esm2_batch(
      lens, 0xA0761D6478BD642Full * static_cast<uint64_t>(1 + step * 131 + mb * 17 + shard), 25,
      Device::cpu());
}

Fp8ScalingOptions fp8_options(int layers, Communicator* group) {
  Fp8ScalingOptions o;
  o.recipe.amax_history_len = 4;
  o.layers = layers;
  o.device = Device::cpu();
  o.amax_group = group;
  return o;
}

double rel_l2(const Tensor& got, const Tensor& want) {
  const std::vector<float> g = got.to_floats(), w = want.to_floats();
  double d2 = 0, w2 = 1e-30;
  for (size_t i = 0; i < g.size(); ++i) {
    d2 += (double(g[i]) - w[i]) * (double(g[i]) - w[i]);
    w2 += double(w[i]) * w[i];
  }
  return std::sqrt(d2 / w2);
}

struct Fp8PipeCase {
  int pp = 2;
  int tp = 1;
  int virtual_stages = 1;
  int layers = 4;
  std::vector<int> split;  // empty: esm2_pipeline_split
  int micro_batches = 3;
  bool sp = false;
  // Step 0 (tp = 1): every FP8 GEMM is emulated exactly per row, attention runs per sequence,
  // LayerNorm per token, and the padding tokens are identical vectors in both runs (zero embedding
  // row: one constant per layer), so the forward is bitwise the same: input and weight scales,
  // scale_invs and histories match bitwise. Grad-output amaxes come through the f32 LM head's
  // backward GEMM, whose CPU blocking depends on the row count (48 padded rows here, T rounded to
  // 16 on one rank): equal to fp32 rounding (measured: last bit). From step 1 on the weights differ
  // by that rounding too: every scale to fp32 rounding. Under TP the row-parallel partial sums are
  // added in another order than one rank's GEMM: activation scales to fp32 rounding from step 0
  // (as mpi_test_fp8.cpp), weight scales bitwise at step 0.
  bool bitwise_scales = true;
  double scale_tol = 1e-5;  // relative, where not bitwise
  double loss_tol = 1e-5;  // relative
  double grad_tol = 1e-4;  // relative L2 per tensor
};

void run_fp8_pipeline(const Fp8PipeCase& pc) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = pc.tp, .pp = pc.pp});
  const int dp = ctx.sizes().dp, my_dp = ctx.coords().dp;
  const ModelConfig cfg = fp8_pp_config(pc.layers);
  const std::vector<int> split =
      pc.split.empty() ? esm2_pipeline_split(cfg, pc.pp * pc.virtual_stages) : pc.split;
  const uint64_t seed = 11;

  Fp8ScalingManager ref_fp8(fp8_options(cfg.layers, nullptr));
  Esm2Model ref(cfg, Esm2Options{.device = Device::cpu(), .compute = DType::kF32, .fp8 = &ref_fp8});
  ref.init_random(seed);
  Fp8ScalingManager fp8(fp8_options(cfg.layers, &ctx.amax()));  // tp x cp x dp of this stage
  Esm2Options po{.device = Device::cpu(), .compute = DType::kF32};
  po.parallel = &ctx;
  po.sequence_parallel = pc.sp;
  po.fp8 = &fp8;
  po.layer_ranges = pipeline_layer_ranges(split, pc.pp, ctx.coords().pp);
  Esm2Model stage(cfg, po);
  stage.init_random(seed);
  Esm2Pipeline pipe(stage, ctx,
                    Esm2PipelineOptions{.virtual_stages = pc.virtual_stages,
                                        .token_budget = kBudget,
                                        .layers_per_stage = split});
  ASSERT_EQ(pipe.token_budget(), 48) << "the FP8 pipeline rounds its budget up to a multiple of 16";
  const AdamWConfig acfg{.weight_decay = 0.01};
  AdamW ref_opt(ref.params(), acfg);
  AdamW opt(stage.params(), acfg);
  GradSync sync(stage.params(), &ctx);
  std::vector<bool> held(static_cast<size_t>(cfg.layers), false);
  for (const auto& [lo, hi] : po.layer_ranges)
    for (int i = lo; i < hi; ++i) held[static_cast<size_t>(i)] = true;

  for (int step = 0; step < 3; ++step) {
    const std::string at = " at step " + std::to_string(step);
    int64_t labels = 0;
    for (int d = 0; d < dp; ++d)
      for (int m = 0; m < pc.micro_batches; ++m) labels += make_micro(step, m, d).num_labels;
    const float scale = 1.0f / static_cast<float>(labels);
    // Reference: every micro-batch of every dp shard through the whole FP8 model on one rank.
    ref.params().zero_grads(Stream());
    double ref_loss = 0;
    for (int d = 0; d < dp; ++d)
      for (int m = 0; m < pc.micro_batches; ++m) {
        const ThdBatch b = make_micro(step, m, d);
        ASSERT_NE(b.total_tokens() % 16, 0);
        Tape tape;
        Var loss = ref.loss(tape, ref.forward(tape, b), b, scale);
        tape.backward(loss);
        ref_loss += loss.data().to_floats()[0];
      }
    ref_fp8.update(Stream());
    // Pipeline: this dp shard's micro-batches through the stages, then update() once.
    std::vector<ThdBatch> micro;
    for (int m = 0; m < pc.micro_batches; ++m) micro.push_back(make_micro(step, m, my_dp));
    sync.zero_grads(Stream());
    Tensor loss = Tensor::from_vector<double>({pipe.train_step(micro, scale, Stream())}, Shape{1});
    sync.reduce(Stream());
    fp8.update(Stream());
    sync.sum_over_dp(loss, Stream());
    EXPECT_NEAR(loss.to_vector<double>()[0], ref_loss, pc.loss_tol * std::abs(ref_loss)) << "loss" << at;
    for (const Parameter& p : stage.params().all()) {
      // (GradSync::reduce summed the SP partial sums over tp and everything over dp.)
      EXPECT_LE(rel_l2(stage.full_grad(p), ref.params().get(p.name).grad()), pc.grad_tol)
          << "gradient of " << p.name << at;
    }
    // Scales: the held layers' slots equal the single-rank manager's; the others untouched.
    const std::vector<float> s = fp8.scales().to_floats(), rs = ref_fp8.scales().to_floats();
    const std::vector<float> si = fp8.scale_invs().to_floats(), rsi = ref_fp8.scale_invs().to_floats();
    const std::vector<float> h = fp8.history().to_floats(), rh = ref_fp8.history().to_floats();
    const int64_t n = fp8.num_operands();
    int checked = 0;
    for (int layer = 0; layer < cfg.layers; ++layer)
      for (int g = 0; g < Fp8ScalingManager::kGemmsPerLayer; ++g)
        for (int k = 0; k < Fp8ScalingManager::kOperandsPerGemm; ++k) {
          const int i = fp8.slot(layer, static_cast<Fp8Gemm>(g), static_cast<Fp8Operand>(k));
          const std::string what = "layer " + std::to_string(layer) + " operand " + std::to_string(i) + at;
          if (!held[static_cast<size_t>(layer)]) {
            EXPECT_EQ(s[i], 1.0f) << "scale of a layer this stage does not hold, " << what;
            for (int64_t r = 0; r < fp8.history_len(); ++r) EXPECT_EQ(h[r * n + i], 0.0f) << what;
            continue;
          }
          ++checked;
          EXPECT_GT(rs[i], 0.0f) << what;
          const bool forward_operand = k != static_cast<int>(Fp8Operand::kGradOutput);
          if (step == 0 && forward_operand && (pc.bitwise_scales || k == static_cast<int>(Fp8Operand::kWeight))) {
            EXPECT_EQ(s[i], rs[i]) << "scale, " << what;
            EXPECT_EQ(si[i], rsi[i]) << "scale_inv, " << what;
            for (int64_t r = 0; r < fp8.history_len(); ++r) EXPECT_EQ(h[r * n + i], rh[r * n + i]) << "history, " << what;
          } else {
            EXPECT_NEAR(s[i], rs[i], pc.scale_tol * rs[i]) << "scale, " << what;
          }
        }
    EXPECT_GT(checked, 0);
    const OptimizerStepResult rr = ref_opt.step(1e-3, true, Stream());
    const OptimizerStepResult pr = opt.step(1e-3, true, Stream(), pipe.norm_reduce(sync.norm_reduce()));
    ASSERT_TRUE(rr.applied && pr.applied);
    EXPECT_NEAR(pr.grad_norm, rr.grad_norm, pc.loss_tol * rr.grad_norm) << "gradient norm" << at;
    if (!testing::all_ranks(!::testing::Test::HasFailure())) return;
  }
}

int world() { return testing::world_size(); }

TEST(Fp8Pipeline, OneFOneBMatchesOneRankFp8) {  // 2 stages x 2 layers, or 4 x 1
  run_fp8_pipeline({.pp = world(), .layers = 4});
}

TEST(Fp8Pipeline, InterleavedMatchesOneRankFp8) {  // 2 stages x 2 chunks, 5 layers 2,1,1,1
  if (world() != 2) GTEST_SKIP() << "needs 2 ranks";
  run_fp8_pipeline({.pp = 2, .virtual_stages = 2, .layers = 5, .split = {2, 1, 1, 1}, .micro_batches = 4});
}

TEST(Fp8Pipeline, TimesDataParallelAmaxOverDp) {  // PP=2 x DP=2: the stage's amax group spans dp
  if (world() != 4) GTEST_SKIP() << "needs 4 ranks";
  run_fp8_pipeline({.pp = 2, .layers = 3});
}

TEST(Fp8Pipeline, TimesSequenceParallel) {  // PP=2 x TP=2 + SP
  if (world() != 4) GTEST_SKIP() << "needs 4 ranks";
  run_fp8_pipeline({.pp = 2, .tp = 2, .layers = 3, .sp = true, .bitwise_scales = false,
                    .scale_tol = 1e-4, .loss_tol = 1e-3, .grad_tol = 2e-2});
}

}  // namespace
}  // namespace helix
