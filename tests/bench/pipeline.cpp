// helix_bench_pipeline: the pipeline bubble the schedule predicts against the idle time measured
// per stage. Runs under mpirun with pp = the world size (one stage per rank): an ESM-2-shaped model
// (synthetic micro-batches of protein-like lengths, padded to --tokens), --steps timed steps after
// one warm-up step, the stream synchronised after every forward / backward (device time on a GPU).
// Measured bubble = sum over stages of (makespan - compute) / (stages * makespan), makespan the
// slowest stage's step time; predicted = simulate_pipeline with the measured backward / forward
// ratio and the layers per virtual stage as stage weights (free transfers; the executor's action
// lists reproduce that timeline, test ExecutionModelEqualsSchedule). One JSON line per stage, then
// a summary line, on world rank 0's stdout.
//   mpirun -np N helix_bench_pipeline [--layers 8] [--hidden 256] [--heads 8] [--ffn 1024]
//       [--tokens 512] [--micro-batches 8] [--virtual 1] [--pp-layers 3,2,...] [--steps 3]
//       [--device cpu|cuda] [--backend mpi|nccl]
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/error.h"
#include "layers/esm2.h"
#include "layers/esm2_pipeline.h"
#include "parallel/esm2_test_batch.h"
#include "parallel/pipeline_schedule.h"

namespace helix {
namespace {

struct Args {
  int layers = 8, hidden = 256, heads = 8, ffn = 1024, micro_batches = 8, virtual_stages = 1,
      steps = 3;
  int64_t tokens = 512;
  std::string pp_layers, device = "cpu", backend = "mpi";
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--layers")
      a.layers = std::stoi(v);
    else if (k == "--hidden")
      a.hidden = std::stoi(v);
    else if (k == "--heads")
      a.heads = std::stoi(v);
    else if (k == "--ffn")
      a.ffn = std::stoi(v);
    else if (k == "--tokens")
      a.tokens = std::stoll(v);
    else if (k == "--micro-batches")
      a.micro_batches = std::stoi(v);
    else if (k == "--virtual")
      a.virtual_stages = std::stoi(v);
    else if (k == "--pp-layers")
      a.pp_layers = v;
    else if (k == "--steps")
      a.steps = std::stoi(v);
    else if (k == "--device")
      a.device = v;
    else if (k == "--backend")
      a.backend = v;
    else
      HELIX_FAIL("helix_bench_pipeline: unknown option '{}'", k);
  }
  return a;
}

// Protein-like micro-batch: lengths 40..200 until `tokens` would be exceeded.
ThdBatch micro_batch(int step, int mb, int64_t tokens, Device device) {
  std::vector<int> lens;
  int64_t used = 0;
  uint64_t s = 0x9E3779B97F4A7C15ull * static_cast<uint64_t>(1 + step * 1009 + mb);
  for (;;) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const int len = 40 + static_cast<int>((s >> 33) % 161);
    if (used + len > tokens) break;
    lens.push_back(len);
    used += len;
  }
  if (lens.empty()) lens.push_back(static_cast<int>(tokens));
  return testing::synthetic_esm2_batch(lens, s, 15, device);
}

