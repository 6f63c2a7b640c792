// helix_bench_cp_attention: attention forward + backward per step under context parallelism, cp =
// the number of ranks (mpirun -np 1 | 2 | 4; ranks share the GPUs round-robin), both K/V exchange
// modes, with and without sequence-aware placement. One JSON line per (case, comm, split_min_len)
// from rank 0: the global batch, the rank's rows (max and min over ranks, the load balance), the
// bytes each rank sends per layer (computed from the plan: cp_attention_bytes), and the median
// wall time of one fwd+bwd step (the slowest rank, after a barrier; ms).
// Cases (bf16, heads 20 x head dim 64, ESM-2 650M's attention shape):
//   protein    log-normal lengths, median 300, clipped to [8, 1026], about 64k tokens
//   mixed      the protein batch's first ~48k tokens plus 2 x 8192
//   long8k     8 x 8192 tokens;  long32k  2 x 32768 tokens
//   smoke      4 short sequences, heads 2 x dim 16: a CPU check that the binary runs
// Ranks sharing ONE GPU run the whole global batch's work on that GPU (plus the exchange, host
// staged through MPI): their time is CP's overhead, not its speedup; with one GPU per rank (NCCL)
// the ring overlaps the transfers with compute.
//   mpirun -np N helix_bench_cp_attention [--cases protein,mixed,long8k,long32k] [--iters 10]
//     [--warmup 3] [--split-min-lens 0,2048] [--comms ring,all-gather] [--dry-run]
// --dry-run: plans only (no attention, fwdbwd_ms = -1): the bytes and row tables on any machine.
#include "parallel/cp_attention.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/random.h"
#include "core/tensor.h"
#include "kernels/attention/attention.h"
#include "parallel/context.h"

#if HELIX_WITH_CUDA
#include <cuda_runtime.h>

#include "core/cuda_check.h"
#endif

