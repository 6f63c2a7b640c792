// Data-parallel bucketed gradient reduction: equals a plain per-tensor all-reduce averaged over dp,
// for f32 and bf16 gradients of odd sizes, many small buckets or one big one, gradients written
// through their bucket slots, replaced or missing, two steps in a row, ranks marking gradients
// ready in different orders; buckets launch in order as soon as they are complete; and through a
// real tape.
#include <algorithm>
#include <memory>
#include <numeric>
#include <random>

#include "core/ref_nodes.h"
#include "mpi_test_util.h"
#include "parallel/accumulate.h"
#include "parallel/dp_grad_reducer.h"

namespace helix {
namespace {

using testing::equals;
using testing::make_input;
using testing::value;
using testing::world_rank;
using testing::world_size;

struct ParamSpec {
  Shape shape;
  DType grad_dtype;
};
const std::vector<ParamSpec> kParams = {
    {{1}, DType::kF32},   {{7}, DType::kF32},    {{33, 5}, DType::kF32},
    {{13}, DType::kBF16}, {{1000}, DType::kF32}, {{3, 3, 3}, DType::kF32},
    {{64}, DType::kBF16}, {{257}, DType::kF32},  {{129, 3}, DType::kBF16}};

using Param = std::tuple<DeviceType, int /*tp*/, size_t /*bucket bytes*/>;

class DpBuckets : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    size_t bytes;
    std::tie(device_type_, tp_, bytes) = GetParam();
    if (world_size() % tp_ != 0)
      GTEST_SKIP() << "tp " << tp_ << " does not divide " << world_size();
    if (device_type_ == DeviceType::kCUDA) {
      HELIX_REQUIRE_CUDA();
      device_ = testing::rank_gpu();
      stream_ = Stream::create(device_);
    }
    ctx_ = std::make_unique<ParallelContext>(testing::make_context({.tp = tp_}));
    for (size_t p = 0; p < kParams.size(); ++p)
      params_.push_back(Var::leaf(Tensor::zeros(kParams[p].shape, DType::kF32, device_), true,
                                  kParams[p].grad_dtype, "p" + std::to_string(p)));
    opts_.bucket_bytes = bytes;
  }
  // This rank's gradient of parameter p in step `step` (exact quarters: sums and means are exact).
  Tensor grad(size_t p, int step, int rank) const {
    const ParamSpec& s = kParams[p];
    return make_input(s.grad_dtype, s.shape.numel(), rank, 100 * step + static_cast<int>(p), 0,
                      device_)
        .view(s.shape);
  }
  std::vector<double> mean_grad(size_t p, int step) const {
    const Communicator& dp = ctx_->dp();
    std::vector<double> m(static_cast<size_t>(kParams[p].shape.numel()), 0.0);
    for (size_t i = 0; i < m.size(); ++i) {
      for (int k = 0; k < dp.size(); ++k)
        m[i] += value(kParams[p].grad_dtype, dp.group().ranks[static_cast<size_t>(k)],
                      static_cast<int64_t>(i), 100 * step + static_cast<int>(p));
      m[i] /= dp.size();
    }
    return m;
  }
  // A rank-dependent order, so ranks mark gradients ready in different orders.
  std::vector<size_t> scrambled() const {
    std::vector<size_t> order(kParams.size());
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(1234 + world_rank()));
    return order;
  }

  DeviceType device_type_ = DeviceType::kCPU;
  int tp_ = 1;
  Device device_ = Device::cpu();
  Stream stream_;
  std::unique_ptr<ParallelContext> ctx_;
  std::vector<Var> params_;
  DpReducerOptions opts_;
};

TEST_P(DpBuckets, EqualsPerTensorAllReduceOverTwoSteps) {
  DpGradReducer reducer(ctx_->dp(), params_, opts_);
  for (int step = 0; step < 2; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    reducer.zero_grad(stream_);
    // Backward accumulates into the gradients (which are bucket slots now), then marks them ready.
    for (size_t p : scrambled()) {
      accumulate(params_[p].cell()->grad, grad(p, step, world_rank()), stream_);
      reducer.mark_ready(p, stream_);
    }
    reducer.finish(stream_);
    stream_.synchronize();
    for (size_t p = 0; p < kParams.size(); ++p)
      EXPECT_TRUE(equals(params_[p].grad(), mean_grad(p, step))) << "param " << p;
  }
}

TEST_P(DpBuckets, ReplacedAndMissingGradientsAreCopiedInOrZeroed) {
  DpGradReducer reducer(ctx_->dp(), params_, opts_);
  reducer.zero_grad(stream_);
  for (size_t p = 0; p < kParams.size(); ++p) {
    if (p == 2) continue;  // never reached by backward: its gradient is zero
    if (p % 2)
      params_[p].cell()->grad = grad(p, 0, world_rank());  // a fresh tensor, not the slot
    else
      accumulate(params_[p].cell()->grad, grad(p, 0, world_rank()), stream_);
  }
  params_[2].zero_grad();  // undefined
  params_[4].cell()->grad.fill(99.0, stream_);
  params_[4].zero_grad();   // dropped after being written: must count as zero, not 99
  reducer.finish(stream_);  // marks everything ready
  stream_.synchronize();
  for (size_t p = 0; p < kParams.size(); ++p) {
    std::vector<double> want = mean_grad(p, 0);
    if (p == 2 || p == 4) std::fill(want.begin(), want.end(), 0.0);
    EXPECT_TRUE(equals(params_[p].grad(), want)) << "param " << p;
  }
}

