// ZeRO 1/2/3 (layers/zero_sync.h, layers/zero_optimizer.h) on CPU ranks: the loss, every gradient
// (gathered from the dp shards), the global gradient norm and the parameters after 3 AdamW steps
// equal one rank running the same global batch; ZeRO-3 also under TP x DP with sequence
// parallelism, with recompute (layers gathered again before backward) and with gradient
// accumulation. The measured per-rank bytes of parameters, gradients and optimizer state equal
// zero_memory_bytes() exactly, and the formula itself is checked on a worked example.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "esm2_test_batch.h"
#include "layers/esm2.h"
#include "layers/optimizer.h"
#include "layers/zero_optimizer.h"
#include "layers/zero_sync.h"
#include "mpi_test_util.h"
#include "parallel/zero.h"

namespace helix {
namespace {

ModelConfig tiny_config() { return testing::tiny_esm2_config(3); }

// A packed batch of 3 proteins for data shard `shard` of step `step` (odd T: SP pads).
ThdBatch make_batch(int step, int shard, Device device = Device::cpu()) {
  return testing::synthetic_esm2_batch({7 + shard, 12 - step, 6 + 2 * shard + step},
                                       0x9E3779B97F4A7C15ull * static_cast<uint64_t>(1 + step * 7 + shard), 25, device);
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

void expect_memory(const ZeroSync& z, const std::string& when) {
  const ZeroMemory got = z.memory(), want = z.formula();
  EXPECT_EQ(got.params, want.params) << "parameter bytes " << when;
  EXPECT_EQ(got.grads, want.grads) << "gradient bytes " << when;
  EXPECT_EQ(got.optimizer, want.optimizer) << "optimizer bytes " << when;
}

struct ZeroCase {
  int stage = 1;
  int tp = 1;
  bool sp = false;
  bool recompute = false;
  int micro_batches = 1;  // per dp rank and step (gradient accumulation)
  Device device = Device::cpu();
  DType compute = DType::kF32;
  // Tolerances (relative to the tensor's largest element): f32 by default; bf16 compute rounds
  // activations per op, and the parallel run rounds in other places (row-parallel partial sums),
  // so bf16 runs use bf16-level tolerances; a wrong reduction or shard is off by O(1).
  double loss_tol = 1e-5;
  double grad_tol_first = 1e-4, grad_tol = 1e-3;  // step 0 (bitwise-equal weights), later steps
  double param_tol = 0.01 * 1e-3;                 // absolute, after 3 steps of lr 1e-3
  double norm_tol_later = 0;                      // grad norm after step 0 (0: loss_tol)
};

ZeroCase bf16_case(ZeroCase c, Device device) {
  c.device = device;
  c.compute = DType::kBF16;
  const double r = testing::tolerance_for(DType::kBF16).rtol;
  c.loss_tol = r / 2;
  c.grad_tol_first = c.grad_tol = 4 * r;
  c.param_tol = 3 * 3 * 1e-3;  // AdamW moves an element by ~lr per step: 3 steps, either direction
  if (device.is_cuda()) {
    // cuBLASLt and the CUDA kernels round in other places than the one-rank run (split-K, TP partial
    // sums in bf16). AdamW's first steps move each element by about +-lr whatever the gradient's
    // size, so an element whose tiny gradient flips sign under that rounding moves 2 lr apart, and
    // the next step's gradients differ by more than rounding (measured on the H100: up to 0.10 of
    // the largest element, grad norm 1.5%). Still far from a wrong reduction or shard (O(1)).
    c.grad_tol = 12 * r;
    c.norm_tol_later = 2 * r;
  }
  return c;
}

constexpr double kLr = 1e-3;

void run_zero_equivalence(ZeroCase c) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = c.tp}, testing::backend_for(c.device), c.device);
  const int dp = ctx.sizes().dp, my_dp = ctx.coords().dp;
  const ModelConfig cfg = tiny_config();
  const uint64_t seed = 7;

