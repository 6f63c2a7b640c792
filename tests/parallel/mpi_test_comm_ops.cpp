// The communication autograd pairs: each node's forward and backward against values computed
// locally (f32 and bf16, CPU and, in CUDA builds with a GPU, CUDA tensors through the staged MPI
// backend), backward accumulating into a pre-filled gradient; then Megatron-style compositions
// (tensor-parallel MLP, the same under sequence parallelism, scatter/gather along T) in f64 on the
// CPU, whose loss and every gradient equal a single-rank run of the same model within 1e-10.
#include <memory>
#include <tuple>

#include "core/random.h"
#include "core/ref_nodes.h"
#include "mpi_test_util.h"
#include "parallel/comm_ops.h"

namespace helix {
namespace {

using testing::equals;
using testing::make_input;
using testing::value;
using testing::world_rank;
using testing::world_size;

constexpr int64_t kRowsPerRank = 3;  // m: T = size * m
constexpr int64_t kHidden = 5;

// tp: the TP group size (2, or the whole world).
using Param = std::tuple<DType, DeviceType, int>;

class CommPairs : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    std::tie(dtype_, device_type_, tp_) = GetParam();
    if (tp_ > world_size() || world_size() % tp_ != 0)
      GTEST_SKIP() << "tp " << tp_ << " does not fit " << world_size() << " ranks";
    if (device_type_ == DeviceType::kCUDA) {
      HELIX_REQUIRE_CUDA();
      device_ = testing::rank_gpu();
      stream_ = Stream::create(device_);
    }
    ctx_ = std::make_unique<ParallelContext>(testing::make_context({.tp = tp_}));
    comm_ = &ctx_->tp();
  }
  int member(int g) const { return comm_->group().ranks[static_cast<size_t>(g)]; }
  // [rows, kHidden] of world rank r's values for `seed`.
  Tensor values(int r, int64_t rows, int seed) const {
    return make_input(dtype_, rows * kHidden, r, seed, 0, device_).view({rows, kHidden});
  }
  double v(int r, int64_t row, int64_t col, int seed) const {
    return value(dtype_, r, row * kHidden + col, seed);
  }

  // Runs node on leaf x (whose gradient starts as `prefill`) with output gradient `gout`; returns
  // {y, x's gradient}.
  std::pair<Tensor, Tensor> run(const std::function<Var(Tape&, const Var&)>& op, const Tensor& x,
                                const Tensor& prefill, const Tensor& gout) {
    TapeOptions o;
    o.stream = stream_;
    Tape tape(o);
    Var xv = Var::leaf(x, true, "x");
    xv.cell()->grad = prefill.clone(stream_);
    Var y = op(tape, xv);
    Tensor yd = y.data().clone(stream_);
    tape.backward(y, gout);
    stream_.synchronize();
    return {yd, xv.grad()};
  }

  DType dtype_ = DType::kF32;
  DeviceType device_type_ = DeviceType::kCPU;
  int tp_ = 2;
  Device device_ = Device::cpu();
  Stream stream_;
  std::unique_ptr<ParallelContext> ctx_;
  Communicator* comm_ = nullptr;
};

TEST_P(CommPairs, CopyToTpIsIdentityForwardAllReduceBackward) {
  const int n = comm_->size(), me = world_rank();
  const int64_t T = n * kRowsPerRank;
  auto [y, g] = run([&](Tape& t, const Var& x) { return copy_to_tp(t, *comm_, x); },
                    values(me, T, 1), values(me, T, 2), values(me, T, 3));
  std::vector<double> want_y, want_g;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t c = 0; c < kHidden; ++c) {
      want_y.push_back(v(me, i, c, 1));
      double s = v(me, i, c, 2);
      for (int k = 0; k < n; ++k) s += v(member(k), i, c, 3);
      want_g.push_back(s);
    }
  EXPECT_TRUE(equals(y, want_y));
  EXPECT_TRUE(equals(g, want_g));
}