int run(int argc, char** argv) {
  const Args a = parse(argc, argv);
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const Device device =
      a.device == "cuda" ? Device::cuda(rank % cuda_device_count()) : Device::cpu();
  ParallelOptions po;
  po.sizes = ParallelSizes{.pp = world};
  po.device = device;
  po.backend = a.backend == "nccl" ? CommBackend::kNccl : CommBackend::kMpi;
  ParallelContext ctx = ParallelContext::create(MPI_COMM_WORLD, po);
  ModelConfig cfg;
  cfg.name = "bench-pp";
  cfg.layers = a.layers;
  cfg.hidden = a.hidden;
  cfg.heads = a.heads;
  cfg.ffn = a.ffn;
  const int parts = world * a.virtual_stages;
  std::vector<int> split;
  if (a.pp_layers.empty()) {
    split = esm2_pipeline_split(cfg, parts);
  } else {
    for (size_t p = 0, q; p <= a.pp_layers.size(); p = q + 1) {
      q = a.pp_layers.find(',', p);
      if (q == std::string::npos) q = a.pp_layers.size();
      split.push_back(std::stoi(a.pp_layers.substr(p, q - p)));
    }
  }
  validate_layer_split(split, cfg.layers, parts);
  Esm2Options mo;
  mo.device = device;
  mo.compute = device.is_cuda() ? DType::kBF16 : DType::kF32;
  mo.parallel = &ctx;
  mo.layer_ranges = pipeline_layer_ranges(split, world, rank);
  Esm2Model model(cfg, mo);
  model.init_random(1);
  Esm2Pipeline pipe(model, ctx,
                    Esm2PipelineOptions{.virtual_stages = a.virtual_stages,
                                        .token_budget = a.tokens,
                                        .layers_per_stage = split,
                                        .timed = true});
  const Stream stream = device.is_cuda() ? Stream::cuda_default(device.index) : Stream();
  std::vector<double> sums(4, 0.0);  // compute, forward, backward, total
  for (int step = 0; step <= a.steps; ++step) {
    std::vector<ThdBatch> micro;
    for (int m = 0; m < a.micro_batches; ++m)
      micro.push_back(micro_batch(step, m, a.tokens, device));
    model.params().zero_grads(stream);
    stream.synchronize();
    ctx.world().barrier();
    pipe.train_step(micro, 1e-3f, stream);
    stream.synchronize();
    if (step == 0) continue;  // warm-up
    const PipelineRunStats& st = pipe.last_stats();
    sums[0] += st.compute_s;
    sums[1] += st.forward_s;
    sums[2] += st.backward_s;
    sums[3] += st.total_s;
  }
  std::vector<double> all(4 * static_cast<size_t>(world));
  MPI_Gather(sums.data(), 4, MPI_DOUBLE, all.data(), 4, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  if (rank != 0) return 0;
  double makespan = 0, fwd = 0, bwd = 0, idle = 0;
  for (int r = 0; r < world; ++r) {
    makespan = std::max(makespan, all[4 * r + 3] / a.steps);
    fwd += all[4 * r + 1];
    bwd += all[4 * r + 2];
  }
  for (int r = 0; r < world; ++r) {
    const double compute = all[4 * r] / a.steps;
    idle += makespan - compute;
    std::printf(
        "{\"stage\": %d, \"compute_ms\": %.2f, \"forward_ms\": %.2f, \"backward_ms\": %.2f, "
        "\"step_ms\": %.2f, "
        "\"idle_ms\": %.2f}\n",
        r, 1e3 * compute, 1e3 * all[4 * r + 1] / a.steps, 1e3 * all[4 * r + 2] / a.steps,
        1e3 * all[4 * r + 3] / a.steps, 1e3 * (makespan - compute));
  }
  PipelineCosts costs{.forward = 1.0, .backward = bwd / fwd};
  for (int s : split) costs.stage_weight.push_back(s);
  const PipelineScheduleParams sp{
      .stages = world, .virtual_stages = a.virtual_stages, .micro_batches = a.micro_batches};
  std::printf(
      "{\"stages\": %d, \"virtual\": %d, \"micro_batches\": %d, \"split\": \"%s\", \"device\": "
      "\"%s\", "
      "\"backward_over_forward\": %.3f, \"predicted_bubble\": %.4f, \"uniform_bubble\": %.4f, "
      "\"measured_bubble\": %.4f, \"step_ms\": %.2f}\n",
      world, a.virtual_stages, a.micro_batches,
      a.pp_layers.empty() ? "balanced" : a.pp_layers.c_str(), device.str().c_str(), bwd / fwd,
      pipeline_bubble_fraction(sp, costs),
      pipeline_bubble_fraction(sp, PipelineCosts{.forward = 1, .backward = bwd / fwd}),
      idle / (world * makespan), 1e3 * makespan);
  return 0;
}

}  // namespace
}  // namespace helix

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 0;
  try {
    rc = helix::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "helix_bench_pipeline: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