TEST_P(DpBuckets, BucketsLaunchInOrderAsSoonAsComplete) {
  DpGradReducer reducer(ctx_->dp(), params_, opts_);
  const size_t nb = reducer.num_buckets();
  // Every parameter is in exactly one bucket; buckets fill from the last parameter backwards.
  std::vector<int> seen(kParams.size(), 0);
  for (size_t b = 0; b < nb; ++b)
    for (size_t p : reducer.bucket_params(b)) ++seen[p];
  EXPECT_EQ(seen, std::vector<int>(kParams.size(), 1));
  EXPECT_EQ(reducer.bucket_params(0).front(), kParams.size() - 1);
  if (opts_.bucket_bytes >= (size_t{1} << 20)) {
    EXPECT_EQ(nb, 2u) << "one bucket per gradient dtype (f32, bf16)";
  } else {
    EXPECT_GT(nb, 4u);
  }
  reducer.zero_grad(stream_);
  // The last bucket's parameters first: nothing may launch before bucket 0 is complete.
  for (size_t p : reducer.bucket_params(nb - 1)) reducer.mark_ready(p, stream_);
  EXPECT_EQ(reducer.num_launched(), nb == 1 ? 1u : 0u);
  for (size_t b = 0; b + 1 < nb; ++b) {
    for (size_t p : reducer.bucket_params(b)) reducer.mark_ready(p, stream_);
    EXPECT_EQ(reducer.num_launched(), b + 1 == nb - 1 ? nb : b + 1);
  }
  EXPECT_THROW(reducer.mark_ready(0, stream_), Error);
  reducer.finish(stream_);
  EXPECT_EQ(reducer.num_launched(), 0u) << "finish() starts the next step";
}

std::string dp_name(const ::testing::TestParamInfo<Param>& info) {
  const auto [d, tp, bytes] = info.param;
  return std::string(d == DeviceType::kCPU ? "cpu" : "cuda_staged") + "_tp" + std::to_string(tp) +
         (bytes < 4096 ? "_small_buckets" : "_25MB_buckets");
}

INSTANTIATE_TEST_SUITE_P(Dp, DpBuckets,
                         ::testing::Combine(
#if HELIX_WITH_CUDA
                             ::testing::Values(DeviceType::kCPU, DeviceType::kCUDA),
#else
                             ::testing::Values(DeviceType::kCPU),
#endif
                             ::testing::Values(1, 2),
                             ::testing::Values(size_t{512}, size_t{25} << 20)),
                         dp_name);

// Through a tape: each dp rank runs a linear layer on its own data; the bucketed, averaged gradient
// equals the mean of per-rank gradients computed and all-reduced tensor by tensor.
TEST(DpBucketsWithTape, LinearLayerGradientsEqualPlainAllReduce) {
  using testing::LinearRef;
  using testing::SumRef;
  ParallelContext ctx = testing::make_context({});
  Communicator& dp = ctx.dp();
  const int me = world_rank();
  Tensor w0 = make_input(DType::kF32, 4 * 3, 0, 1, 0, Device::cpu()).view({4, 3});
  Tensor b0 = make_input(DType::kF32, 4, 0, 2, 0, Device::cpu());
  Tensor x =
      make_input(DType::kF32, 5 * 3, me, 3, 0, Device::cpu()).view({5, 3});  // this rank's data
  auto run = [&](Var& w, Var& b) {
    Tape tape;
    Var xv = Var::leaf(x, false);
    Var loss = tape.apply1(std::make_shared<SumRef<float>>(),
                           {tape.apply1(std::make_shared<LinearRef<float>>(), {xv, w, b})});
    tape.backward(loss);
  };
  // Plain: local gradients, then one all-reduce per tensor and a division.
  Var w1 = Var::leaf(w0.clone(), true), b1 = Var::leaf(b0.clone(), true);
  run(w1, b1);
  Tensor gw = w1.grad().clone(), gb = b1.grad().clone();
  dp.all_reduce(gw, ReduceOp::kAvg, Stream());
  dp.all_reduce(gb, ReduceOp::kAvg, Stream());
  // Bucketed: the tape accumulates straight into the bucket slots.
  Var w2 = Var::leaf(w0.clone(), true), b2 = Var::leaf(b0.clone(), true);
  DpGradReducer reducer(dp, {w2, b2}, {.bucket_bytes = 16});
  reducer.zero_grad(Stream());
  run(w2, b2);
  reducer.finish(Stream());
  EXPECT_EQ(w2.grad().to_floats(), gw.to_floats());
  EXPECT_EQ(b2.grad().to_floats(), gb.to_floats());
  EXPECT_EQ(reducer.num_buckets(), 2u);
}

}  // namespace
}  // namespace helix