TEST_P(CommPairs, ReduceFromTpIsAllReduceForwardIdentityBackward) {
  const int n = comm_->size(), me = world_rank();
  const int64_t T = n * kRowsPerRank;
  auto [y, g] = run([&](Tape& t, const Var& x) { return reduce_from_tp(t, *comm_, x); },
                    values(me, T, 4), values(me, T, 5), values(me, T, 6));
  std::vector<double> want_y, want_g;
  for (int64_t i = 0; i < T; ++i)
    for (int64_t c = 0; c < kHidden; ++c) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += v(member(k), i, c, 4);
      want_y.push_back(s);
      want_g.push_back(v(me, i, c, 5) + v(me, i, c, 6));
    }
  EXPECT_TRUE(equals(y, want_y));
  EXPECT_TRUE(equals(g, want_g));
}

TEST_P(CommPairs, ScatterToSpIsSplitForwardAllGatherBackward) {
  const int n = comm_->size(), me = world_rank(), r = comm_->rank();
  const int64_t T = n * kRowsPerRank, m = kRowsPerRank;
  auto [y, g] = run([&](Tape& t, const Var& x) { return scatter_to_sp(t, *comm_, x); },
                    values(me, T, 7), values(me, T, 8), values(me, m, 9));
  ASSERT_EQ(y.shape(), (Shape{m, kHidden}));
  std::vector<double> want_y, want_g;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < kHidden; ++c) want_y.push_back(v(me, r * m + i, c, 7));
  for (int64_t i = 0; i < T; ++i)  // row i of the gathered gradient is row i % m of rank i / m
    for (int64_t c = 0; c < kHidden; ++c)
      want_g.push_back(v(me, i, c, 8) + v(member(int(i / m)), i % m, c, 9));
  EXPECT_TRUE(equals(y, want_y));
  EXPECT_TRUE(equals(g, want_g));
}

TEST_P(CommPairs, GatherFromSpIsAllGatherForwardReduceScatterOrSplitBackward) {
  const int n = comm_->size(), me = world_rank(), r = comm_->rank();
  const int64_t T = n * kRowsPerRank, m = kRowsPerRank;
  for (GatherGrad mode : {GatherGrad::kReduceScatter, GatherGrad::kSplit}) {
    SCOPED_TRACE(mode == GatherGrad::kSplit ? "split" : "reduce-scatter");
    auto [y, g] = run([&](Tape& t, const Var& x) { return gather_from_sp(t, *comm_, x, mode); },
                      values(me, m, 10), values(me, m, 11), values(me, T, 12));
    ASSERT_EQ(y.shape(), (Shape{T, kHidden}));
    std::vector<double> want_y, want_g;
    for (int64_t i = 0; i < T; ++i)
      for (int64_t c = 0; c < kHidden; ++c) want_y.push_back(v(member(int(i / m)), i % m, c, 10));
    for (int64_t i = 0; i < m; ++i)
      for (int64_t c = 0; c < kHidden; ++c) {
        double s = v(me, i, c, 11);
        if (mode == GatherGrad::kSplit)
          s += v(me, r * m + i, c, 12);
        else
          for (int k = 0; k < n; ++k) s += v(member(k), r * m + i, c, 12);
        want_g.push_back(s);
      }
    EXPECT_TRUE(equals(y, want_y));
    EXPECT_TRUE(equals(g, want_g));
  }
}

TEST_P(CommPairs, ReduceScatterToSpIsReduceScatterForwardAllGatherBackward) {
  const int n = comm_->size(), me = world_rank(), r = comm_->rank();
  const int64_t T = n * kRowsPerRank, m = kRowsPerRank;
  auto [y, g] = run([&](Tape& t, const Var& x) { return reduce_scatter_to_sp(t, *comm_, x); },
                    values(me, T, 13), values(me, T, 14), values(me, m, 15));
  ASSERT_EQ(y.shape(), (Shape{m, kHidden}));
  std::vector<double> want_y, want_g;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < kHidden; ++c) {
      double s = 0;
      for (int k = 0; k < n; ++k) s += v(member(k), r * m + i, c, 13);
      want_y.push_back(s);
    }
  for (int64_t i = 0; i < T; ++i)
    for (int64_t c = 0; c < kHidden; ++c)
      want_g.push_back(v(me, i, c, 14) + v(member(int(i / m)), i % m, c, 15));
  EXPECT_TRUE(equals(y, want_y));
  EXPECT_TRUE(equals(g, want_g));
}

