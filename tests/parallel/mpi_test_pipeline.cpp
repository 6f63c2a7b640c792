// Pipeline parallelism of the ESM-2 model on CPU ranks (layers/esm2_pipeline.h): 1F1B and
// interleaved 1F1B over 2 and 4 stages, even, uneven and balanced splits, composed with TP (and SP)
// and DP. Against one rank running the same micro-batches unpadded: the loss, every gradient of
// every stage (the tied embedding / decoder table on the first and last stage included), the
// global gradient norm and the parameters after two AdamW steps. Stage initialisation equals the
// single-device one; the Hugging Face export gathered over the stages equals the single-rank one.
// On a GPU (skipped without one): CUDA ranks sharing the GPU through the host-staged MPI backend,
// bf16 compute, against one rank on the same GPU within bf16 tolerances.
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

ModelConfig pipe_config(int layers) {
  ModelConfig c;
  c.name = "tiny-pp";
  c.layers = layers;
  c.hidden = 64;
  c.heads = 4;
  c.ffn = 128;
  return c;
}

constexpr int64_t kBudget = 34;  // tokens of every padded micro-batch (the largest has 29)

// Micro-batch `mb` of data shard `shard` at step `step`: 3 proteins, 15..29 tokens.
ThdBatch make_micro(int step, int mb, int shard, Device device = Device::cpu()) {
  return testing::synthetic_esm2_batch(
      {5 + (mb + shard) % 4, 9 - step + mb % 3, 6 + 2 * shard + (mb * 5) % 7},
      0xD1B54A32D192ED03ull * static_cast<uint64_t>(1 + step * 131 + mb * 17 + shard), 25, device);
}

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

struct PipeCase {
  int pp = 2;
  int tp = 1;
  int virtual_stages = 1;
  int layers = 4;
  std::vector<int> split;  // empty: esm2_pipeline_split
  int micro_batches = 4;
  bool sp = false;
  RecomputePolicy recompute = RecomputePolicy::kNone;
  Device device = Device::cpu();
  DType compute = DType::kF32;
  double loss_tol = 1e-5;             // relative
  double grad_tol[2] = {1e-4, 1e-3};  // max difference / the tensor's largest, steps 0 and 1
  double param_tol = 0.01;            // after 2 steps, in units of the learning rate
};

constexpr double kLr = 1e-3;

