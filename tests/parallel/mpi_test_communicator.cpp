// Every collective of both backends on odd sizes (1, 7, 1000003) for f32, bf16 and i32, over the
// world and over sub-groups (tp and dp of a tp=2 context), each compared element by element against
// the result computed locally from the formula every rank fills its inputs with:
//  * MPI: CPU tensors, and CUDA tensors staged through the host (CUDA builds with a GPU; ranks may
//    share one GPU);
//  * NCCL (CUDA builds): CUDA tensors on one GPU per rank (skipped with fewer GPUs than ranks), and
//    CPU tensors, which the NCCL communicator hands to its MPI twin.
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>

#include "mpi_test_util.h"
#include "parallel/checks.h"
#include "parallel/mpi_communicator.h"

namespace helix {
namespace {

using testing::equals;
using testing::make_input;
using testing::value;
using testing::world_rank;
using testing::world_size;

enum class Which { kWorld, kTP, kDP };
const char* which_name(Which w) {
  return w == Which::kWorld ? "world" : w == Which::kTP ? "tp" : "dp";
}

using Param = std::tuple<DType, int64_t, Which, DeviceType, CommBackend>;

class Collectives : public ::testing::TestWithParam<Param> {
 protected:
  static void TearDownTestSuite() {
    for (auto& c : ctx_) c.reset();
  }

  void SetUp() override {
    std::tie(dtype_, n_, which_, device_type_, backend_) = GetParam();
    if (device_type_ == DeviceType::kCUDA) {
      HELIX_REQUIRE_CUDA();
      device_ = testing::rank_gpu();
      stream_ = Stream::create(device_);
    }
    if (backend_ == CommBackend::kNccl) HELIX_REQUIRE_GPU_PER_RANK();
    // One context per backend for the whole suite, made by the first test that needs it (every rank
    // runs the same tests and skips alike, so every rank makes it at the same point). tp = 2 when
    // the world allows: tp groups are pairs of consecutive ranks, dp groups the others.
    auto& ctx = ctx_[static_cast<size_t>(backend_)];
    if (!ctx) {
      ctx = std::make_unique<ParallelContext>(testing::make_context(
          {.tp = world_size() % 2 == 0 ? 2 : 1}, backend_,
          backend_ == CommBackend::kNccl ? testing::rank_gpu() : Device::cpu()));
    }
    comm_ = which_ == Which::kWorld ? &ctx->world()
            : which_ == Which::kTP  ? &ctx->tp()
                                    : &ctx->dp();
    ASSERT_EQ(comm_->backend_name(), backend_ == CommBackend::kNccl ? "nccl" : "mpi");
  }
  // World rank of group rank g.
  int member(int g) const { return comm_->group().ranks[static_cast<size_t>(g)]; }
  Tensor input(int64_t n, int seed, int64_t offset = 0) const {
    return make_input(dtype_, n, world_rank(), seed, offset, device_);
  }
  Tensor output(int64_t n) const {
    // Poisoned (unwritten elements fail), on the stream the collective runs on.
    Tensor t = Tensor::empty({n}, dtype_, device_, stream_);
    t.fill(dtype_ == DType::kI32 ? -7 : std::nan(""), stream_);
    return t;
  }
  void sync() const { stream_.synchronize(); }

  static std::unique_ptr<ParallelContext> ctx_[2];
  DType dtype_ = DType::kF32;
  int64_t n_ = 0;
  Which which_ = Which::kWorld;
  DeviceType device_type_ = DeviceType::kCPU;
  CommBackend backend_ = CommBackend::kMpi;
  Device device_ = Device::cpu();
  Stream stream_;
  Communicator* comm_ = nullptr;
};
std::unique_ptr<ParallelContext> Collectives::ctx_[2];

TEST_P(Collectives, AllReduceSumMaxAvg) {
  for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kAvg}) {
    if (op == ReduceOp::kAvg && dtype_ == DType::kI32) continue;
    SCOPED_TRACE(std::string(reduce_op_name(op)));
    const int seed = 1 + static_cast<int>(op);
    Tensor t = input(n_, seed);
    comm_->all_reduce(t, op, stream_);
    sync();
    std::vector<double> want(static_cast<size_t>(n_));
    for (int64_t i = 0; i < n_; ++i) {
      double acc = op == ReduceOp::kMax ? -1e300 : 0.0;
      for (int g = 0; g < comm_->size(); ++g) {
        const double v = value(dtype_, member(g), i, seed);
        acc = op == ReduceOp::kMax ? std::max(acc, v) : acc + v;
      }
      want[static_cast<size_t>(i)] = op == ReduceOp::kAvg ? acc / comm_->size() : acc;
    }
    EXPECT_TRUE(equals(t, want));
  }
}