TEST_P(CommPairs, TDividesByTheGroupSizeOrItIsAnError) {
  if (comm_->size() < 2) GTEST_SKIP() << "a group of 1 divides everything";
  Tape tape(TapeOptions{.stream = stream_});
  Var x = Var::leaf(values(world_rank(), comm_->size() * kRowsPerRank + 1, 16), true, "x");
  EXPECT_THROW(scatter_to_sp(tape, *comm_, x), Error);
}

std::string pair_name(const ::testing::TestParamInfo<Param>& info) {
  const auto [t, d, tp] = info.param;
  return std::string(dtype_name(t)) + (d == DeviceType::kCPU ? "_cpu" : "_cuda_staged") + "_tp" +
         (tp == 0 ? std::string("world") : std::to_string(tp));
}

INSTANTIATE_TEST_SUITE_P(Pairs, CommPairs,
                         ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16),
#if HELIX_WITH_CUDA
                                            ::testing::Values(DeviceType::kCPU, DeviceType::kCUDA),
#else
                                            ::testing::Values(DeviceType::kCPU),
#endif
                                            ::testing::Values(2, 4)),
                         pair_name);

// ---- Compositions against one rank (f64, CPU)
// ----------------------------------------------------
using testing::LayerNormRef;
using testing::LinearRef;
using testing::SumRef;
using testing::TanhRef;

Tensor rand64(Shape s, uint64_t seed, float scale = 1.0f) {
  Tensor t = Tensor::empty(s, DType::kF64);
  fill_uniform(t, seed, 0, -scale, scale);
  return t;
}
// Rows [begin, end) copied out (own storage).
Tensor rows(const Tensor& t, int64_t begin, int64_t end) { return t.slice(begin, end).clone(); }
// Columns [begin, end) of a [R, C] f64 matrix.
Tensor cols(const Tensor& t, int64_t begin, int64_t end) {
  const int64_t R = t.dim(0), C = t.dim(1);
  Tensor o = Tensor::empty({R, end - begin}, DType::kF64);
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = begin; j < end; ++j)
      o.data<double>()[i * (end - begin) + j - begin] = t.data<double>()[i * C + j];
  return o;
}

::testing::AssertionResult near(const Tensor& a, const Tensor& b) {
  return testing::all_close(a, b, {1e-10, 1e-12});
}
double scalar(const Var& v) { return v.data().to_vector<double>()[0]; }

