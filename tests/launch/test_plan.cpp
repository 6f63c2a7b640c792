// `helix plan` against what exists: per-rank parameter, gradient, optimizer and activation bytes of
// a built Esm2Model + AdamW (CPU), FLOPs against ModelConfig::train_flops, the pipeline formulas
// against a brute-force simulation of the schedules, and the predictions against the measured H100
// runs of docs/perf/training.md.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>

#include "core/allocator.h"
#include "core/autograd.h"
#include "launch/plan/calibration.h"
#include "launch/plan/pipeline_schedule.h"
#include "launch/plan/plan_cli.h"
#include "launch/plan/plan.h"
#include "launch/plan/search.h"
#include "layers/esm2.h"
#include "layers/optimizer.h"
#include "layers/zero_sync.h"
#include "parallel/esm2_test_batch.h"
#include "parallel/zero.h"

namespace helix {
namespace {

Calibration h100() {
  return load_calibration(std::string(HELIX_SOURCE_DIR) + "/examples/calibration/h100.json");
}

ModelConfig tiny(int layers, int hidden, int heads, int ffn) {
  ModelConfig c;
  c.name = "tiny";
  c.layers = layers;
  c.hidden = hidden;
  c.heads = heads;
  c.ffn = ffn;
  return c;
}

struct Held {
  double master = 0, copy = 0, grads = 0, moments = 0;
  double forward_bytes = 0;  // allocator bytes that a forward adds (saved activations, logits)
  double step_peak = 0;      // allocator peak over a whole step
};

// Builds the model and optimizer, runs two steps (forward + backward + AdamW) on a packed batch of
// `lens`, and sums the bytes of the tensors that exist; during the second step, the CPU allocator's
// live bytes that the forward adds and the step's peak.
Held build_and_measure(const ModelConfig& c, DType compute, const std::vector<int>& lens,
                       RecomputePolicy recompute = RecomputePolicy::kNone) {
  Esm2Options o;
  o.device = Device::cpu();
  o.compute = compute;
  o.recompute = recompute;
  Esm2Model model(c, o);
  model.init_random(3);
  AdamW opt(model.params(), AdamWConfig{});
  const ThdBatch b = testing::synthetic_esm2_batch(lens, 7, 15, Device::cpu());
  Allocator& alloc = allocator_for(Device::cpu());
  Held h;
  for (int step = 0; step < 2; ++step) {
    model.params().zero_grads(Stream());
    alloc.reset_peak();
    const double before = double(alloc.stats().current_bytes);
    TapeOptions to;
    to.recompute = recompute;  // the trainer passes the model's policy to its tape the same way
    Tape tape(to);
    Var logits = model.forward(tape, b);
    h.forward_bytes = double(alloc.stats().current_bytes) - before;
    Var loss = model.loss(tape, logits, b, 1.0f / float(std::max<int64_t>(1, b.num_labels)));
    tape.backward(loss);
    opt.step(1e-3, true, Stream());
    h.step_peak = double(alloc.stats().peak_bytes);
  }
  for (const Parameter& p : model.params().all()) {
    h.master += double(p.master.nbytes());
    if (!p.shares_master()) h.copy += double(p.var.data().nbytes());
    if (p.grad().defined()) h.grads += double(p.grad().nbytes());
  }
  for (const auto& [m, v] : opt.moments()) h.moments += double(m.nbytes() + v.nbytes());
  return h;
}

PlanInput single(const ModelConfig& c, bool bf16, int64_t tokens) {
  PlanInput in;
  in.model = c;
  in.gpus = 1;
  in.tokens_per_step = tokens;
  in.max_seq_len = 1;
  in.bf16 = bf16;
  return in;
}

TEST(Plan, ParameterGradientOptimizerBytesEqualTheBuiltModel) {
  const Calibration cal = h100();
  for (DType compute : {DType::kF32, DType::kBF16}) {
    for (const ModelConfig& c : {tiny(2, 64, 4, 128), tiny(3, 48, 6, 200)}) {
      const Held h = build_and_measure(c, compute, {9, 14, 5});
      const PlanResult r = make_plan(single(c, compute == DType::kBF16, 28), cal);
      ASSERT_TRUE(r.error.empty()) << r.error;
      EXPECT_EQ(r.memory.master, h.master) << dtype_name(compute);
      EXPECT_EQ(r.memory.model_copy, h.copy) << dtype_name(compute);
      EXPECT_EQ(r.memory.grads, h.grads) << dtype_name(compute);
      EXPECT_EQ(r.memory.optimizer, h.moments) << dtype_name(compute);
      EXPECT_EQ(stage_param_elements(c, 1, c.layers, true, true, false), c.num_params());
    }
  }
}

TEST(Plan, ActivationBytesEqualWhatAForwardAllocates) {
  // A transformer layer's saved tensors: the bytes a forward adds with 3 layers minus those with 1
  // layer (embedding, final LayerNorm, LM head and logits cancel), CPU allocator, live tensors.
  const std::vector<int> lens{9, 14, 5};
  const int64_t t = 28;
  for (DType compute : {DType::kF32, DType::kBF16}) {
    const ModelConfig c = tiny(3, 64, 4, 96);
    ModelConfig c1 = c;
    c1.layers = 1;
    const Held h3 = build_and_measure(c, compute, lens), h1 = build_and_measure(c1, compute, lens);
    const double per_layer = layer_activation_bytes(c, t, PlanLayout{}, compute == DType::kBF16);
    EXPECT_EQ(h3.forward_bytes - h1.forward_bytes, 2 * per_layer) << dtype_name(compute);
    // The whole step's peak against the plan's total (parameters, gradients, moments, activations,
    // LM head and backward workspace): within 10%.
    const PlanResult r = make_plan(single(c, compute == DType::kBF16, t), h100());
    EXPECT_NEAR(r.memory.total() / h3.step_peak, 1.0, 0.10) << dtype_name(compute);
    // Full recompute (Tape::segment keeps each layer's input only).
    const Held f3 = build_and_measure(c, compute, lens, RecomputePolicy::kFull);
    const Held f1 = build_and_measure(c1, compute, lens, RecomputePolicy::kFull);
    PlanLayout full;
    full.recompute = RecomputeMode::kFull;
    EXPECT_EQ(f3.forward_bytes - f1.forward_bytes,
              2 * layer_activation_bytes(c, t, full, compute == DType::kBF16))
        << dtype_name(compute);
  }
}

TEST(Plan, FlopsEqualTrainFlops) {
  const std::vector<int> lens{100, 350, 1024, 7, 512};
  const double tokens = std::accumulate(lens.begin(), lens.end(), 0.0);
  double sq = 0;
  for (int s : lens) sq += double(s) * s;
  for (const std::string& name : model_config_names()) {
    const ModelConfig c = model_config(name);
    EXPECT_NEAR(plan_model_flops(c, tokens, sq / tokens) / c.train_flops(lens), 1.0, 1e-12) << name;
  }
  // And the plan's per-step FLOPs are those of its tokens at its sequence length.
  PlanInput in = single(model_config("esm2-650m"), true, 16384);
  in.seq_len = 480;
  const PlanResult r = make_plan(in, h100());
  EXPECT_NEAR(r.model_flops / plan_model_flops(in.model, 16384, 480), 1.0, 1e-12);
  in.layout.recompute = RecomputeMode::kFull;  // full recompute adds one forward of every layer
  const PlanResult f = make_plan(in, h100());
  EXPECT_GT(f.hardware_flops, f.model_flops * 1.25);
  EXPECT_LT(f.hardware_flops, f.model_flops * 1.34);
}

TEST(Plan, BubbleAndInFlightFormulasMatchTheScheduleSimulation) {
  int checked = 0;
  for (int p : {1, 2, 3, 4, 8})
    for (int v : {1, 2, 3, 4})
      for (int m : {1, 2, 3, 4, 5, 8, 12, 16, 32}) {
        const PipelineShape s{p, v, m};
        if (!pipeline_shape_error(s).empty()) continue;
        for (auto [tf, tb] : {std::pair{1.0, 2.0}, std::pair{1.0, 1.0}}) {
          const PipelineSimResult sim = simulate_pipeline(s, tf, tb);
          EXPECT_NEAR(sim.makespan, pipeline_step_units(s) * (tf + tb), 1e-9)
              << "p " << p << " v " << v << " m " << m << " tf " << tf << " tb " << tb;
          EXPECT_NEAR(1.0 - sim.busy_per_stage / sim.makespan, pipeline_bubble_fraction(s), 1e-12);
          EXPECT_NEAR(sim.max_in_flight_stage0, pipeline_stage0_in_flight(s), 1e-12)
              << "p " << p << " v " << v << " m " << m;
          for (int st = 0; st < p; ++st)
            EXPECT_NEAR(sim.max_in_flight[st], pipeline_in_flight(s, st), 1e-12)
                << "p " << p << " v " << v << " m " << m << " stage " << st;
          ++checked;
        }
      }
  EXPECT_GT(checked, 100);
  EXPECT_FALSE(pipeline_shape_error({4, 2, 6}).empty());  // interleaving needs m % p == 0
}

TEST(Plan, PredictionsAgainstMeasuredH100Runs) {
  // docs/perf/training.md, one H100, 16384 tokens per step (session 4, with the rotary fused into
  // the QKV split/join): ESM-2 150M 211,650 tok/s at 9.85 GiB,
  // 650M 84,631 tok/s at 27.02 GiB (peak of helix's allocator: tensors only, so the runtime
  // reservation is left out here). Calibration comes from kernel benchmarks only (docs/scaling.md).
  const Calibration cal = h100();
  struct Case {
    const char* model;
    double tok_s, gib, time_tol;
  };
  for (const Case& k :
       {Case{"esm2-150m", 211650, 9.85, 0.15}, Case{"esm2-650m", 84631, 27.02, 0.15}}) {
    const PlanResult r = make_plan(single(model_config(k.model), true, 16384), cal);
    const double mem = r.memory.total() / double(1ull << 30);
    EXPECT_NEAR(mem / k.gib, 1.0, 0.10) << k.model << ": predicted " << mem << " GiB";
    EXPECT_NEAR(r.tokens_per_second / k.tok_s, 1.0, k.time_tol)
        << k.model << ": predicted " << r.tokens_per_second;
    std::printf(
        "%s: predicted %.0f tok/s (measured %.0f, %+.1f%%), %.2f GiB (measured %.2f, %+.1f%%)\n",
        k.model, r.tokens_per_second, k.tok_s, 100 * (r.tokens_per_second / k.tok_s - 1), mem,
        k.gib, 100 * (mem / k.gib - 1));
  }
}

TEST(Plan, CalibrationUsesMeasuredRowsAndFitsTheRest) {
  const Calibration cal = h100();
  // Attention is exact at the measured head dims (32, 64, 128), interpolated between them in time
  // per score, and takes the nearest measured rate outside their range.
  EXPECT_NEAR(cal.attention_fwd_bwd_flops(32), 138.0e12, 1e8);
  EXPECT_NEAR(cal.attention_fwd_bwd_flops(64), 213.2e12, 1e8);
  EXPECT_NEAR(cal.attention_fwd_bwd_flops(128), 214.1e12, 1e8);
  EXPECT_NEAR(cal.attention_fwd_bwd_flops(16), 138.0e12, 1e8);
  EXPECT_NEAR(cal.attention_fwd_bwd_flops(256), 214.1e12, 1e8);
  const double s32 = 14.0 * 32 / 138.0e12, s64 = 14.0 * 64 / 213.2e12;  // seconds per score
  EXPECT_NEAR(cal.attention_fwd_bwd_flops(48), 14.0 * 48 / (0.5 * s32 + 0.5 * s64), 1e8);
  // A measured shape gives its own rate.
  const double t = cal.gemm_seconds(GemmPass::kFwd, 16384, 3840, 1280, false);
  EXPECT_NEAR(2.0 * 16384 * 3840 * 1280 / t / 1e12, 738.7, 1e-6);
  // The two-parameter fit reproduces every bf16 row within 30% (the worst, a wgrad, is off by 26%).
  for (const GemmRow& g : cal.gemm) {
    const auto [rate, t0] = cal.gemm_fit(g.pass, false);
    EXPECT_GT(rate, 400e12);
    EXPECT_LT(rate, 900e12);
    const double fl = 2.0 * g.m * g.n * g.k;
    EXPECT_NEAR((fl / rate + t0) / (fl / (g.bf16_tflops * 1e12)), 1.0, 0.3)
        << gemm_pass_name(g.pass);
  }
}

TEST(Plan, LayoutRulesNameTheFlag) {
  PlanInput in = single(model_config("esm2-650m"), true, 1 << 20);
  in.max_seq_len = 1024;
  in.gpus = 12;
  in.layout.tp = 8;
  EXPECT_NE(layout_error(in).find("--gpus 12"), std::string::npos);
  in.gpus = 16;
  EXPECT_NE(layout_error(in).find("heads 20"), std::string::npos);  // 20 % 8
  in.gpus = 32;
  in.layout.tp = 4;
  in.layout.pp = 8;
  in.layout.virtual_stages = 8;
  EXPECT_NE(layout_error(in).find("33 layers"), std::string::npos);
  in.layout.virtual_stages = 1;
  in.layout.pp = 1;
  in.layout.micro_batches = 512;  // 1M tokens / (8 dp * 512) = 256 < 1024
  EXPECT_NE(layout_error(in).find("longest sample"), std::string::npos);
  in.layout.micro_batches = 1;
  EXPECT_EQ(layout_error(in), "");
}

TEST(Plan, ShardingDividesStateAsZeroSays) {
  PlanInput in = single(model_config("esm2-3b"), true, 1 << 20);
  in.gpus = 8;
  const Calibration cal = h100();
  const PlanResult z0 = make_plan(in, cal);
  in.layout.zero = 1;
  const PlanResult z1 = make_plan(in, cal);
  in.layout.zero = 3;
  const PlanResult z3 = make_plan(in, cal);
  const double p = double(model_config("esm2-3b").num_params());
  // ZeroSync's flat buffers (parallel/zero.h): per unit (the non-layer tensors, each layer) padded
  // to a multiple of kZeroAlign * 8, every tensor starting aligned; shard S, full flat size F.
  double shard = 0, flat = 0, tensors = 0;
  const std::vector<std::vector<int64_t>> units = esm2_zero_unit_numels(in.model, 1);
  for (const std::vector<int64_t>& u : units) {
    const ZeroUnitLayout layout = make_zero_unit_layout("", u, 8);
    shard += double(layout.shard_numel);
    flat += double(layout.numel);
    tensors += double(u.size());
  }
  EXPECT_GE(shard, std::ceil(p / 8));
  // Padding only: < kZeroAlign per tensor and < kZeroAlign * 8 per unit's tail.
  EXPECT_LT(flat - p, tensors * kZeroAlign + double(units.size()) * 8 * kZeroAlign);
  EXPECT_EQ(z0.memory.optimizer, 8 * p);
  EXPECT_EQ(z0.memory.master, 4 * p);
  EXPECT_EQ(z1.memory.optimizer, 8 * shard);
  EXPECT_EQ(z1.memory.master, 4 * shard);
  EXPECT_EQ(z1.memory.grads, 4 * flat);
  EXPECT_EQ(z1.memory.model_copy, 2 * flat);
  EXPECT_EQ(z3.memory.grads, 4 * shard);
  EXPECT_EQ(z3.memory.model_copy, 2 * shard);
  EXPECT_GT(z0.comm.dp, 0);
  // Transients (docs/fsdp.md): stage 2 fills full gradient buffers during the step; stage 3 without
  // full recompute keeps every layer's gathered weights until its backward (one micro-batch here).
  in.layout.zero = 2;
  EXPECT_EQ(make_plan(in, cal).memory.comm_buffers, 4 * (p - std::ceil(p / 8)));
  EXPECT_EQ(z3.memory.comm_buffers,
            2 * (p - std::ceil(p / 8)) +
                8 * double(stage_param_elements(in.model, 1, 1, false, false, false)));
  // Context parallelism joins the shard group: dp 4 x cp 2 shards over 8.
  in.layout.zero = 1;
  in.layout.cp = 2;
  EXPECT_EQ(make_plan(in, cal).memory.optimizer, 8 * shard);
}

TEST(Plan, SearchRanksFeasibleLayoutsAndExplainsRejections) {
  PlanInput in;
  in.model = model_config("esm2-15b");
  in.gpus = 64;
  in.tokens_per_step = 1 << 21;
  const SearchResult s = search_layouts(in, h100(), SearchOptions{});
  ASSERT_FALSE(s.feasible.empty());
  for (size_t i = 1; i < s.feasible.size(); ++i)
    EXPECT_GE(s.feasible[i - 1].result.tokens_per_second, s.feasible[i].result.tokens_per_second);
  for (const SearchCandidate& c : s.feasible) {
    EXPECT_TRUE(c.result.fits);
    EXPECT_LE(c.result.bubble_fraction, 0.5);
  }
  bool memory = false, heads = false;
  for (const SearchRejection& r : s.rejected) {
    memory |= r.reason.starts_with("memory:");
    heads |= r.reason.find("heads 40") != std::string::npos;  // tp 16
  }
  EXPECT_TRUE(memory);
  EXPECT_TRUE(heads);
}

}  // namespace
}  // namespace helix