TEST_P(Collectives, AllGather) {
  const int size = comm_->size();
  Tensor in = input(n_, 11);
  Tensor out = output(size * n_);
  comm_->all_gather(in, out, stream_);
  sync();
  std::vector<double> want(static_cast<size_t>(size * n_));
  for (int g = 0; g < size; ++g)
    for (int64_t i = 0; i < n_; ++i)
      want[static_cast<size_t>(g * n_ + i)] = value(dtype_, member(g), i, 11);
  EXPECT_TRUE(equals(out, want));

  // In place: the input is this rank's slot of the output.
  Tensor out2 = output(size * n_);
  Tensor slot = out2.slice(comm_->rank() * n_, (comm_->rank() + 1) * n_);
  slot.copy_from(in, stream_);
  comm_->all_gather(slot, out2, stream_);
  sync();
  EXPECT_TRUE(equals(out2, want)) << "in-place all_gather";
}

TEST_P(Collectives, ReduceScatterSum) {
  const int size = comm_->size();
  Tensor in = input(size * n_, 12);
  Tensor out = output(n_);
  comm_->reduce_scatter(in, out, ReduceOp::kSum, stream_);
  sync();
  std::vector<double> want(static_cast<size_t>(n_), 0.0);
  for (int g = 0; g < size; ++g)
    for (int64_t i = 0; i < n_; ++i)
      want[static_cast<size_t>(i)] += value(dtype_, member(g), comm_->rank() * n_ + i, 12);
  EXPECT_TRUE(equals(out, want));
}

TEST_P(Collectives, Broadcast) {
  const int root = comm_->size() - 1;
  Tensor t = input(n_, 13);
  comm_->broadcast(t, root, stream_);
  sync();
  std::vector<double> want(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i)
    want[static_cast<size_t>(i)] = value(dtype_, member(root), i, 13);
  EXPECT_TRUE(equals(t, want));
}

TEST_P(Collectives, SendRecvRing) {
  const int size = comm_->size(), r = comm_->rank();
  SendRecvParams p;
  p.send = input(n_, 14);
  p.dst = (r + 1) % size;
  p.recv = output(n_);
  p.src = (r + size - 1) % size;
  comm_->send_recv(p, stream_);
  sync();
  std::vector<double> want(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i)
    want[static_cast<size_t>(i)] = value(dtype_, member(p.src), i, 14);
  EXPECT_TRUE(equals(p.recv, want));
}

TEST_P(Collectives, SendThenRecvBetweenTwoRanks) {
  if (comm_->size() < 2) GTEST_SKIP() << "needs a group of at least 2 ranks";
  const int r = comm_->rank();
  for (int from : {0, 1}) {
    const int to = 1 - from;
    if (r == from) comm_->send(input(n_, 15 + from), to, stream_);
    if (r == to) {
      Tensor got = output(n_);
      comm_->recv(got, from, stream_);
      sync();
      std::vector<double> want(static_cast<size_t>(n_));
      for (int64_t i = 0; i < n_; ++i)
        want[static_cast<size_t>(i)] = value(dtype_, member(from), i, 15 + from);
      EXPECT_TRUE(equals(got, want)) << "from group rank " << from;
    }
  }
  sync();
}