  Esm2Model ref(cfg, Esm2Options{.device = c.device, .compute = c.compute});
  ref.init_random(seed);
  Esm2Options po{.device = c.device, .compute = c.compute};
  po.parallel = &ctx;
  po.sequence_parallel = c.sp;
  Esm2Model par(cfg, po);
  par.init_random(seed);
  ZeroOptions zo;
  zo.stage = c.stage;
  zo.regather_in_backward = c.recompute;
  ZeroSync zero(par, ctx, zo);
  expect_memory(zero, "after sharding");
  {  // the planner's sizes from the configuration alone equal the model's
    std::vector<std::vector<int64_t>> got;
    for (const ZeroUnitLayout& u : zero.layout().units) got.push_back(u.numels);
    EXPECT_EQ(got, esm2_zero_unit_numels(cfg, c.tp));
  }
  for (size_t i = 0; i < par.params().all().size(); ++i) {
    const Parameter& p = par.params().all()[i];
    EXPECT_FALSE(p.master.defined()) << p.name << ": the full master should be gone";
    expect_close(zero.local_master(i), par.shard_of(p, ref.params().all()[i].master), 0.0, "sharded init of " + p.name);
  }

  const AdamWConfig acfg{.weight_decay = 0.01, .clip_norm = 0.05};  // small clip: the norm matters
  AdamW ref_opt(ref.params(), acfg);
  ZeroAdamW par_opt(zero, acfg);
  const Stream stream = c.device.is_cuda() ? Stream::cuda_default(c.device.index) : Stream();
  for (int step = 0; step < 3; ++step) {
    const int shards = dp * c.micro_batches;  // batch d * micro + m is micro-batch m of dp rank d
    int64_t labels = 0;
    for (int s = 0; s < shards; ++s) labels += make_batch(step, s).num_labels;
    const float scale = 1.0f / static_cast<float>(labels);
    ref.params().zero_grads(stream);
    double ref_loss = 0;
    for (int s = 0; s < shards; ++s) {
      const ThdBatch b = make_batch(step, s, c.device);
      TapeOptions to;
      to.stream = stream;
      Tape tape(to);
      Var loss = ref.loss(tape, ref.forward(tape, b), b, scale);
      tape.backward(loss);
      ref_loss += loss.data().to_floats()[0];
    }

    zero.zero_grads(stream);
    Tensor loss_sum = Tensor::zeros({1}, DType::kF32);
    for (int m = 0; m < c.micro_batches; ++m) {
      const ThdBatch b = make_batch(step, my_dp * c.micro_batches + m, c.device);
      zero.begin_micro_batch(m + 1 == c.micro_batches);
      TapeOptions to;
      to.stream = stream;
      to.recompute = c.recompute ? RecomputePolicy::kFull : RecomputePolicy::kNone;
      Tape tape(to);
      Var loss = par.loss(tape, par.forward(tape, b), b, scale);
      tape.backward(loss);
      loss_sum.data<float>()[0] += loss.data().to_floats()[0];
      if (c.stage == 3 && step == 0 && m == 0)  // layers' weights freed after their backward
        for (size_t i : zero.unit_params(1)) EXPECT_FALSE(par.params().all()[i].var.data().defined());
    }
    zero.sum_over_dp(loss_sum, stream);
    zero.reduce(stream);
    expect_close(loss_sum, Tensor::from_floats({static_cast<float>(ref_loss)}, Shape{1}, DType::kF32), c.loss_tol,
                 "loss of step " + std::to_string(step));
    for (size_t i = 0; i < par.params().all().size(); ++i) {
      const Parameter& p = par.params().all()[i];
      expect_close(zero.local_grad(i), par.shard_of(p, ref.params().all()[i].grad()),
                   step == 0 ? c.grad_tol_first : c.grad_tol,
                   "gradient of " + p.name + " at step " + std::to_string(step));
    }
    const OptimizerStepResult rr = ref_opt.step(kLr, true, stream);
    const OptimizerStepResult pr = par_opt.step(kLr, true, stream);
    ASSERT_TRUE(rr.applied && pr.applied);
    const double norm_tol = step > 0 && c.norm_tol_later > 0 ? c.norm_tol_later : c.loss_tol;
    EXPECT_NEAR(pr.grad_norm, rr.grad_norm, std::max(1e-5, norm_tol) * rr.grad_norm) << "step " << step;
    expect_memory(zero, "after step " + std::to_string(step));
  }
  for (size_t i = 0; i < par.params().all().size(); ++i) {
    const Parameter& p = par.params().all()[i];
    const Tensor got = zero.local_master(i), want = par.shard_of(p, ref.params().all()[i].master);
    const std::vector<float> g = got.to_floats(), w = want.to_floats();
    double diff = 0;
    for (size_t j = 0; j < g.size(); ++j) diff = std::max(diff, std::abs(double(g[j]) - double(w[j])));
    EXPECT_LE(diff, c.param_tol) << "parameter " << p.name << " after 3 steps";
  }
  // Stages 1-2: every rank's model copy is the full updated parameter (all-gathered after the step),
  // and refresh_model_copies (checkpoint restore) rebuilds it from the master shards alone.
  if (c.stage < 3) {
    for (size_t i = 0; i < par.params().all().size(); ++i)
      expect_close(par.params().all()[i].var.data().to(Device::cpu()), zero.local_master(i).to(c.compute), 0.0,
                   "model copy of " + par.params().all()[i].name);
    for (const Parameter& p : par.params().all()) {
      Tensor copy = p.var.data();
      copy.fill(0.0, stream);
    }
    zero.refresh_model_copies(stream);
    for (size_t i = 0; i < par.params().all().size(); ++i)
      expect_close(par.params().all()[i].var.data().to(Device::cpu()), zero.local_master(i).to(c.compute), 0.0,
                   "refreshed model copy of " + par.params().all()[i].name);
  }
  // Export brings the full masters back: equal to the reference's Hugging Face tensors.
  zero.materialize_masters();
  const auto got = par.hf_tensors(), want = ref.hf_tensors();
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (c.compute == DType::kF32) {
      expect_close(got[i].second, want[i].second, 2e-3, "export " + got[i].first);
      continue;
    }
    // bf16: the same absolute bound as the masters above (elements near zero, e.g. LayerNorm
    // biases of size ~lr, make a bound relative to the tensor's scale meaningless).
    const std::vector<float> g = got[i].second.to_floats(), w = want[i].second.to_floats();
    ASSERT_EQ(g.size(), w.size()) << got[i].first;
    double diff = 0;
    for (size_t j = 0; j < g.size(); ++j) diff = std::max(diff, std::abs(double(g[j]) - double(w[j])));
    EXPECT_LE(diff, c.param_tol) << "export " << got[i].first;
  }
}

