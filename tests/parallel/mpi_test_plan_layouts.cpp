// `helix plan`'s per-rank parameter, gradient and optimizer bytes (launch/plan/plan.h) against what
// the real objects hold on CPU ranks after two training steps: ZeroSync + ZeroAdamW under ZeRO 1/2/3
// (DP = world, and TP=2 x DP), the pipeline stage models + AdamW under PP=2 (even, uneven,
// automatic and interleaved splits; x TP=2; each rank checks its own stage), and CP=2 (ZeRO 0, and
// ZeRO-1 sharded over dp x cp as the trainer shards it). Every byte count must match exactly.
// ZeRO 1/2/3 x PP=2 (each stage's own units, sharded over dp) as well.
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "esm2_test_batch.h"
#include "launch/plan/plan.h"
#include "layers/esm2.h"
#include "layers/esm2_pipeline.h"
#include "layers/grad_sync.h"
#include "layers/optimizer.h"
#include "layers/zero_optimizer.h"
#include "layers/zero_sync.h"
#include "mpi_test_util.h"
#include "parallel/cp_attention.h"

namespace helix {
namespace {

ModelConfig layouts_tiny(int layers, int vocab = 33) {
  ModelConfig c;
  c.vocab = vocab;
  c.name = "tiny-plan";
  c.layers = layers;
  c.hidden = 64;
  c.heads = 4;
  c.ffn = 96;  // vocabulary 33: odd sizes, so the flat buffers need padding
  return c;
}

// Bytes one rank holds, by the planner's kinds.
struct Held {
  double master = 0, copy = 0, grads = 0, moments = 0;
};

// Tensors of an unsharded model and its AdamW: separate masters, model copies, gradients, moments.
Held held_unsharded(const ParameterSet& params, AdamW& opt) {
  Held h;
  for (const Parameter& p : params.all()) {
    h.master += double(p.master.nbytes());
    if (!p.shares_master()) h.copy += double(p.var.data().nbytes());
    if (p.grad().defined()) h.grads += double(p.grad().nbytes());
  }
  for (const auto& [m, v] : opt.moments()) h.moments += double(m.nbytes() + v.nbytes());
  return h;
}

// ZeroSync's buffers that exist now (memory(): model copies, gradients, masters unless they are the
// model copy, moments), split by kind with the moment shards.
Held held_zero(const ZeroSync& z) {
  const ZeroMemory m = z.memory();
  Held h;
  for (size_t u = 0; u < z.num_units(); ++u)
    h.moments += double(z.exp_avg_shard(u).nbytes() + z.exp_avg_sq_shard(u).nbytes());
  const double separate_master = double(m.optimizer) - h.moments;
  h.master = separate_master > 0 ? separate_master : double(m.params);  // else the copy is it
  h.copy = separate_master > 0 ? double(m.params) : 0;
  h.grads = double(m.grads);
  return h;
}

void expect_plan_equals(const MemoryBytes& plan, const Held& held, const std::string& what) {
  EXPECT_GT(held.master, 0) << what;
  EXPECT_EQ(plan.master, held.master) << "master bytes, " << what;
  EXPECT_EQ(plan.model_copy, held.copy) << "model copy bytes, " << what;
  EXPECT_EQ(plan.grads, held.grads) << "gradient bytes, " << what;
  EXPECT_EQ(plan.optimizer, held.moments) << "moment bytes, " << what;
}

PlanResult plan_for(const ModelConfig& cfg, PlanLayout layout, bool bf16,
                    std::vector<int> pp_layers = {}) {
  PlanInput in;
  in.model = cfg;
  in.gpus = testing::world_size();
  in.tokens_per_step = 1 << 16;
  in.max_seq_len = 64;
  in.bf16 = bf16;
  in.layout = layout;
  in.pp_layers = std::move(pp_layers);
  const PlanResult r =
      make_plan(in, load_calibration(std::string(HELIX_SOURCE_DIR) +
                                     "/examples/calibration/h100.json"));
  EXPECT_TRUE(r.error.empty()) << r.error;
  return r;
}

ThdBatch batch_of(int step, int shard) {
  return testing::synthetic_esm2_batch({9 + shard, 14 - step, 5 + 2 * shard},
                                       0x9E3779B97F4A7C15ull * uint64_t(1 + 7 * step + shard), 20,
                                       Device::cpu());
}

// ---- ZeRO 1/2/3 over dp (x tp) -------------------------------------------------------------------

void check_zero(int stage, int tp, DType compute) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = tp});
  const ModelConfig cfg = layouts_tiny(3);
  Esm2Options o{.device = Device::cpu(), .compute = compute};
  o.parallel = &ctx;
  Esm2Model model(cfg, o);
  model.init_random(3);
  ZeroOptions zo;
  zo.stage = stage;
  ZeroSync zero(model, ctx, zo);
  ZeroAdamW opt(zero, AdamWConfig{});
  const Stream stream;
  for (int step = 0; step < 2; ++step) {
    zero.zero_grads(stream);
    zero.begin_micro_batch(true);
    const ThdBatch b = batch_of(step, ctx.coords().dp);
    Tape tape;
    Var loss = model.loss(tape, model.forward(tape, b), b, 1.0f / float(b.num_labels));
    tape.backward(loss);
    zero.reduce(stream);
    ASSERT_TRUE(opt.step(1e-3, true, stream).applied);
  }
  PlanLayout l;
  l.tp = tp;
  l.zero = stage;
  l.sequence_parallel = false;
  const PlanResult r = plan_for(cfg, l, compute == DType::kBF16);
  ASSERT_EQ(r.dp, ctx.sizes().dp);
  expect_plan_equals(r.memory, held_zero(zero),
                     "zero " + std::to_string(stage) + " tp " + std::to_string(tp) + " dp " +
                         std::to_string(r.dp) + " " + std::string(dtype_name(compute)));
}