void run_pipeline_equivalence(const PipeCase& pc) {
  ParallelContext ctx =
      testing::make_context(ParallelSizes{.tp = pc.tp, .pp = pc.pp}, testing::backend_for(pc.device), pc.device);
  const int dp = ctx.sizes().dp, my_dp = ctx.coords().dp;
  const ModelConfig cfg = pipe_config(pc.layers);
  const std::vector<int> split =
      pc.split.empty() ? esm2_pipeline_split(cfg, pc.pp * pc.virtual_stages) : pc.split;
  validate_layer_split(split, cfg.layers, pc.pp * pc.virtual_stages);
  const uint64_t seed = 5;

  Esm2Model ref(cfg,
                Esm2Options{.device = pc.device, .compute = pc.compute, .recompute = pc.recompute});
  ref.init_random(seed);
  Esm2Options po{.device = pc.device, .compute = pc.compute, .recompute = pc.recompute};
  po.parallel = &ctx;
  po.sequence_parallel = pc.sp;
  po.layer_ranges = pipeline_layer_ranges(split, pc.pp, ctx.coords().pp);
  Esm2Model stage(cfg, po);
  stage.init_random(seed);
  for (const Parameter& p : stage.params().all())  // stage init == slice of the single-device init
    expect_close(p.master.to(Device::cpu()), stage.shard_of(p, ref.params().get(p.name).master),
                 0.0, "init of " + p.name);
  ASSERT_EQ(stage.params().has("esm.embeddings.word_embeddings.weight"),
            ctx.coords().pp == 0 || ctx.coords().pp == pc.pp - 1);
  ASSERT_EQ(stage.params().has("lm_head.bias"), ctx.coords().pp == pc.pp - 1);

  Esm2Pipeline pipe(
      stage, ctx,
      Esm2PipelineOptions{
          .virtual_stages = pc.virtual_stages, .token_budget = kBudget, .layers_per_stage = split});
  const AdamWConfig acfg{.weight_decay = 0.01, .clip_norm = 0.05};  // small clip: the norm matters
  AdamW ref_opt(ref.params(), acfg);
  AdamW opt(stage.params(), acfg);
  GradSync sync(stage.params(), &ctx);
  const Stream stream = pc.device.is_cuda() ? Stream::cuda_default(pc.device.index) : Stream();
  for (int step = 0; step < 2; ++step) {
    // Reference: every micro-batch of every dp shard, unpadded, on one rank.
    int64_t labels = 0;
    for (int d = 0; d < dp; ++d)
      for (int m = 0; m < pc.micro_batches; ++m) labels += make_micro(step, m, d).num_labels;
    const float scale = 1.0f / static_cast<float>(labels);
    ref.params().zero_grads(stream);
    double ref_loss = 0;
    for (int d = 0; d < dp; ++d)
      for (int m = 0; m < pc.micro_batches; ++m) {
        const ThdBatch b = make_micro(step, m, d, pc.device);
        Tape tape(TapeOptions{.stream = stream, .recompute = pc.recompute});
        Var loss = ref.loss(tape, ref.forward(tape, b), b, scale);
        tape.backward(loss);
        ref_loss += loss.data().to_floats()[0];
      }
    // Pipeline: this dp shard's micro-batches through the stages.
    std::vector<ThdBatch> micro;
    for (int m = 0; m < pc.micro_batches; ++m)
      micro.push_back(make_micro(step, m, my_dp, pc.device));
    sync.zero_grads(stream);
    Tensor loss = Tensor::from_vector<double>({pipe.train_step(micro, scale, stream)}, Shape{1});
    sync.reduce(stream);
    sync.sum_over_dp(loss, stream);
    EXPECT_NEAR(loss.to_vector<double>()[0], ref_loss, pc.loss_tol * std::abs(ref_loss))
        << "loss of step " << step;
    for (const Parameter& p : stage.params().all())
      expect_close(stage.full_grad(p), ref.params().get(p.name).grad().to(Device::cpu()),
                   pc.grad_tol[step], "gradient of " + p.name + " at step " + std::to_string(step));
    const OptimizerStepResult rr = ref_opt.step(kLr, true, stream);
    const OptimizerStepResult pr =
        opt.step(kLr, true, stream, pipe.norm_reduce(sync.norm_reduce()));
    ASSERT_TRUE(rr.applied && pr.applied);
    EXPECT_NEAR(pr.grad_norm, rr.grad_norm, pc.loss_tol * rr.grad_norm)
        << "gradient norm of step " << step;
  }
  for (const Parameter& p : stage.params().all()) {
    const std::vector<float> g = stage.full_master(p).to_floats();
    const std::vector<float> w = ref.params().get(p.name).master.to_floats();
    double diff = 0;
    for (size_t j = 0; j < g.size(); ++j)
      diff = std::max(diff, std::abs(double(g[j]) - double(w[j])));
    EXPECT_LE(diff, pc.param_tol * kLr) << "parameter " << p.name << " after 2 steps";
  }
  EXPECT_GT(pipe.last_stats().messages, 0);
}

int world() { return testing::world_size(); }

TEST(Pipeline, OneFOneBEvenSplit) {  // 2 stages x 2 layers, or 4 stages x 1 layer
  run_pipeline_equivalence(
      {.pp = world(),
       .layers = 4,
       .split = world() == 2 ? std::vector<int>{2, 2} : std::vector<int>{1, 1, 1, 1}});
}

TEST(Pipeline, OneFOneBUnevenSplit) {  // 5 layers: 3,2 or 2,1,1,1
  run_pipeline_equivalence(
      {.pp = world(),
       .layers = 5,
       .split = world() == 2 ? std::vector<int>{3, 2} : std::vector<int>{2, 1, 1, 1}});
}