TEST(Zero, Stage1DataParallelEqualsOneRank) { run_zero_equivalence({.stage = 1}); }  // DP=2 / DP=4
TEST(Zero, Stage2DataParallelEqualsOneRank) { run_zero_equivalence({.stage = 2}); }
TEST(Zero, Stage3DataParallelEqualsOneRank) { run_zero_equivalence({.stage = 3}); }
TEST(Zero, Stage3RecomputeEqualsOneRank) { run_zero_equivalence({.stage = 3, .recompute = true}); }
TEST(Zero, Stage2AccumulationEqualsOneRank) { run_zero_equivalence({.stage = 2, .micro_batches = 2}); }
TEST(Zero, Stage3AccumulationRecomputeEqualsOneRank) {
  run_zero_equivalence({.stage = 3, .recompute = true, .micro_batches = 2});
}
TEST(Zero, Stage3TensorSequenceParallelEqualsOneRank) {  // TP=2 x DP=2 on 4 ranks (x DP=1 on 2)
  run_zero_equivalence({.stage = 3, .tp = 2, .sp = true, .recompute = true});
}
TEST(Zero, Stage1TensorParallelEqualsOneRank) { run_zero_equivalence({.stage = 1, .tp = 2}); }
// bf16 model copy with f32 masters (the GPU recipe), emulated on CPU ranks: the AdamW bf16 write
// into the model shard / the full flat copy, bf16 gathers, and the c = 2 memory formula.
TEST(Zero, Stage2Bf16EqualsOneRank) { run_zero_equivalence(bf16_case({.stage = 2}, Device::cpu())); }
TEST(Zero, Stage3Bf16RecomputeEqualsOneRank) {
  run_zero_equivalence(bf16_case({.stage = 3, .recompute = true}, Device::cpu()));
}
// CUDA ranks sharing the GPU through the host-staged MPI backend (the gather on the comm stream).
TEST(ZeroCuda, Stage3Bf16RecomputeEqualsOneRank) {
  HELIX_REQUIRE_CUDA();
  run_zero_equivalence(bf16_case({.stage = 3, .recompute = true, .micro_batches = 2}, testing::rank_gpu()));
}
TEST(ZeroCuda, Stage1Bf16TensorParallelEqualsOneRank) {
  HELIX_REQUIRE_CUDA();
  run_zero_equivalence(bf16_case({.stage = 1, .tp = 2}, testing::rank_gpu()));
}