TEST(PlanLayouts, ZeroStagesOverDataParallelEqualThePlan) {  // DP=2 on 2 ranks, DP=4 on 4
  for (int stage : {1, 2, 3}) check_zero(stage, 1, DType::kF32);
  for (int stage : {1, 3}) check_zero(stage, 1, DType::kBF16);
}

TEST(PlanLayouts, ZeroStage3TensorParallelEqualsThePlan) {  // TP=2 x DP=2 on 4 ranks (DP=1 on 2)
  check_zero(3, 2, DType::kF32);
  check_zero(2, 2, DType::kBF16);
}

// ---- Pipeline stages -----------------------------------------------------------------------------

constexpr int64_t kBudget = 64;  // tokens of every padded micro-batch (the largest has 49)

void check_pipeline(int tp, int layers, int virtual_stages, std::vector<int> split_arg,
                    int vocab = 33, int zero_stage = 0) {
  constexpr int pp = 2, micro_batches = 4;
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = tp, .pp = pp});
  const ModelConfig cfg = layouts_tiny(layers, vocab);
  // The trainer's split (launch/pipeline_step.cpp): --pp-layers, else esm2_pipeline_split.
  const std::vector<int> split =
      split_arg.empty() ? esm2_pipeline_split(cfg, pp * virtual_stages) : split_arg;
  Esm2Options o{.device = Device::cpu(), .compute = DType::kF32};
  o.parallel = &ctx;
  o.layer_ranges = pipeline_layer_ranges(split, pp, ctx.coords().pp);
  Esm2Model stage(cfg, o);
  stage.init_random(3);
  std::unique_ptr<ZeroSync> zero;  // ZeRO sharded over dp inside the stage (as the trainer does)
  std::unique_ptr<ZeroAdamW> zopt;
  std::unique_ptr<AdamW> opt;
  std::unique_ptr<GradSync> sync;
  if (zero_stage > 0) {
    ZeroOptions zo;
    zo.stage = zero_stage;
    zero = std::make_unique<ZeroSync>(stage, ctx, zo);
    zopt = std::make_unique<ZeroAdamW>(*zero, AdamWConfig{});
  } else {
    opt = std::make_unique<AdamW>(stage.params(), AdamWConfig{});
    sync = std::make_unique<GradSync>(stage.params(), &ctx);
  }
  Esm2Pipeline pipe(stage, ctx,
                    Esm2PipelineOptions{.virtual_stages = virtual_stages,
                                        .token_budget = kBudget,
                                        .layers_per_stage = split});
  if (zero) pipe.set_zero(zero.get());
  const Stream stream;
  for (int step = 0; step < 2; ++step) {
    std::vector<ThdBatch> micro;
    int64_t labels = 0;
    for (int m = 0; m < micro_batches; ++m) {
      micro.push_back(batch_of(step, m + micro_batches * ctx.coords().dp));
      labels += micro.back().num_labels;
    }
    if (zero) {
      zero->zero_grads(stream);
      pipe.train_step(micro, 1.0f / float(labels), stream);
      zero->reduce(stream);
      ASSERT_TRUE(zopt->step(1e-3, true, stream).applied);
    } else {
      sync->zero_grads(stream);
      pipe.train_step(micro, 1.0f / float(labels), stream);
      sync->reduce(stream);
      ASSERT_TRUE(opt->step(1e-3, true, stream, pipe.norm_reduce(sync->norm_reduce())).applied);
    }
  }
  PlanLayout l;
  l.tp = tp;
  l.pp = pp;
  l.zero = zero_stage;
  l.virtual_stages = virtual_stages;
  l.micro_batches = micro_batches;
  l.sequence_parallel = false;
  const PlanResult r = plan_for(cfg, l, false, split_arg);
  ASSERT_EQ(int(r.stages.size()), pp);
  const StagePlan& mine = r.stages[size_t(ctx.coords().pp)];
  EXPECT_EQ(mine.layer_ranges, o.layer_ranges);
  expect_plan_equals(mine.memory, zero ? held_zero(*zero) : held_unsharded(stage.params(), *opt),
                     "pp stage " + std::to_string(ctx.coords().pp) + " tp " + std::to_string(tp) +
                         " zero " + std::to_string(zero_stage) +
                         " layers " + std::to_string(layers) + " v " +
                         std::to_string(virtual_stages));
}