TEST_P(Collectives, AllToAll) {
  const int size = comm_->size(), r = comm_->rank();
  Tensor in = input(size * n_, 16);
  Tensor out = output(size * n_);
  comm_->all_to_all(in, out, stream_);
  sync();
  // Block g of out is block r of group rank g's input.
  std::vector<double> want(static_cast<size_t>(size * n_));
  for (int g = 0; g < size; ++g)
    for (int64_t i = 0; i < n_; ++i)
      want[static_cast<size_t>(g * n_ + i)] = value(dtype_, member(g), r * n_ + i, 16);
  EXPECT_TRUE(equals(out, want));
}

TEST_P(Collectives, Barrier) { comm_->barrier(); }

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const auto [t, n, w, d, b] = info.param;
  return std::string(b == CommBackend::kMpi ? "mpi_" : "nccl_") + std::string(dtype_name(t)) +
         "_n" + std::to_string(n) + "_" + which_name(w) +
         (d == DeviceType::kCPU ? "_cpu" : "_cuda");
}

const auto kDtypes = ::testing::Values(DType::kF32, DType::kBF16, DType::kI32);
const auto kSizes = ::testing::Values(int64_t{1}, int64_t{7}, int64_t{1000003});
const auto kGroups = ::testing::Values(Which::kWorld, Which::kTP, Which::kDP);

INSTANTIATE_TEST_SUITE_P(Mpi, Collectives,
                         ::testing::Combine(kDtypes, kSizes, kGroups,
#if HELIX_WITH_CUDA
                                            ::testing::Values(DeviceType::kCPU, DeviceType::kCUDA),
#else
                                            ::testing::Values(
                                                DeviceType::kCPU),  // CUDA cases exist in CUDA
                                                                    // builds
#endif
                                            ::testing::Values(CommBackend::kMpi)),
                         param_name);
#if HELIX_WITH_NCCL
INSTANTIATE_TEST_SUITE_P(Nccl, Collectives,
                         ::testing::Combine(kDtypes, kSizes, kGroups,
                                            ::testing::Values(DeviceType::kCUDA, DeviceType::kCPU),
                                            ::testing::Values(CommBackend::kNccl)),
                         param_name);
#endif

// ---- Specific behaviour ------------------------------------------------------------------------
class MpiBackend : public ::testing::Test {
 protected:
  void SetUp() override { ctx_ = std::make_unique<ParallelContext>(testing::make_context({})); }
  std::unique_ptr<ParallelContext> ctx_;
};

TEST_F(MpiBackend, Bf16SumsInFp32AndRoundsOnce) {
  // 256 on rank 0 and 1.5 elsewhere: with 4 ranks fp32 gives 260.5 -> bf16 260, while a sum rounded
  // to bf16 after each step would give 262 (257.5 -> 258, 259.5 -> 260, 261.5 -> 262).
  const float v = world_rank() == 0 ? 256.0f : 1.5f;
  Tensor t = Tensor::from_floats({v, -v, 0.0f}, {3}, DType::kBF16);
  ctx_->world().all_reduce(t, ReduceOp::kSum, Stream());
  const float exact = 256.0f + 1.5f * static_cast<float>(world_size() - 1);
  const float want = bf16_t::from_float(exact).to_float();
  EXPECT_EQ(t.to_floats(), (std::vector<float>{want, -want, 0.0f}));
}

TEST_F(MpiBackend, MaxPropagatesNaNIdenticallyOnEveryRank) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Rank 1 contributes NaN to element 0; element 1 is an ordinary max; element 2 has -inf / +inf.
  const int r = world_rank();
  for (DType t : {DType::kF32, DType::kBF16}) {
    Tensor x = Tensor::from_floats({r == 1 ? nan : float(r), float(r) - 10.0f,
                                    r == 0 ? std::numeric_limits<float>::infinity() : -1.0f},
                                   {3}, t);
    ctx_->world().all_reduce(x, ReduceOp::kMax, Stream());
    const std::vector<float> got = x.to_floats();
    EXPECT_TRUE(std::isnan(got[0])) << dtype_name(t);
    EXPECT_EQ(got[1], float(world_size() - 1) - 10.0f);
    EXPECT_EQ(got[2], std::numeric_limits<float>::infinity());
  }
  Tensor d = Tensor::from_vector<double>({r == 1 ? std::nan("") : 1.0, double(r)}, {2});
  ctx_->world().all_reduce(d, ReduceOp::kMax, Stream());
  EXPECT_TRUE(std::isnan(d.to_vector<double>()[0]));
  EXPECT_EQ(d.to_vector<double>()[1], double(world_size() - 1));
}