TEST(Pipeline, OneFOneBBalancedSplitOddMicroBatches) {  // 7 layers, the automatic split, M = 3
  run_pipeline_equivalence({.pp = world(), .layers = 7, .micro_batches = 3});
}

TEST(Pipeline, OneFOneBFewerMicroBatchesThanStages) {
  run_pipeline_equivalence({.pp = world(), .layers = world(), .micro_batches = 1});
}

TEST(Pipeline, OneFOneBWithRecompute) {
  run_pipeline_equivalence(
      {.pp = world(), .layers = world() + 1, .recompute = RecomputePolicy::kFull});
}

TEST(Pipeline, InterleavedTwoChunks) {  // 2 x 2 chunks over 5 layers (2,1,1,1), or 4 x 2 over 8
  if (world() == 2)
    run_pipeline_equivalence({.pp = 2, .virtual_stages = 2, .layers = 5, .split = {2, 1, 1, 1}});
  else
    run_pipeline_equivalence({.pp = 4, .virtual_stages = 2, .layers = 8});
}

TEST(Pipeline, InterleavedThreeChunksEightMicroBatches) {
  if (world() != 2) GTEST_SKIP() << "needs 2 ranks (6 virtual stages)";
  run_pipeline_equivalence({.pp = 2, .virtual_stages = 3, .layers = 7, .micro_batches = 8});
}

TEST(Pipeline, TimesTensorParallel) {  // PP=2 x TP=2
  if (world() != 4) GTEST_SKIP() << "needs 4 ranks";
  run_pipeline_equivalence({.pp = 2, .tp = 2, .layers = 3, .split = {2, 1}});
}

TEST(Pipeline, TimesSequenceParallelInterleaved) {  // PP=2 x TP=2 with SP, 2 chunks
  if (world() != 4) GTEST_SKIP() << "needs 4 ranks";
  run_pipeline_equivalence({.pp = 2, .tp = 2, .virtual_stages = 2, .layers = 4, .sp = true});
}

TEST(Pipeline, TimesDataParallel) {  // PP=2 x DP=2
  if (world() != 4) GTEST_SKIP() << "needs 4 ranks";
  run_pipeline_equivalence({.pp = 2, .layers = 3});
}

// ---- CUDA: NCCL with one GPU per rank, else ranks share GPUs through the host-staged MPI backend
// Padding to the token budget changes GEMM shapes (and so bf16 accumulation order) against the
// unpadded reference: bf16-level tolerances. A missing tied-table sum or a wrong stage boundary is
// off by O(1).
PipeCase cuda_case(PipeCase c) {
  c.device = testing::rank_gpu();
  c.compute = DType::kBF16;
  const double r = testing::tolerance_for(DType::kBF16).rtol;
  c.loss_tol = r / 2;
  c.grad_tol[0] = c.grad_tol[1] = 4 * r;
  // Each of the 2 AdamW updates moves an element by at most ~lr, so two runs whose bf16 rounding
  // flips the sign of an element's tiny gradient end up to 2 lr apart per step: 4 lr after 2 steps
  // (measured on the H100 with TP=2+SP: 2.51 lr). A wrong shard or reduction is off by far more.
  c.param_tol = 4.5;
  return c;
}

TEST(PipelineCuda, OneFOneBUneven) {
  HELIX_REQUIRE_CUDA();
  run_pipeline_equivalence(cuda_case({.pp = world(), .layers = world() + 1}));
}

TEST(PipelineCuda, InterleavedTwoChunks) {
  HELIX_REQUIRE_CUDA();
  run_pipeline_equivalence(cuda_case({.pp = world(), .virtual_stages = 2, .layers = 2 * world()}));
}

TEST(PipelineCuda, TimesTensorParallelWithSequenceParallel) {
  HELIX_REQUIRE_CUDA();
  if (world() != 4) GTEST_SKIP() << "needs 4 ranks";
  run_pipeline_equivalence(cuda_case({.pp = 2, .tp = 2, .layers = 3, .sp = true}));
}