// The worked example of parallel/zero.h and docs/fsdp.md, by hand.
TEST(Zero, LayoutAndMemoryFormula) {
  const ZeroUnitLayout u = make_zero_unit_layout("u", {100, 10}, 2);
  EXPECT_EQ(u.offsets, (std::vector<int64_t>{0, 128}));
  EXPECT_EQ(u.numel, 256);
  EXPECT_EQ(u.shard_numel, 128);
  const auto p0 = zero_shard_pieces(u, 0), p1 = zero_shard_pieces(u, 1);
  ASSERT_EQ(p0.size(), 1u);
  EXPECT_EQ(p0[0].numel, 100);
  ASSERT_EQ(p1.size(), 1u);
  EXPECT_EQ(p1[0].tensor, 1u);
  EXPECT_EQ(p1[0].shard_begin, 0);
  EXPECT_EQ(p1[0].numel, 10);
  const ZeroUnitLayout split = make_zero_unit_layout("s", {200}, 2);  // one tensor across both shards
  const auto s1 = zero_shard_pieces(split, 1);
  ASSERT_EQ(s1.size(), 1u);
  EXPECT_EQ(s1[0].tensor_begin, 128);
  EXPECT_EQ(s1[0].numel, 72);
  ZeroMemoryParams mp;
  mp.dp = 2;
  mp.compute_bytes = 2;
  mp.unit_numels = {{100, 10}, {200}};  // flat 256 each, shard 128
  const int64_t full = 2 * 256, shard = 2 * 128;
  mp.stage = 0;
  ZeroMemory m = zero_memory_bytes(mp);
  EXPECT_EQ(m.params, 310 * 2);
  EXPECT_EQ(m.grads, 310 * 4);
  EXPECT_EQ(m.optimizer, 310 * 12);
  mp.stage = 1;
  m = zero_memory_bytes(mp);
  EXPECT_EQ(m.params, full * 2);
  EXPECT_EQ(m.grads, full * 4);
  EXPECT_EQ(m.optimizer, shard * 12);
  mp.stage = 2;
  m = zero_memory_bytes(mp);
  EXPECT_EQ(m.params, full * 2);
  EXPECT_EQ(m.grads, shard * 4);
  EXPECT_EQ(m.optimizer, shard * 12);
  mp.stage = 3;
  m = zero_memory_bytes(mp);
  EXPECT_EQ(m.params, shard * 2);
  EXPECT_EQ(m.grads, shard * 4);
  EXPECT_EQ(m.optimizer, shard * 12);
  mp.compute_bytes = 4;  // f32: the model shard is the master shard
  m = zero_memory_bytes(mp);
  EXPECT_EQ(m.params, shard * 4);
  EXPECT_EQ(m.optimizer, shard * 8);
}

TEST(Zero, BadStageRefusedNamingTheFlag) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = 1});
  Esm2Model m(tiny_config(), Esm2Options{.device = Device::cpu(), .compute = DType::kF32});
  for (int stage : {0, 4}) {
    try {
      ZeroOptions o;
      o.stage = stage;
      ZeroSync z(m, ctx, o);
      ADD_FAILURE() << "expected a refusal of stage " << stage;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--zero"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace helix