TEST_F(MpiBackend, F64AndI64Reduce) {
  const int r = world_rank(), w = world_size();
  Tensor d = Tensor::from_vector<double>({0.1 * r, 1e300 * (r == 0 ? 1 : 0)}, {2});
  ctx_->world().all_reduce(d, ReduceOp::kSum, Stream());
  double s = 0;
  for (int k = 0; k < w; ++k) s += 0.1 * k;
  EXPECT_NEAR(d.to_vector<double>()[0], s, 1e-15);
  EXPECT_EQ(d.to_vector<double>()[1], 1e300);
  Tensor i = Tensor::from_vector<int64_t>({int64_t{1} << 40, r}, {2});
  ctx_->world().all_reduce(i, ReduceOp::kMax, Stream());
  EXPECT_EQ(i.to_vector<int64_t>(), (std::vector<int64_t>{int64_t{1} << 40, w - 1}));
}

TEST_F(MpiBackend, Fp8AndU8MoveButDoNotReduce) {
  const int r = world_rank(), w = world_size();
  Tensor in = Tensor::from_floats({float(r), 0.5f * float(r)}, {2}, DType::kE4M3);
  Tensor out = all_gather(ctx_->world(), in, Stream());
  std::vector<float> want;
  for (int k = 0; k < w; ++k) {
    want.push_back(e4m3_t::from_float(float(k)).to_float());
    want.push_back(e4m3_t::from_float(0.5f * float(k)).to_float());
  }
  EXPECT_EQ(out.to_floats(), want);
  Tensor u = Tensor::from_vector<uint8_t>({uint8_t(200 + r)}, {1});
  ctx_->world().broadcast(u, 0, Stream());
  EXPECT_EQ(u.to_vector<uint8_t>()[0], 200);
  EXPECT_THROW(ctx_->world().all_reduce(in, ReduceOp::kMax, Stream()), Error);
  EXPECT_THROW(ctx_->world().all_reduce(u, ReduceOp::kSum, Stream()), Error);
}

TEST_F(MpiBackend, MultiDimensionalRowsGatherAndScatter) {
  const int r = world_rank(), w = world_size();
  // in [2, 3] per rank: rows of world rank r hold 100*r + 10*row + col.
  std::vector<float> v;
  for (int row = 0; row < 2; ++row)
    for (int c = 0; c < 3; ++c) v.push_back(float(100 * r + 10 * row + c));
  Tensor in = Tensor::from_floats(v, {2, 3}, DType::kF32);
  Tensor out = all_gather(ctx_->world(), in, Stream());
  ASSERT_EQ(out.shape(), (Shape{2 * w, 3}));
  for (int k = 0; k < w; ++k)
    for (int row = 0; row < 2; ++row)
      for (int c = 0; c < 3; ++c)
        EXPECT_EQ(out.to_floats()[static_cast<size_t>((k * 2 + row) * 3 + c)],
                  float(100 * k + 10 * row + c));
  Tensor rs =
      reduce_scatter(ctx_->world(), out, ReduceOp::kSum, Stream());  // every rank holds `out`
  ASSERT_EQ(rs.shape(), (Shape{2, 3}));
  for (int row = 0; row < 2; ++row)
    for (int c = 0; c < 3; ++c)
      EXPECT_EQ(rs.to_floats()[static_cast<size_t>(row * 3 + c)],
                float(w * (100 * r + 10 * row + c)));
}