class TensorParallelMlp : public ::testing::Test {
 protected:
  static constexpr int64_t kH = 6, kF = 8;  // F divisible by tp in {1, 2, 4}
  void SetUp() override {
    ctx_ = std::make_unique<ParallelContext>(testing::make_context({.tp = world_size()}));
    n_ = ctx_->tp().size();
    r_ = ctx_->tp().rank();
    T_ = 3 * n_;
    x_ = rand64({T_, kH}, 1);
    w1_ = rand64({kF, kH}, 2, 0.5f);
    b1_ = rand64({kF}, 3, 0.5f);
    w2_ = rand64({kH, kF}, 4, 0.5f);
    g_ = rand64({kH}, 5);
    b_ = rand64({kH}, 6);
  }
  // One rank, everything whole: loss = sum(tanh(tanh(LN?(x) W1^T + b1) W2^T)).
  struct Ref {
    double loss;
    Tensor dx, dw1, db1, dw2, dg, db;
  };
  Ref reference(bool layernorm) const {
    Tape tape;
    Var x = Var::leaf(x_.clone(), true), w1 = Var::leaf(w1_.clone(), true),
        b1 = Var::leaf(b1_.clone(), true);
    Var w2 = Var::leaf(w2_.clone(), true),
        zero = Var::leaf(Tensor::zeros({kH}, DType::kF64), false);
    Var g = Var::leaf(g_.clone(), true), b = Var::leaf(b_.clone(), true);
    Var in = layernorm ? tape.apply1(std::make_shared<LayerNormRef<double>>(), {x, g, b}) : x;
    Var h = tape.apply1(std::make_shared<TanhRef<double>>(),
                        {tape.apply1(std::make_shared<LinearRef<double>>(), {in, w1, b1})});
    Var z = tape.apply1(std::make_shared<LinearRef<double>>(), {h, w2, zero});
    Var loss = tape.apply1(std::make_shared<SumRef<double>>(),
                           {tape.apply1(std::make_shared<TanhRef<double>>(), {z})});
    tape.backward(loss);
    return {scalar(loss),
            x.grad(),
            w1.grad(),
            b1.grad(),
            w2.grad(),
            layernorm ? g.grad() : Tensor(),
            layernorm ? b.grad() : Tensor()};
  }
  std::unique_ptr<ParallelContext> ctx_;
  int n_ = 1, r_ = 0;
  int64_t T_ = 0;
  Tensor x_, w1_, b1_, w2_, g_, b_;
};

TEST_F(TensorParallelMlp, ColumnThenRowParallelEqualsOneRank) {
  const Ref ref = reference(false);
  Communicator& tp = ctx_->tp();
  const int64_t f = kF / n_;  // this rank's FFN columns [r*f, (r+1)*f)
  Tape tape;
  Var x = Var::leaf(x_.clone(), true);
  Var w1 = Var::leaf(rows(w1_, r_ * f, (r_ + 1) * f), true),
      b1 = Var::leaf(rows(b1_, r_ * f, (r_ + 1) * f), true);
  Var w2 = Var::leaf(cols(w2_, r_ * f, (r_ + 1) * f), true),
      zero = Var::leaf(Tensor::zeros({kH}, DType::kF64), false);
  Var xin = copy_to_tp(tape, tp, x);
  Var h = tape.apply1(std::make_shared<TanhRef<double>>(),
                      {tape.apply1(std::make_shared<LinearRef<double>>(), {xin, w1, b1})});
  Var zp = tape.apply1(std::make_shared<LinearRef<double>>(), {h, w2, zero});  // partial sums
  Var z = reduce_from_tp(tape, tp, zp);
  Var loss = tape.apply1(std::make_shared<SumRef<double>>(),
                         {tape.apply1(std::make_shared<TanhRef<double>>(), {z})});
  tape.backward(loss);
  EXPECT_NEAR(scalar(loss), ref.loss, 1e-10 * std::abs(ref.loss));
  EXPECT_TRUE(near(x.grad(), ref.dx)) << "dx (replicated input)";
  EXPECT_TRUE(near(w1.grad(), rows(ref.dw1, r_ * f, (r_ + 1) * f))) << "dW1 shard";
  EXPECT_TRUE(near(b1.grad(), rows(ref.db1, r_ * f, (r_ + 1) * f))) << "db1 shard";
  EXPECT_TRUE(near(w2.grad(), cols(ref.dw2, r_ * f, (r_ + 1) * f))) << "dW2 shard";
}

