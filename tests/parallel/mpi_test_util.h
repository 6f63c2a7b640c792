#pragma once
// Helpers for the multi-rank tests (run under mpirun; main() in mpi_main.cpp owns MPI). Every rank
// runs every test; skip conditions must be the same on every rank, or the collectives mismatch.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "core/device.h"
#include "parallel/context.h"
#include "test_util.h"

namespace helix {
// Readable test parameters in gtest's messages.
inline void PrintTo(DType t, std::ostream* os) { *os << dtype_name(t); }
inline void PrintTo(DeviceType d, std::ostream* os) {
  *os << (d == DeviceType::kCPU ? "cpu" : "cuda");
}
}  // namespace helix

namespace helix::testing {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// This rank's GPU when GPUs are shared round-robin (several ranks may share one).
inline Device rank_gpu() { return Device::cuda(world_rank() % cuda_device_count()); }

// The backend of the CUDA suites: NCCL when every rank has its own GPU (one process per GPU, the
// production layout), else the host-staged MPI backend (ranks share GPUs); MPI for CPU ranks.
inline CommBackend backend_for(Device device) { return preferred_backend(device, world_size()); }

inline ParallelContext make_context(ParallelSizes sizes, CommBackend backend = CommBackend::kMpi,
                                    Device device = Device::cpu()) {
  ParallelOptions o;
  o.sizes = sizes;
  o.backend = backend;
  o.device = device;
  return ParallelContext::create(MPI_COMM_WORLD, o);
}

// NCCL needs one GPU per rank of a communicator.
#define HELIX_REQUIRE_GPU_PER_RANK()                                                    \
  do {                                                                                  \
    if (::helix::cuda_device_count() < ::helix::testing::world_size())                  \
      GTEST_SKIP() << "NCCL needs one GPU per rank: " << ::helix::testing::world_size() \
                   << " ranks, " << ::helix::cuda_device_count() << " GPUs ("           \
                   << (::helix::cuda_available() ? std::string("too few")               \
                                                 : ::helix::cuda_unavailable_reason())  \
                   << ")";                                                              \
  } while (0)

// True on every rank when the condition holds on every rank (for EXPECTs that must agree).
inline bool all_ranks(bool ok) {
  int v = ok ? 1 : 0, all = 0;
  MPI_Allreduce(&v, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

// Element i of world rank r's input: exact in f32, bf16 and i32, and small enough that sums and
// averages over 4 ranks stay exact in every one of them (quarters in [-12.5, 12.5]; integers).
inline double value(DType t, int r, int64_t i, int seed) {
  const int64_t k = (i * 7919 + int64_t{r} * 104729 + seed * 31) % 101;
  return t == DType::kI32 ? double(k * 13 - 650) : double(k - 50) / 4.0;
}

// A tensor [n] on `device` with element i = value(t, r, offset + i, seed).
inline Tensor make_input(DType t, int64_t n, int r, int seed, int64_t offset, Device device) {
  Tensor h = Tensor::empty({n}, t);
  for (int64_t i = 0; i < n; ++i) {
    const double v = value(t, r, offset + i, seed);
    switch (t) {
      case DType::kF32:
        h.data<float>()[i] = static_cast<float>(v);
        break;
      case DType::kBF16:
        h.data<bf16_t>()[i] = bf16_t::from_float(static_cast<float>(v));
        break;
      case DType::kI32:
        h.data<int32_t>()[i] = static_cast<int32_t>(v);
        break;
      default:
        HELIX_FAIL("make_input: dtype {}", dtype_name(t));
    }
  }
  return device.is_cpu() ? h : h.to(device);
}

// Exact comparison (every expected value is representable); reports the first mismatch.
inline ::testing::AssertionResult equals(const Tensor& actual,
                                         const std::vector<double>& expected) {
  const Tensor h = actual.is_cpu() ? actual : actual.to(Device::cpu());
  if (h.numel() != static_cast<int64_t>(expected.size()))
    return ::testing::AssertionFailure() << "numel " << h.numel() << " vs " << expected.size();
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < h.numel(); ++i) {
    const double a = cpu_value(h, i), e = expected[static_cast<size_t>(i)];
    if (!(a == e || (std::isnan(a) && std::isnan(e)))) {
      if (first < 0) first = i;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << h.numel() << " elements differ; first at " << first << ": "
         << cpu_value(h, first) << " vs expected " << expected[static_cast<size_t>(first)];
}

}  // namespace helix::testing