namespace helix {
namespace {

struct Case {
  std::string name;
  std::vector<int32_t> lengths;
  int heads = 20;
  int dim = 64;
};

std::vector<int32_t> protein_lengths(uint64_t seed, int64_t budget) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(std::log(300.0), 0.6);
  std::vector<int32_t> lens;
  int64_t total = 0;
  for (;;) {
    const auto len =
        static_cast<int32_t>(std::clamp(std::lround(std::exp(normal(rng))), 8L, 1026L));
    if (total + len > budget) break;
    lens.push_back(len);
    total += len;
  }
  return lens;
}

std::vector<Case> all_cases() {
  std::vector<int32_t> mixed = protein_lengths(1234, 49152);
  mixed.push_back(8192);
  mixed.push_back(8192);
  return {{"protein", protein_lengths(1234, 65536)},
          {"mixed", mixed},
          {"long8k", std::vector<int32_t>(8, 8192)},
          {"long32k", std::vector<int32_t>(2, 32768)},
          {"smoke", {300, 40, 1000, 77}, 2, 16}};
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

// A global batch of `lens` (tokens and labels unused by attention: <cls>-like 0 and no label).
ThdBatch batch_of(const std::vector<int32_t>& lens) {
  std::vector<int32_t> cu{0};
  for (int32_t l : lens) cu.push_back(cu.back() + l);
  const int64_t t = cu.back(), n = static_cast<int64_t>(cu.size());
  ThdBatch b;
  b.tokens = Tensor::from_vector(std::vector<int32_t>(static_cast<size_t>(t), 0), {t});
  b.labels = Tensor::from_vector(std::vector<int32_t>(static_cast<size_t>(t), -100), {t});
  b.cu_seqlens = Tensor::from_vector(cu, {n});
  b.cu_seqlens_padded = b.cu_seqlens.clone();
  b.max_seqlen = *std::max_element(lens.begin(), lens.end());
  b.num_tokens = t;
  return b;
}

ThdAttentionLayout layout_of(const ThdBatch& b, Device dev) {
  ThdAttentionLayout l;
  l.cu_seqlens_q = CuSeqlens::make(b.cu_seqlens.to_vector<int32_t>(), dev);
  l.cu_seqlens_kv = l.cu_seqlens_q;
  l.cu_seqlens_q_padded = CuSeqlens::make(b.cu_seqlens_padded.to_vector<int32_t>(), dev);
  l.cu_seqlens_kv_padded = l.cu_seqlens_q_padded;
  l.max_seqlen_q = l.max_seqlen_kv = std::max(b.max_seqlen, 1);
  return l;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

struct Run {
  const Case* c = nullptr;
  CpComm comm = CpComm::kRing;
  int32_t split_min_len = 0;
  int warmup = 3, iters = 10;
  bool dry_run = false;
};

// Median wall time (ms, the slowest rank) of one cp attention fwd+bwd step on random operands.
double time_step(const ParallelContext& ctx, const CpBatch& cb, const CpAttentionPlan& plan,
                 const Case& c, const Run& r) {
  const Device dev = ctx.device();
  // A created (non-legacy) compute stream: CUDA serialises the legacy default stream with every
  // blocking stream, which would keep the comm stream's transfers from overlapping.
  const Stream s = dev.is_cuda() ? Stream::create(dev) : Stream();
  Communicator& comm = ctx.cp();
  const int64_t t = cb.local.total_tokens(), h = c.heads, d = c.dim;
  const DType dt = DType::kBF16;
  const auto make = [&](uint64_t sub) {
    Tensor host = Tensor::empty({t, h, d}, DType::kF32);
    fill_normal(host, 42 + static_cast<uint64_t>(comm.rank()), sub, 0.f, 1.f);
    return host.to(dt).to(dev);
  };
  CpAttentionFwdParams f;
  f.comm = &comm;
  f.plan = &plan;
  f.q = make(1), f.k = make(2), f.v = make(3);
  f.local = layout_of(cb.local, dev);
  f.softmax_scale = static_cast<float>(1.0 / std::sqrt(double(d)));
  f.o = Tensor::empty({t, h, d}, dt, dev, s);
  f.lse = Tensor::empty({h, t}, DType::kF32, dev, s);
  CpAttentionBwdParams b;
  b.comm = f.comm, b.plan = f.plan, b.q = f.q, b.k = f.k, b.v = f.v, b.o = f.o, b.lse = f.lse;
  b.d_o = make(4);
  b.local = f.local;
  b.softmax_scale = f.softmax_scale;
  b.d_q = Tensor::empty({t, h, d}, dt, dev, s);
  b.d_k = Tensor::empty({t, h, d}, dt, dev, s);
  b.d_v = Tensor::empty({t, h, d}, dt, dev, s);
  std::vector<double> ms;
  for (int i = 0; i < r.warmup + r.iters; ++i) {
    comm.barrier();
    const double t0 = now_ms();
    cp_attention_fwd(f, s);
    cp_attention_bwd(b, s);
    s.synchronize();
    double dt_ms = now_ms() - t0;
    MPI_Allreduce(MPI_IN_PLACE, &dt_ms, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (i >= r.warmup) ms.push_back(dt_ms);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

void run(const ParallelContext& ctx, const Run& r, const std::string& device_name) {
  const Case& c = *r.c;
  const Device dev = ctx.device();
  Communicator& comm = ctx.cp();
  const int cp = comm.size(), rank = comm.rank();
  const CpBatch cb = cp_split_batch(batch_of(c.lengths), cp, rank,
                                    CpShardOptions{.split_min_len = r.split_min_len});
  const auto plan = make_cp_attention_plan(cb.layouts, rank, r.comm, dev);
  const int64_t t = cb.local.total_tokens(), h = c.heads, d = c.dim;
  const double step_ms = r.dry_run ? -1.0 : time_step(ctx, cb, *plan, c, r);
  const CpAttentionBytes bytes = cp_attention_bytes(*plan, h, d, 2);
  int64_t rows[2] = {t, -t};  // max rows, -min rows
  MPI_Allreduce(MPI_IN_PLACE, rows, 2, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
  if (ctx.world_rank() != 0) return;
  int64_t tokens = 0;
  for (int32_t l : c.lengths) tokens += l;
  std::printf(
      "{\"bench\": \"cp_attention\", \"case\": \"%s\", \"cp\": %d, \"comm\": \"%s\", "
      "\"split_min_len\": %d, "
      "\"backend\": \"%s\", \"heads\": %d, \"head_dim\": %d, \"seqs\": %zu, \"tokens\": %lld, "
      "\"split_seqs\": %d, "
      "\"rows_max\": %lld, \"rows_min\": %lld, \"bytes_fwd_per_rank\": %lld, "
      "\"bytes_bwd_per_rank\": %lld, "
      "\"fwdbwd_ms\": %.3f, \"device\": \"%s\"}\n",
      c.name.c_str(), cp, std::string(cp_comm_name(r.comm)).c_str(), r.split_min_len,
      std::string(comm.backend_name()).c_str(), c.heads, c.dim, c.lengths.size(),
      static_cast<long long>(tokens), plan->num_split, static_cast<long long>(rows[0]),
      static_cast<long long>(-rows[1]), static_cast<long long>(bytes.fwd),
      static_cast<long long>(bytes.bwd), step_ms, device_name.c_str());
  std::fflush(stdout);
}

int bench_main(int argc, char** argv) {
  std::string case_list = "protein,mixed,long8k,long32k", lens_list = "0,2048",
              comm_list = "ring,all-gather";
  int iters = 10, warmup = 3;
  bool dry_run = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      HELIX_CHECK(i + 1 < argc, "{}: expected a value", a);
      return argv[++i];
    };
    if (a == "--iters")
      iters = std::atoi(next().c_str());
    else if (a == "--warmup")
      warmup = std::atoi(next().c_str());
    else if (a == "--cases")
      case_list = next();
    else if (a == "--split-min-lens")
      lens_list = next();
    else if (a == "--comms")
      comm_list = next();
    else if (a == "--dry-run")
      dry_run = true;
    else
      HELIX_FAIL("unknown argument {} (see the header of tests/bench/cp_attention.cpp)", a);
  }
  HELIX_CHECK(iters >= 1 && warmup >= 0, "--iters: expected >= 1, got {}", iters);
  int world = 1, world_rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  ParallelOptions po;
  po.sizes = ParallelSizes{.cp = world};
  std::string device_name = "cpu";
  if (cuda_available()) {
    po.device = Device::cuda(world_rank % cuda_device_count());
    po.backend = preferred_backend(po.device, world);
#if HELIX_WITH_CUDA
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, po.device.index));
    device_name = prop.name;
#endif
  }
  const ParallelContext ctx = ParallelContext::create(MPI_COMM_WORLD, po);
  const std::vector<Case> cases = all_cases();
  for (const std::string& name : split(case_list)) {
    const auto it =
        std::find_if(cases.begin(), cases.end(), [&](const Case& c) { return c.name == name; });
    HELIX_CHECK(it != cases.end(), "--cases: unknown case '{}'", name);
    for (const std::string& cm : split(comm_list))
      for (const std::string& l : split(lens_list))
        run(ctx,
            Run{.c = &*it,
                .comm = parse_cp_comm(cm),
                .split_min_len = std::atoi(l.c_str()),
                .warmup = warmup,
                .iters = iters,
                .dry_run = dry_run},
            device_name);
  }
  return 0;
}

}  // namespace
}  // namespace helix

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rc = 1;
  try {
    rc = helix::bench_main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "helix_bench_cp_attention: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