// Errors every rank raises alike, before any communication.
TEST_F(MpiBackend, BadArgumentsThrowWithExpectedAndGot) {
  Communicator& c = ctx_->world();
  auto message = [](auto&& fn) -> std::string {
    try {
      fn();
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  const int w = c.size();
  Tensor i32 = Tensor::zeros({4}, DType::kI32);
  EXPECT_NE(message([&] {
              c.all_reduce(i32, ReduceOp::kAvg, Stream());
            }).find("dtype i32 cannot be reduced with avg"),
            std::string::npos);
  Tensor in = Tensor::zeros({3, 2}, DType::kF32);
  Tensor wrong = Tensor::zeros({3 * w + 1, 2}, DType::kF32);
  EXPECT_NE(message([&] { c.all_gather(in, wrong, Stream()); }).find("expected output f32["),
            std::string::npos);
  Tensor bf = Tensor::zeros({3 * w, 2}, DType::kBF16);
  EXPECT_NE(message([&] { c.all_gather(in, bf, Stream()); }).find("all_gather on "),
            std::string::npos);
  EXPECT_NE(message([&] {
              c.reduce_scatter(wrong, in, ReduceOp::kSum, Stream());
            }).find("reduce_scatter on"),
            std::string::npos);
  EXPECT_NE(message([&] {
              c.broadcast(in, w, Stream());
            }).find(fmt::format("expected a root group rank in [0, {}), got {}", w, w)),
            std::string::npos);
  EXPECT_NE(message([&] { c.send(in, -1, Stream()); }).find("expected a destination group rank"),
            std::string::npos);
  Tensor odd = Tensor::zeros({w * 2 + 1}, DType::kF32);
  if (w > 1)
    EXPECT_NE(message([&] { c.all_to_all(odd, odd.clone(), Stream()); }).find("rows divisible by"),
              std::string::npos);
  Tensor big = Tensor::zeros({w * 4}, DType::kF32);
  EXPECT_NE(message([&] { c.all_gather(big.slice(1, 5), big, Stream()); }).find("not rank"),
            std::string::npos)
      << "an overlapping input that is not this rank's slot";
  EXPECT_NE(message([&] { c.all_reduce(Tensor(), ReduceOp::kSum, Stream()); }).find("undefined"),
            std::string::npos);
}

TEST_F(MpiBackend, MpiCheckThrowsWithTheMpiMessage) {
  auto& mpi = dynamic_cast<MpiCommunicator&>(ctx_->world());
  int v = 0;
  try {
    MPI_CHECK(MPI_Send(&v, 1, MPI_INT, world_size() + 5, 0, mpi.comm()));
    FAIL() << "MPI_Send to a rank that does not exist returned success";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("MPI error"), std::string::npos) << m;
    EXPECT_NE(m.find("rank"), std::string::npos) << m;
    EXPECT_NE(m.find("MPI_Send"), std::string::npos) << "names the failing call: " << m;
  }
}

TEST_F(MpiBackend, RecvOfTheWrongSizeIsAnError) {
  // A message shorter than the receiving tensor is caught by helix (a longer one is
  // MPI_ERR_TRUNCATE, after which MPI's state is undefined, so it is not exercised here).
  if (world_size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int r = world_rank();
  if (r == 0) ctx_->world().send(Tensor::zeros({3}, DType::kF32), 1, Stream());
  if (r == 1) {
    Tensor got = Tensor::zeros({4}, DType::kF32);
    try {
      ctx_->world().recv(got, 0, Stream());
      ADD_FAILURE() << "a 3-element message into a 4-element tensor was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("expected 4 elements from group rank 0, got 3"),
                std::string::npos)
          << e.what();
    }
  }
  ctx_->world().barrier();
}

TEST_F(MpiBackend, ZeroSizedTensorsAreNoOps) {
  Tensor e = Tensor::zeros({0, 4}, DType::kF32);
  ctx_->world().all_reduce(e, ReduceOp::kSum, Stream());
  Tensor out = Tensor::zeros({0, 4}, DType::kF32);
  ctx_->world().all_gather(e, out, Stream());
  ctx_->world().barrier();
}

}  // namespace
}  // namespace helix