TEST(Pipeline, HfExportGathersTheStages) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.pp = world()});
  const ModelConfig cfg = pipe_config(world() + 1);
  Esm2Model ref(cfg, Esm2Options{.device = Device::cpu(), .compute = DType::kF32});
  ref.init_random(3);
  Esm2Options po{.device = Device::cpu(), .compute = DType::kF32};
  po.parallel = &ctx;
  po.layer_ranges =
      pipeline_layer_ranges(esm2_pipeline_split(cfg, world()), world(), ctx.coords().pp);
  Esm2Model stage(cfg, po);
  stage.init_random(3);
  Esm2Pipeline pipe(stage, ctx, Esm2PipelineOptions{.token_budget = kBudget});
  auto got = pipe.hf_tensors();
  if (ctx.coords().pp != 0) {
    EXPECT_TRUE(got.empty());
    return;
  }
  auto want = ref.hf_tensors();
  const auto by_name = [](const auto& a, const auto& b) { return a.first < b.first; };
  std::sort(got.begin(), got.end(), by_name);
  std::sort(want.begin(), want.end(), by_name);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].first, want[i].first);
    expect_close(got[i].second, want[i].second, 0.0, "export of " + got[i].first);
  }
}

// Communicator::isend: every pair of neighbours in the pp ring first posts 3 sends of 4 MiB each
// (past any eager limit: blocking sends would all wait here) and then receives; messages match in
// posting order, and a send_recv after them still matches.
TEST(Pipeline, IsendDoesNotWaitForTheReceiver) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.pp = world()});
  Communicator& pp = ctx.pp();
  const int r = pp.rank(), n = pp.size(), next = (r + 1) % n, prev = (r + n - 1) % n;
  constexpr int64_t kElems = int64_t{1} << 20;
  const auto payload = [&](int from, int k) {
    return testing::make_input(DType::kF32, kElems, from, k, 0, Device::cpu());
  };
  std::vector<std::unique_ptr<PendingSend>> sends;
  for (int k = 0; k < 3; ++k) sends.push_back(pp.isend(payload(r, k), next, Stream()));
  for (int k = 0; k < 3; ++k) {
    Tensor got = Tensor::empty({kElems}, DType::kF32);
    pp.recv(got, prev, Stream());
    expect_close(got, payload(prev, k), 0.0, "message " + std::to_string(k));
  }
  for (auto& p : sends) p->wait();
  Tensor back = Tensor::empty({kElems}, DType::kF32);
  pp.send_recv(SendRecvParams{.send = payload(r, 7), .dst = prev, .recv = back, .src = next},
               Stream());
  expect_close(back, payload(next, 7), 0.0, "send_recv after isends");
}

TEST(Pipeline, PaddingKeepsLossAndGradients) {  // the fixed token budget changes nothing (one rank)
  const ModelConfig cfg = pipe_config(2);
  Esm2Model m(cfg, Esm2Options{.device = Device::cpu(), .compute = DType::kF32});
  m.init_random(9);
  const ThdBatch b = make_micro(0, 1, 0);
  const ThdBatch p = pad_thd_batch(b, b.total_tokens() + 23, cfg.pad_token_id);
  ASSERT_EQ(p.total_tokens(), b.total_tokens() + 23);
  ASSERT_EQ(p.num_labels, b.num_labels);
  ASSERT_LE(p.max_seqlen, b.max_seqlen);
  const auto run = [&](const ThdBatch& x) {
    m.params().zero_grads(Stream());
    Tape tape;
    Var loss = m.loss(tape, m.forward(tape, x), x, 0.1f);
    tape.backward(loss);
    std::vector<Tensor> g{loss.data().clone()};
    for (const Parameter& q : m.params().all()) g.push_back(q.grad().clone());
    return g;
  };
  const std::vector<Tensor> want = run(b), got = run(p);
  for (size_t i = 0; i < want.size(); ++i)
    expect_close(got[i], want[i], 1e-5, "tensor " + std::to_string(i));
}

}  // namespace
}  // namespace helix