TEST_F(TensorParallelMlp, SequenceParallelLayerNormAndMlpEqualOneRank) {
  const Ref ref = reference(true);
  Communicator& tp = ctx_->tp();
  const int64_t f = kF / n_, m = T_ / n_;  // this rank's FFN columns and token rows
  Tape tape;
  Var x = Var::leaf(rows(x_, r_ * m, (r_ + 1) * m), true);  // the SP shard of the input
  Var g = Var::leaf(g_.clone(), true), b = Var::leaf(b_.clone(), true);
  Var w1 = Var::leaf(rows(w1_, r_ * f, (r_ + 1) * f), true),
      b1 = Var::leaf(rows(b1_, r_ * f, (r_ + 1) * f), true);
  Var w2 = Var::leaf(cols(w2_, r_ * f, (r_ + 1) * f), true),
      zero = Var::leaf(Tensor::zeros({kH}, DType::kF64), false);
  Var ln = tape.apply1(std::make_shared<LayerNormRef<double>>(), {x, g, b});  // on m rows
  Var full = gather_from_sp(tape, tp, ln, GatherGrad::kReduceScatter);        // [T, H]
  Var h = tape.apply1(std::make_shared<TanhRef<double>>(),
                      {tape.apply1(std::make_shared<LinearRef<double>>(), {full, w1, b1})});
  Var zp =
      tape.apply1(std::make_shared<LinearRef<double>>(), {h, w2, zero});  // [T, H] partial sums
  Var z = reduce_scatter_to_sp(tape, tp, zp);                             // [m, H]
  Var loss = tape.apply1(std::make_shared<SumRef<double>>(),
                         {tape.apply1(std::make_shared<TanhRef<double>>(), {z})});
  tape.backward(loss);
  // The loss is a sum over tokens: the ranks' partial losses add up to the whole.
  Tensor total = loss.data().clone();
  tp.all_reduce(total, ReduceOp::kSum, Stream());
  EXPECT_NEAR(total.to_vector<double>()[0], ref.loss, 1e-10 * std::abs(ref.loss));
  EXPECT_TRUE(near(x.grad(), rows(ref.dx, r_ * m, (r_ + 1) * m))) << "dx rows of this rank";
  EXPECT_TRUE(near(w1.grad(), rows(ref.dw1, r_ * f, (r_ + 1) * f))) << "dW1 shard";
  EXPECT_TRUE(near(b1.grad(), rows(ref.db1, r_ * f, (r_ + 1) * f))) << "db1 shard";
  EXPECT_TRUE(near(w2.grad(), cols(ref.dw2, r_ * f, (r_ + 1) * f))) << "dW2 shard";
  // LayerNorm parameters are replicated in the SP region: their gradients are partial per rank and
  // summed over TP (what the optimizer step does for SP-replicated parameters).
  Tensor dg = g.grad().clone(), db = b.grad().clone();
  tp.all_reduce(dg, ReduceOp::kSum, Stream());
  tp.all_reduce(db, ReduceOp::kSum, Stream());
  EXPECT_TRUE(near(dg, ref.dg)) << "dgamma summed over tp";
  EXPECT_TRUE(near(db, ref.db)) << "dbeta summed over tp";
}

TEST_F(TensorParallelMlp, ScatterThenGatherAlongTEqualsOneRank) {
  // Replicated x -> scatter_to_sp -> tanh on own rows -> gather_from_sp(split) -> sum.
  Tape ref_tape;
  Var xr = Var::leaf(x_.clone(), true);
  Var lr = ref_tape.apply1(std::make_shared<SumRef<double>>(),
                           {ref_tape.apply1(std::make_shared<TanhRef<double>>(), {xr})});
  ref_tape.backward(lr);

  Tape tape;
  Var x = Var::leaf(x_.clone(), true);
  Var part = scatter_to_sp(tape, ctx_->tp(), x);
  Var y = gather_from_sp(tape, ctx_->tp(), tape.apply1(std::make_shared<TanhRef<double>>(), {part}),
                         GatherGrad::kSplit);
  Var loss = tape.apply1(std::make_shared<SumRef<double>>(), {y});
  tape.backward(loss);
  EXPECT_NEAR(scalar(loss), scalar(lr), 1e-10 * std::abs(scalar(lr)));
  EXPECT_TRUE(near(x.grad(), xr.grad()));
}

}  // namespace
}  // namespace helix