namespace helix {
namespace {

TEST(Plan, MeasuredLayerSliceRowsTakePrecedence) {
  // A helix_bench_layer_slice file: a GEMM row of the 98B TP=8 qkv slice, an attention row at head
  // dim 64, and a whole-layer row of ESM-2 650M.
  const std::string path =
      (std::filesystem::temp_directory_path() / "helix_plan_slice_test.json").string();
  {
    std::ofstream f(path);
    f << R"({"gemm": [{"pass": "fwd", "m": 16384, "n": 2304, "k": 6144, "bf16_tflops": 500}],
             "attention": [{"head_dim": 64, "fwd_tflops": 190, "fwd_bwd_tflops": 130}],
             "layers": [{"name": "esm2-650m", "hidden": 1280, "heads": 20, "ffn": 5120, "tp": 1,
                         "tokens": 16384, "seq_len": 504, "fwd_bwd_ms": 7.5}]})";
  }
  Calibration cal = h100();
  const double fit = cal.gemm_seconds(GemmPass::kFwd, 16384, 2304, 6144, false);
  const double base_d128 = cal.attention_fwd_bwd_flops(128);
  merge_calibration(cal, load_calibration(path));
  const double measured = cal.gemm_seconds(GemmPass::kFwd, 16384, 2304, 6144, false);
  EXPECT_NEAR(measured, 2.0 * 16384 * 2304 * 6144 / 500e12, 1e-12);
  EXPECT_NE(measured, fit);
  EXPECT_NEAR(cal.attention_fwd_bwd_flops(64), 130e12, 1e6);     // replaced
  EXPECT_EQ(cal.attention_fwd_bwd_flops(128), base_d128);        // kept
  // The layer row rescales the 650M layer so that one layer's fwd+bwd takes the measured 7.5 ms.
  const PlanResult r = make_plan(single(model_config("esm2-650m"), true, 16384), cal);
  EXPECT_GT(r.layer_factor, 1.0);
  EXPECT_NEAR((r.time.gemm + r.time.attention + r.time.memory_bound) / 33, 7.5e-3, 1e-9);
  std::filesystem::remove(path);
}

