// helix_bench_comm: bus bandwidth of helix's world communicator (NCCL with one GPU per rank, else
// the host-staged MPI backend) for all-reduce (sum) and all-gather, f32 messages of 1 MB .. 1 GB
// (the total buffer: all-reduce's tensor, all-gather's output). One JSON line per (op, bytes)
// from rank 0: median time over --iters calls after --warmup, algorithm bandwidth bytes / time and
// bus bandwidth (nccl-tests' convention: all-reduce algbw * 2(n-1)/n, all-gather algbw * (n-1)/n),
// so the numbers compare with examples/bench/comm_torch.py (NCCL through torch.distributed).
//   mpirun -np N helix_bench_comm [--min-mb 1] [--max-mb 1024] [--iters 20] [--warmup 5]
// Not a test: examples/bench/run_comm_bench.sh runs both sides and prints the ratio table.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/error.h"
#include "core/tensor.h"
#include "parallel/context.h"

namespace helix {
namespace {

// Median wall time of `iters` calls of fn (each ends with the stream synchronised and a barrier).
template <typename F>
double median_seconds(int warmup, int iters, const Stream& stream, F&& fn) {
  std::vector<double> t;
  for (int i = 0; i < warmup + iters; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    stream.synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double worst = 0;  // the slowest rank's time
    MPI_Allreduce(&s, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    if (i >= warmup) t.push_back(worst);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int bench_main(int argc, char** argv) {
  double min_mb = 1, max_mb = 1024;
  int iters = 20, warmup = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      HELIX_CHECK(i + 1 < argc, "{}: expected a value", a);
      return argv[++i];
    };
    if (a == "--min-mb")
      min_mb = std::atof(next().c_str());
    else if (a == "--max-mb")
      max_mb = std::atof(next().c_str());
    else if (a == "--iters")
      iters = std::atoi(next().c_str());
    else if (a == "--warmup")
      warmup = std::atoi(next().c_str());
    else
      HELIX_FAIL("unknown argument {} (see the header of tests/bench/comm.cpp)", a);
  }
  HELIX_CHECK(iters >= 1 && warmup >= 0 && min_mb > 0 && max_mb >= min_mb,
              "expected --iters >= 1, --warmup >= 0, 0 < --min-mb <= --max-mb");
  int world = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  ParallelOptions po;
  if (cuda_available()) {
    po.device = Device::cuda(rank % cuda_device_count());
    po.backend = preferred_backend(po.device, world);
  }
  const ParallelContext ctx = ParallelContext::create(MPI_COMM_WORLD, po);
  Communicator& comm = ctx.world();
  const Device dev = po.device;
  const Stream stream = dev.is_cuda() ? Stream::cuda_default(dev.index) : Stream();
  const double n = world;
  for (double mb = min_mb; mb <= max_mb * 1.0001; mb *= 2) {
    // Elements divisible by the world size (all-gather splits the output evenly).
    const int64_t elems = std::max<int64_t>(world, int64_t(mb * 1024 * 1024 / 4) / world * world);
    const double bytes = double(elems) * 4;
    Tensor buf = Tensor::zeros({elems}, DType::kF32, dev, stream);
    Tensor part = Tensor::zeros({elems / world}, DType::kF32, dev, stream);
    struct Op {
      const char* name;
      double bus_factor;
    };
    for (const Op op : {Op{"all_reduce", 2 * (n - 1) / n}, Op{"all_gather", (n - 1) / n}}) {
      const double s = median_seconds(warmup, iters, stream, [&] {
        if (op.name[4] == 'r')
          comm.all_reduce(buf, ReduceOp::kSum, stream);
        else
          comm.all_gather(part, buf, stream);
      });
      const double algbw = bytes / s / 1e9;
      if (rank == 0)
        std::printf(
            "{\"bench\": \"comm\", \"side\": \"helix\", \"backend\": \"%s\", \"ranks\": %d, \"op\": \"%s\", "
            "\"bytes\": %.0f, \"us\": %.1f, \"algbw_gbps\": %.2f, \"busbw_gbps\": %.2f}\n",
            std::string(comm.backend_name()).c_str(), world, op.name, bytes, s * 1e6, algbw,
            algbw * op.bus_factor);
    }
    std::fflush(stdout);
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
    std::fprintf(stderr, "helix_bench_comm: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
