// ESM-2 under tensor, sequence and data parallelism with the data-parallel all-reduce overlapped
// with backward (GradSync::ready_hook on the last micro-batch, recompute segments on), against one
// rank running the same global batch on the same device:
//  * CPU ranks, f32 (runs in CI): loss and every gathered gradient within fp32 tolerance;
//  * CUDA, bf16 compute with f32 master weights, ranks sharing the GPU through the host-staged MPI
//    backend (skips with a reason without a GPU): loss and gradients within bf16 tolerance.
// The reference runs every rank's micro-batches in turn; the parallel run has each dp rank run its own.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "esm2_test_batch.h"
#include "layers/esm2.h"
#include "layers/grad_sync.h"
#include "layers/optimizer.h"
#include "mpi_test_util.h"

namespace helix {
namespace {

// Head dim 32 (a CUDA attention head dim); TP=2 leaves 2 heads and FFN 128 per rank.
ModelConfig small_config() {
  ModelConfig c;
  c.name = "small";
  c.layers = 2;
  c.hidden = 128;
  c.heads = 4;
  c.ffn = 256;
  return c;
}

// A packed batch of 3 proteins (odd total T, so SP pads); `shard` picks the micro-batch.
ThdBatch make_batch(int step, int shard, Device device) {
  return testing::synthetic_esm2_batch({9 + shard, 14 - step, 5 + 3 * shard + step},
                                       0xD1B54A32D192ED03ull * static_cast<uint64_t>(3 + step * 11 + shard), 30, device);
}

struct Errors {
  double max_rel = 0;  // max |got - want| / max(max |want|, 1e-6)
  double l2_rel = 0;   // ||got - want|| / max(||want||, 1e-12)
};

Errors errors(const Tensor& got, const Tensor& want) {
  const std::vector<float> g = got.to_floats(), w = want.to_floats();
  double diff = 0, scale = 1e-6, d2 = 0, w2 = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    const double d = double(g[i]) - double(w[i]);
    diff = std::max(diff, std::abs(d));
    scale = std::max(scale, std::abs(double(w[i])));
    d2 += d * d;
    w2 += double(w[i]) * double(w[i]);
  }
  return {diff / scale, std::sqrt(d2) / std::max(std::sqrt(w2), 1e-12)};
}

struct Setup {
  int tp = 1;
  bool sp = false;
  Device device = Device::cpu();
  DType compute = DType::kF32;
  int micro = 2;  // micro-batches per rank and step; the hook runs on the last one
  double loss_tol = 1e-5;     // relative
  double grad_max_tol = 1e-4;  // max difference relative to the tensor's largest element
  double grad_l2_tol = 1e-4;   // relative L2 error
  int steps = 2;
};

void run_overlap_equivalence(const Setup& s) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.tp = s.tp}, testing::backend_for(s.device), s.device);
  const int dp = ctx.sizes().dp, my_dp = ctx.coords().dp;
  const ModelConfig cfg = small_config();
  const uint64_t seed = 11;
  const Stream stream = s.device.is_cuda() ? Stream::cuda_default(s.device.index) : Stream();

  Esm2Options ro{.device = s.device, .compute = s.compute};
  ro.recompute = RecomputePolicy::kFull;
  Esm2Model ref(cfg, ro);
  ref.init_random(seed);
  Esm2Options po = ro;
  po.parallel = &ctx;
  po.sequence_parallel = s.sp;
  Esm2Model par(cfg, po);
  par.init_random(seed);

  const AdamWConfig acfg{.weight_decay = 0.01, .clip_norm = 1.0};
  AdamW ref_opt(ref.params(), acfg);
  AdamW par_opt(par.params(), acfg);
  // 16 KB buckets: the small model's gradients span many, launched one by one during backward.
  GradSync sync(par.params(), &ctx, size_t{16} << 10);
  TapeOptions to;
  to.stream = stream;
  to.recompute = RecomputePolicy::kFull;
  for (int step = 0; step < s.steps; ++step) {
    const std::string at = " at step " + std::to_string(step);
    // Reference: every dp rank's micro-batches on one rank.
    int64_t labels = 0;
    for (int k = 0; k < dp * s.micro; ++k) labels += make_batch(step, k, Device::cpu()).num_labels;
    const float scale = 1.0f / static_cast<float>(labels);
    ref.params().zero_grads(stream);
    double ref_loss = 0;
    for (int k = 0; k < dp * s.micro; ++k) {
      const ThdBatch b = make_batch(step, k, s.device);
      Tape tape(to);
      Var loss = ref.loss(tape, ref.forward(tape, b), b, scale);
      tape.backward(loss);
      ref_loss += loss.data().to_floats()[0];
    }
    // Parallel: this dp rank's micro-batches; the last one's backward launches the buckets.
    sync.zero_grads(stream);
    double loss_sum = 0;
    for (int m = 0; m < s.micro; ++m) {
      const ThdBatch b = make_batch(step, my_dp * s.micro + m, s.device);
      TapeOptions o = to;
      if (m + 1 == s.micro) o.on_grad_ready = sync.ready_hook(stream);
      Tape tape(o);
      Var loss = par.loss(tape, par.forward(tape, b), b, scale);
      tape.backward(loss);
      loss_sum += loss.data().to_floats()[0];
    }
    if (dp > 1) {
      // Every parameter receives a gradient, so the hook has launched every bucket by now.
      EXPECT_GT(sync.dp_num_buckets(), 1u);
      EXPECT_EQ(sync.dp_buckets_launched(), sync.dp_num_buckets()) << "buckets launched during backward" << at;
    }
    sync.reduce(stream);
    Tensor loss_t = Tensor::from_vector<double>({loss_sum}, Shape{1});
    sync.sum_over_dp(loss_t, Stream());
    const double got_loss = loss_t.to_vector<double>()[0];
    EXPECT_NEAR(got_loss, ref_loss, s.loss_tol * std::abs(ref_loss)) << "loss" << at;
    for (size_t i = 0; i < par.params().all().size(); ++i) {
      const Parameter& p = par.params().all()[i];
      const Tensor want = ref.params().all()[i].grad();
      ASSERT_TRUE(want.defined()) << p.name;
      const Errors e = errors(par.full_grad(p), want);
      EXPECT_LE(e.max_rel, s.grad_max_tol) << "gradient of " << p.name << at;
      EXPECT_LE(e.l2_rel, s.grad_l2_tol) << "gradient of " << p.name << at;
    }
    const OptimizerStepResult rr = ref_opt.step(1e-4, true, stream);
    const OptimizerStepResult pr = par_opt.step(1e-4, true, stream, sync.norm_reduce());
    ASSERT_TRUE(rr.applied && pr.applied);
    EXPECT_NEAR(pr.grad_norm, rr.grad_norm, s.grad_l2_tol * rr.grad_norm) << "gradient norm" << at;
  }
}