// `helix plan --fp8` takes `helix train`'s spelling (none | delayed) and the older "off"; anything
// else is refused with the flag named.
TEST(Plan, Fp8FlagTakesTrainsSpelling) {
  const std::string cal = std::string(HELIX_SOURCE_DIR) + "/examples/calibration/h100.json";
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(cmd_plan({"--model", "esm2-8m", "--calibration", cal, "--fp8", "none", "--json"}), 0);
  const std::string none = ::testing::internal::GetCapturedStdout();
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(cmd_plan({"--model", "esm2-8m", "--calibration", cal, "--fp8", "off", "--json"}), 0);
  EXPECT_EQ(::testing::internal::GetCapturedStdout(), none);
  ::testing::internal::CaptureStdout();
  EXPECT_EQ(cmd_plan({"--model", "esm2-8m", "--calibration", cal, "--fp8", "delayed", "--json"}),
            0);
  const std::string delayed = ::testing::internal::GetCapturedStdout();
  EXPECT_NE(delayed.find("\"fp8\":\"delayed\""), std::string::npos) << delayed;
  EXPECT_NE(none.find("\"fp8\":\"off\""), std::string::npos) << none;
  try {
    cmd_plan({"--model", "esm2-8m", "--calibration", cal, "--fp8", "e5m2"});
    ADD_FAILURE() << "--fp8 e5m2 was accepted";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("--fp8"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace helix