TEST(PlanLayouts, PipelineStagesEqualThePlan) {  // PP=2 (x DP=2 on 4 ranks)
  check_pipeline(1, 4, 1, {2, 2});        // even
  check_pipeline(1, 5, 1, {3, 2});        // uneven
  // The automatic split: a 2048-token head weighs on the last stage, so the trainer splits 7 layers
  // 6 + 1, not 4 + 3.
  EXPECT_EQ(esm2_pipeline_split(layouts_tiny(7, 2048), 2), (std::vector<int>{6, 1}));
  check_pipeline(1, 7, 1, {}, 2048);
  check_pipeline(1, 5, 2, {2, 1, 1, 1});  // interleaved: rank 0 holds layers 0-1 and 3
}

TEST(PlanLayouts, ZeroTimesPipelineEqualsThePlan) {  // ZeRO 1/2/3 x PP=2 (x DP=2 on 4 ranks)
  for (int zero_stage : {1, 2, 3}) check_pipeline(1, 5, 1, {3, 2}, 33, zero_stage);
  check_pipeline(1, 5, 2, {2, 1, 1, 1}, 33, 3);  // interleaved: rank 0 holds layers 0-1 and 3
  if (testing::world_size() == 4) check_pipeline(2, 4, 1, {2, 2}, 33, 1);  // PP=2 x TP=2, DP=1
}

TEST(PlanLayouts, PipelineTimesTensorParallelEqualsThePlan) {  // PP=2 x TP=2
  if (testing::world_size() != 4) GTEST_SKIP() << "needs 4 ranks";
  check_pipeline(2, 5, 1, {3, 2});
  check_pipeline(2, 7, 1, {}, 2048);
}

// ---- Context parallelism -------------------------------------------------------------------------

void check_cp(int zero_stage) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.cp = 2});
  const ModelConfig cfg = layouts_tiny(2);
  Esm2Options o{.device = Device::cpu(), .compute = DType::kF32};
  o.parallel = &ctx;
  Esm2Model model(cfg, o);
  model.init_random(3);
  std::unique_ptr<ZeroSync> zero;
  std::unique_ptr<ZeroAdamW> zopt;
  std::unique_ptr<AdamW> opt;
  std::unique_ptr<GradSync> sync;
  if (zero_stage > 0) {
    ZeroOptions zo;
    zo.stage = zero_stage;
    zo.shard_comm = &ctx.dp_cp();  // as launch/trainer.cpp shards under CP
    zero = std::make_unique<ZeroSync>(model, ctx, zo);
    zopt = std::make_unique<ZeroAdamW>(*zero, AdamWConfig{});
  } else {
    opt = std::make_unique<AdamW>(model.params(), AdamWConfig{});
    sync = std::make_unique<GradSync>(model.params(), &ctx);
  }
  const Stream stream;
  for (int step = 0; step < 2; ++step) {
    const ThdBatch global = batch_of(step, ctx.coords().dp);
    const CpBatch cb = cp_split_batch(global, 2, ctx.coords().cp,
                                      CpShardOptions{.pad_id = cfg.pad_token_id});
    if (zero) {
      zero->zero_grads(stream);
      zero->begin_micro_batch(true);
    } else {
      sync->zero_grads(stream);
    }
    Tape tape;
    Var loss = model.loss(tape, model.forward(tape, cb.local, &cb), cb.local,
                          1.0f / float(global.num_labels));
    tape.backward(loss);
    if (zero) {
      zero->reduce(stream);
      ASSERT_TRUE(zopt->step(1e-3, true, stream).applied);
    } else {
      sync->reduce(stream);
      ASSERT_TRUE(opt->step(1e-3, true, stream, sync->norm_reduce()).applied);
    }
  }
  PlanLayout l;
  l.cp = 2;
  l.zero = zero_stage;
  const PlanResult r = plan_for(cfg, l, false);
  expect_plan_equals(r.memory, zero ? held_zero(*zero) : held_unsharded(model.params(), *opt),
                     "cp 2 dp " + std::to_string(r.dp) + " zero " + std::to_string(zero_stage));
}

TEST(PlanLayouts, ContextParallelEqualsThePlan) {  // CP=2 (x DP=2 on 4 ranks)
  check_cp(0);
  check_cp(1);  // sharded over dp x cp: 2 or 4 ways
  check_cp(3);
}

}  // namespace
}  // namespace helix