// ---- CPU ranks, f32 ----------------------------------------------------------------------------
Setup cpu_setup(int tp, bool sp) {
  Setup s;
  s.tp = tp;
  s.sp = sp;
  // Step 1 starts from weights that AdamW moved apart by a little (sums in another order).
  s.grad_max_tol = 1e-3;
  s.grad_l2_tol = 1e-4;
  return s;
}

TEST(Esm2Overlap, DataParallelWithOverlapEqualsOneRank) {  // DP=2 / DP=4
  run_overlap_equivalence(cpu_setup(1, false));
}

TEST(Esm2Overlap, SequenceParallelWithOverlapEqualsOneRank) {  // TP=2+SP (x DP=2 on 4 ranks)
  run_overlap_equivalence(cpu_setup(2, true));
}

// ---- CUDA: NCCL with one GPU per rank, else ranks share GPUs through the host-staged MPI backend
// bf16 activations round differently where TP splits a sum (row-parallel partial outputs are
// rounded to bf16 before the all-reduce): bf16-level tolerances; a wrong reduction (a missing or
// doubled tp/dp sum, a wrong shard) is off by O(1).
Setup cuda_setup(int tp, bool sp) {
  Setup s;
  s.tp = tp;
  s.sp = sp;
  s.device = testing::rank_gpu();
  s.compute = DType::kBF16;
  const double r = testing::tolerance_for(DType::kBF16).rtol;  // 1.6e-2
  s.loss_tol = r / 2;
  s.grad_max_tol = 4 * r;
  s.grad_l2_tol = 2 * r;
  return s;
}

TEST(Esm2Cuda, DataParallelEqualsOneRank) {  // DP=2 / DP=4 (overlap on the reducer's stream)
  HELIX_REQUIRE_CUDA();
  run_overlap_equivalence(cuda_setup(1, false));
}

TEST(Esm2Cuda, TensorParallelEqualsOneRank) {  // TP=2 (x DP=2 on 4 ranks)
  HELIX_REQUIRE_CUDA();
  run_overlap_equivalence(cuda_setup(2, false));
}

TEST(Esm2Cuda, SequenceParallelEqualsOneRank) {  // TP=2 + SP (x DP=2 on 4 ranks)
  HELIX_REQUIRE_CUDA();
  run_overlap_equivalence(cuda_setup(2, true));
}

}  // namespace
}  // namespace helix
