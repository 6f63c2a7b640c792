// Cross-entropy: the CPU reference against a naive double-precision log-softmax, the split
// (stats / finish) form against the fused one, and CUDA against the CPU reference.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "core/random.h"
#include "kernels/cross_entropy/cross_entropy.h"
#include "test_util.h"

namespace helix {
namespace {

constexpr int32_t kIgnore = -100;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

Tensor random_logits(int64_t rows, int64_t cols, DType dtype, uint64_t seed, float std = 3.0f) {
  Tensor t = Tensor::empty({rows, cols}, dtype);
  fill_normal(t, seed, 0, 0.0f, std);
  return t;
}

// Labels uniform in [0, vocab), a fraction of them ignore_index (as masked-LM batches are).
Tensor random_labels(int64_t rows, int64_t vocab, uint64_t seed, double ignored = 0.3) {
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int32_t> cls(0, static_cast<int32_t>(vocab - 1));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int32_t> y(static_cast<size_t>(rows));
  for (auto& v : y) v = u(g) < ignored ? kIgnore : cls(g);
  return Tensor::from_vector(y, {rows});
}

// Plain double loops over a naive log-softmax (no max shift): loss sum, count, per-row loss,
// gradient.
struct NaiveCe {
  double loss_sum = 0;
  int64_t count = 0;
  std::vector<double> row_loss, grad;
};
NaiveCe naive_cross_entropy(const Tensor& logits, const Tensor& labels, double grad_scale) {
  const int64_t rows = logits.dim(0), cols = logits.dim(1);
  const std::vector<float> x = logits.to_floats();
  const std::vector<int32_t> y = labels.to_vector<int32_t>();
  NaiveCe r;
  r.row_loss.assign(static_cast<size_t>(rows), 0.0);
  r.grad.assign(static_cast<size_t>(rows * cols), 0.0);
  for (int64_t t = 0; t < rows; ++t) {
    if (y[t] == kIgnore) continue;
    double z = 0;
    for (int64_t j = 0; j < cols; ++j) z += std::exp(double(x[t * cols + j]));
    const double log_z = std::log(z);
    r.row_loss[t] = log_z - x[t * cols + y[t]];  // -log_softmax at the label
    r.loss_sum += r.row_loss[t];
    ++r.count;
    for (int64_t j = 0; j < cols; ++j)
      r.grad[t * cols + j] =
          (std::exp(double(x[t * cols + j]) - log_z) - (j == y[t] ? 1.0 : 0.0)) * grad_scale;
  }
  return r;
}

Tensor f32_tensor(const std::vector<double>& v, const Shape& shape) {
  std::vector<float> f(v.begin(), v.end());
  return Tensor::from_vector(f, shape);
}

struct CeOut {
  Tensor loss_sum, count, dlogits, row_loss;
};

// Outputs on the logits' device, poisoned (NaN, or -777 for an i32 count) so unwritten ones fail.
CeOut poisoned_outputs(const Tensor& logits, bool grad, DType count_dtype, const Stream& s) {
  const Device dev = logits.device();
  CeOut o;
  o.loss_sum = Tensor::empty({1}, DType::kF32, dev, s);
  o.loss_sum.fill(kNaN, s);
  o.count = Tensor::empty({1}, count_dtype, dev, s);
  o.count.fill(count_dtype == DType::kI32 ? -777.0 : kNaN, s);
  o.row_loss = Tensor::empty({logits.dim(0)}, DType::kF32, dev, s);
  o.row_loss.fill(kNaN, s);
  if (grad) {
    o.dlogits = Tensor::empty(logits.shape(), logits.dtype(), dev, s);
    o.dlogits.fill(kNaN, s);
  }
  return o;
}

CeOut run_fused(const Tensor& logits, const Tensor& labels, float grad_scale, bool grad,
                DType count_dtype = DType::kI32, const Stream& s = Stream()) {
  CeOut o = poisoned_outputs(logits, grad, count_dtype, s);
  CrossEntropyParams p;
  p.logits = logits;
  p.labels = labels;
  p.loss_sum = o.loss_sum;
  p.count = o.count;
  p.dlogits = o.dlogits;
  p.row_loss = o.row_loss;
  p.grad_scale = grad_scale;
  p.ignore_index = kIgnore;
  cross_entropy_fwd_bwd(p, s);
  s.synchronize();
  return o;
}

// Columns [begin, end) of a host [T, V] tensor as a new [T, end - begin] tensor on `dev`.
Tensor column_slice(const Tensor& host, int64_t begin, int64_t end, Device dev) {
  const int64_t rows = host.dim(0), cols = host.dim(1), w = end - begin;
  Tensor out = Tensor::empty({rows, w}, host.dtype());
  const size_t es = dtype_size(host.dtype());
  for (int64_t t = 0; t < rows; ++t)
    std::memcpy(static_cast<char*>(out.data_ptr()) + t * w * es,
                static_cast<const char*>(host.data_ptr()) + (t * cols + begin) * es, w * es);
  return dev.is_cpu() ? out : out.to(dev);
}

// The vocabulary-parallel flow on one process: stats per shard written straight into the gathered
// [P, T] tensors, then finish per shard; the shards' gradients are put back side by side. Every
// shard's loss sum and count must be bitwise equal; shard 0's are returned.
CeOut run_split(const Tensor& logits_host, const Tensor& labels_host, float grad_scale,
                const std::vector<int64_t>& widths, Device dev, const Stream& s = Stream()) {
  const int64_t rows = logits_host.dim(0), vocab = logits_host.dim(1),
                parts = int64_t(widths.size());
  const Tensor labels = dev.is_cpu() ? labels_host : labels_host.to(dev);
  Tensor part_max = Tensor::empty({parts, rows}, DType::kF32, dev, s);
  Tensor part_sumexp = Tensor::empty({parts, rows}, DType::kF32, dev, s);
  Tensor part_target = Tensor::empty({parts, rows}, DType::kF32, dev, s);
  for (Tensor* t : {&part_max, &part_sumexp, &part_target}) t->fill(kNaN, s);
  std::vector<Tensor> shards;
  int64_t start = 0;
  for (int64_t r = 0; r < parts; ++r) {
    shards.push_back(column_slice(logits_host, start, start + widths[r], dev));
    CrossEntropyStatsParams sp;
    sp.logits = shards.back();
    sp.labels = labels;
    sp.row_max = part_max.slice(r, r + 1).view({rows});
    sp.row_sumexp = part_sumexp.slice(r, r + 1).view({rows});
    sp.row_target = part_target.slice(r, r + 1).view({rows});
    sp.vocab_start = start;
    sp.ignore_index = kIgnore;
    cross_entropy_stats(sp, s);
    start += widths[r];
  }
  EXPECT_EQ(start, vocab);
  CeOut first;
  std::vector<float> grad(static_cast<size_t>(rows * vocab));
  start = 0;
  for (int64_t r = 0; r < parts; ++r) {
    CeOut o = poisoned_outputs(shards[r], true, DType::kI32, s);
    CrossEntropyFinishParams fp;
    fp.logits = shards[r];
    fp.labels = labels;
    fp.part_max = part_max;
    fp.part_sumexp = part_sumexp;
    fp.part_target = part_target;
    fp.loss_sum = o.loss_sum;
    fp.count = o.count;
    fp.dlogits = o.dlogits;
    fp.row_loss = o.row_loss;
    fp.vocab_start = start;
    fp.vocab_size = vocab;
    fp.grad_scale = grad_scale;
    fp.ignore_index = kIgnore;
    cross_entropy_finish(fp, s);
    s.synchronize();
    const std::vector<float> g = o.dlogits.to_floats();
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t j = 0; j < widths[r]; ++j) grad[t * vocab + start + j] = g[t * widths[r] + j];
    if (r == 0) {
      first = o;
    } else {
      EXPECT_EQ(o.loss_sum.to_vector<float>()[0], first.loss_sum.to_vector<float>()[0])
          << "shard " << r;
      EXPECT_EQ(o.count.to_vector<int32_t>()[0], first.count.to_vector<int32_t>()[0])
          << "shard " << r;
      EXPECT_TRUE(testing::all_close(o.row_loss, first.row_loss, {0, 0})) << "shard " << r;
    }
    start += widths[r];
  }
  first.dlogits = Tensor::from_floats(grad, {rows, vocab}, logits_host.dtype());
  return first;
}

float scalar(const Tensor& t) { return t.to_floats()[0]; }

::testing::AssertionResult loss_close(float actual, double expected, DType dtype = DType::kF32) {
  const testing::Tolerance tol = testing::tolerance_for(dtype);
  const double d = std::abs(double(actual) - expected);
  if (d <= tol.atol + tol.rtol * std::abs(expected)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << actual << " vs expected " << expected << " (|diff| " << d << ")";
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (!(a.shape() == b.shape()) || a.dtype() != b.dtype()) return false;
  const Tensor ha = a.is_cpu() ? a : a.to(Device::cpu());
  const Tensor hb = b.is_cpu() ? b : b.to(Device::cpu());
  return std::memcmp(ha.data_ptr(), hb.data_ptr(), ha.nbytes()) == 0;
}

struct Shape2 {
  int64_t rows, cols;
};

// ---- CPU reference ------------------------------------------------------------------------------
TEST(CrossEntropyCpu, MatchesNaiveLogSoftmaxInDouble) {
  uint64_t seed = 101;
  for (const Shape2 sh :
       {Shape2{71, 229}, Shape2{29, 541}, Shape2{1, 1}, Shape2{64, 33}, Shape2{5, 1500}}) {
    for (const DType dt : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols << " " << dtype_name(dt));
      const Tensor logits = random_logits(sh.rows, sh.cols, dt, ++seed);
      const Tensor labels = random_labels(sh.rows, sh.cols, ++seed, sh.rows == 1 ? 0.0 : 0.3);
      const NaiveCe ref = naive_cross_entropy(logits, labels, 1.0 / 37);
      const CeOut o =
          run_fused(logits, labels, 1.0f / 37, true, seed % 2 ? DType::kI32 : DType::kF32);
      EXPECT_EQ(scalar(o.count), float(ref.count));
      EXPECT_TRUE(loss_close(scalar(o.loss_sum), ref.loss_sum));
      EXPECT_TRUE(testing::all_close(o.row_loss, f32_tensor(ref.row_loss, {sh.rows}),
                                     testing::tolerance_for(DType::kF32)));
      EXPECT_TRUE(testing::all_close(o.dlogits, f32_tensor(ref.grad, logits.shape()),
                                     testing::tolerance_for(dt)));
    }
  }
}

TEST(CrossEntropyCpu, StableForLargeLogits) {
  // Quarter-integers shifted by +-1000 stay exact in f32, so the shift must not change the result.
  const int64_t rows = 13, cols = 57;
  std::vector<float> base(rows * cols), up(rows * cols), down(rows * cols);
  std::mt19937 g(7);
  for (size_t i = 0; i < base.size(); ++i) {
    base[i] = float(int(g() % 64) - 32) * 0.25f;
    up[i] = base[i] + 1000.0f;
    down[i] = base[i] - 1000.0f;
  }
  const Tensor labels = random_labels(rows, cols, 8, 0.2);
  const NaiveCe ref = naive_cross_entropy(Tensor::from_vector(base, {rows, cols}), labels, 0.5);
  for (const auto* v : {&base, &up, &down}) {
    const CeOut o = run_fused(Tensor::from_vector(*v, {rows, cols}), labels, 0.5f, true);
    EXPECT_TRUE(loss_close(scalar(o.loss_sum), ref.loss_sum));
    EXPECT_TRUE(testing::all_close(o.dlogits, f32_tensor(ref.grad, {rows, cols}),
                                   testing::tolerance_for(DType::kF32)));
  }
}

TEST(CrossEntropyCpu, LossOnlyAndInPlaceGradient) {
  const Tensor logits = random_logits(71, 229, DType::kBF16, 31);
  const Tensor labels = random_labels(71, 229, 32);
  const CeOut full = run_fused(logits, labels, 0.25f, true);
  const CeOut eval = run_fused(logits, labels, 0.25f, false);
  EXPECT_EQ(scalar(eval.loss_sum), scalar(full.loss_sum));
  EXPECT_EQ(scalar(eval.count), scalar(full.count));
  EXPECT_TRUE(bitwise_equal(eval.row_loss, full.row_loss));
  // dlogits = logits: the gradient overwrites the logits and equals the out-of-place one.
  Tensor in_place = logits.clone();
  CeOut o = poisoned_outputs(in_place, false, DType::kI32, Stream());
  CrossEntropyParams p;
  p.logits = in_place;
  p.labels = labels;
  p.loss_sum = o.loss_sum;
  p.count = o.count;
  p.dlogits = in_place;
  p.grad_scale = 0.25f;
  cross_entropy_fwd_bwd(p, Stream());
  EXPECT_EQ(scalar(o.loss_sum), scalar(full.loss_sum));
  EXPECT_TRUE(bitwise_equal(in_place, full.dlogits));
}

TEST(CrossEntropyCpu, AllRowsIgnored) {
  const Tensor logits = random_logits(9, 33, DType::kF32, 41);
  const Tensor labels = Tensor::from_vector(std::vector<int32_t>(9, kIgnore), {9});
  const CeOut o = run_fused(logits, labels, 1.0f, true, DType::kF32);
  EXPECT_EQ(scalar(o.loss_sum), 0.0f);
  EXPECT_EQ(scalar(o.count), 0.0f);
  for (float v : o.dlogits.to_floats()) ASSERT_EQ(v, 0.0f);
  for (float v : o.row_loss.to_floats()) ASSERT_EQ(v, 0.0f);
}

TEST(CrossEntropyCpu, SplitStatsFinishMatchesFused) {
  uint64_t seed = 51;
  for (const DType dt : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(dtype_name(dt));
    const Tensor logits = random_logits(71, 229, dt, ++seed);
    const Tensor labels = random_labels(71, 229, ++seed);
    const CeOut fused = run_fused(logits, labels, 0.125f, true);
    const NaiveCe ref = naive_cross_entropy(logits, labels, 0.125);
    for (const std::vector<int64_t>& widths :
         {std::vector<int64_t>{229}, std::vector<int64_t>{80, 80, 69},
          std::vector<int64_t>{1, 227, 1}}) {
      const CeOut split = run_split(logits, labels, 0.125f, widths, Device::cpu());
      EXPECT_EQ(scalar(split.count), scalar(fused.count));
      EXPECT_TRUE(loss_close(scalar(split.loss_sum), ref.loss_sum));
      EXPECT_TRUE(
          testing::all_close(split.row_loss, fused.row_loss, testing::tolerance_for(DType::kF32)));
      EXPECT_TRUE(testing::all_close(split.dlogits, f32_tensor(ref.grad, logits.shape()),
                                     testing::tolerance_for(dt)));
    }
  }
}

TEST(CrossEntropyCpu, RejectsBadInputs) {
  const Tensor logits = random_logits(4, 33, DType::kF32, 61);
  CeOut o = poisoned_outputs(logits, true, DType::kI32, Stream());
  CrossEntropyParams p;
  p.logits = logits;
  p.loss_sum = o.loss_sum;
  p.count = o.count;
  p.dlogits = o.dlogits;
  p.labels = Tensor::from_vector(std::vector<int32_t>{0, 33, 1, 2}, {4});  // 33 is out of range
  try {
    cross_entropy_fwd_bwd(p, Stream());
    FAIL() << "expected a throw for an out-of-range label";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("got 33 at row 1"), std::string::npos) << e.what();
  }
  p.labels = Tensor::from_vector(std::vector<int32_t>{0, 1, 2}, {3});
  EXPECT_THROW(cross_entropy_fwd_bwd(p, Stream()), Error);  // wrong label count
  p.labels = Tensor::from_vector(std::vector<int32_t>{0, 1, 2, 3}, {4});
  p.dlogits = Tensor::empty({4, 33}, DType::kBF16);
  EXPECT_THROW(cross_entropy_fwd_bwd(p, Stream()), Error);  // gradient dtype differs from logits
  p.dlogits = Tensor();
  p.loss_sum = Tensor::empty({2}, DType::kF32);
  EXPECT_THROW(cross_entropy_fwd_bwd(p, Stream()), Error);  // loss_sum must be [1]
}

// ---- CUDA against the CPU reference -------------------------------------------------------------
void expect_cuda_matches_cpu(const CeOut& gpu, const CeOut& cpu, DType dt, bool grad) {
  EXPECT_EQ(scalar(gpu.count), scalar(cpu.count));
  EXPECT_TRUE(loss_close(scalar(gpu.loss_sum), scalar(cpu.loss_sum)));
  EXPECT_TRUE(testing::all_close(gpu.row_loss, cpu.row_loss, testing::tolerance_for(DType::kF32)));
  if (grad) EXPECT_TRUE(testing::all_close(gpu.dlogits, cpu.dlogits, testing::tolerance_for(dt)));
}

TEST(CrossEntropyGpu, MatchesCpuOnOddShapes) {
  HELIX_REQUIRE_CUDA();
  const Stream s = Stream::create(Device::cuda());
  uint64_t seed = 1000;
  // Warp-per-row (V <= 1024), block-of-256 (V <= 16384) and block-of-1024 rows, ESM-2's V = 33.
  for (const Shape2 sh : {Shape2{71, 229}, Shape2{29, 541}, Shape2{1, 1}, Shape2{8192, 33},
                          Shape2{3, 1025}, Shape2{37, 3001}, Shape2{5, 16385}, Shape2{64, 50257}}) {
    for (const DType dt : {DType::kF32, DType::kBF16}) {
      for (const bool grad : {true, false}) {
        SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols << " " << dtype_name(dt)
                                          << (grad ? " grad" : " loss only"));
        const Tensor logits = random_logits(sh.rows, sh.cols, dt, ++seed, 4.0f);
        const Tensor labels = random_labels(sh.rows, sh.cols, ++seed, sh.rows == 1 ? 0.0 : 0.85);
        const DType count_dt = seed % 4 < 2 ? DType::kI32 : DType::kF32;
        const CeOut cpu = run_fused(logits, labels, 1.0f / 3, grad, count_dt);
        const CeOut gpu = run_fused(logits.to(Device::cuda()), labels.to(Device::cuda()), 1.0f / 3,
                                    grad, count_dt, s);
        expect_cuda_matches_cpu(gpu, cpu, dt, grad);
      }
    }
  }
}

TEST(CrossEntropyGpu, LargeBatch) {
  HELIX_REQUIRE_CUDA();
  // A 65536-token ESM-2 step (15% of the tokens carry a label) and a long vocabulary.
  for (const Shape2 sh : {Shape2{65536, 33}, Shape2{2048, 32003}}) {
    SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols);
    const Tensor logits = random_logits(sh.rows, sh.cols, DType::kBF16, 2000 + sh.cols);
    const Tensor labels = random_labels(sh.rows, sh.cols, 3000 + sh.cols, 0.85);
    const CeOut cpu = run_fused(logits, labels, 1.0f / 9830, true);
    const CeOut gpu =
        run_fused(logits.to(Device::cuda()), labels.to(Device::cuda()), 1.0f / 9830, true);
    expect_cuda_matches_cpu(gpu, cpu, DType::kBF16, true);
  }
}

TEST(CrossEntropyGpu, SplitMatchesFusedAndCpu) {
  HELIX_REQUIRE_CUDA();
  const Stream s = Stream::create(Device::cuda());
  uint64_t seed = 4000;
  for (const DType dt : {DType::kF32, DType::kBF16}) {
    for (const Shape2 sh : {Shape2{71, 229}, Shape2{29, 2541}}) {
      SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols << " " << dtype_name(dt));
      const Tensor logits = random_logits(sh.rows, sh.cols, dt, ++seed);
      const Tensor labels = random_labels(sh.rows, sh.cols, ++seed);
      const CeOut fused = run_fused(logits.to(Device::cuda()), labels.to(Device::cuda()), 0.5f,
                                    true, DType::kI32, s);
      // One part: bitwise the fused kernel's results (the header promises it).
      const CeOut one = run_split(logits, labels, 0.5f, {sh.cols}, Device::cuda(), s);
      EXPECT_EQ(scalar(one.loss_sum), scalar(fused.loss_sum));
      EXPECT_TRUE(bitwise_equal(one.row_loss, fused.row_loss));
      EXPECT_TRUE(bitwise_equal(one.dlogits, fused.dlogits.to(Device::cpu())));
      // Three uneven parts: CUDA against the CPU reference of the same split.
      const std::vector<int64_t> widths{sh.cols / 3, sh.cols / 3, sh.cols - 2 * (sh.cols / 3)};
      const CeOut gpu = run_split(logits, labels, 0.5f, widths, Device::cuda(), s);
      const CeOut cpu = run_split(logits, labels, 0.5f, widths, Device::cpu());
      expect_cuda_matches_cpu(gpu, cpu, dt, true);
    }
  }
}

TEST(CrossEntropyGpu, InPlaceAndDeterministic) {
  HELIX_REQUIRE_CUDA();
  for (const Shape2 sh : {Shape2{1000, 33}, Shape2{50, 5000}, Shape2{9, 40000}}) {
    SCOPED_TRACE(::testing::Message() << sh.rows << "x" << sh.cols);
    const Tensor logits =
        random_logits(sh.rows, sh.cols, DType::kBF16, 5000 + sh.cols).to(Device::cuda());
    const Tensor labels = random_labels(sh.rows, sh.cols, 6000 + sh.cols, 0.5).to(Device::cuda());
    const CeOut a = run_fused(logits, labels, 0.01f, true);
    const CeOut b = run_fused(logits, labels, 0.01f, true);
    EXPECT_EQ(scalar(a.loss_sum), scalar(b.loss_sum));
    EXPECT_TRUE(bitwise_equal(a.dlogits, b.dlogits));
    Tensor in_place = logits.clone();
    CeOut o = poisoned_outputs(in_place, false, DType::kI32, Stream());
    CrossEntropyParams p;
    p.logits = in_place;
    p.labels = labels;
    p.loss_sum = o.loss_sum;
    p.count = o.count;
    p.dlogits = in_place;
    p.grad_scale = 0.01f;
    cross_entropy_fwd_bwd(p, Stream());
    EXPECT_EQ(scalar(o.loss_sum), scalar(a.loss_sum));
    EXPECT_TRUE(bitwise_equal(in_place, a.dlogits));
  }
}

TEST(CrossEntropyGpu, BadLabelMakesLossNaN) {
  HELIX_REQUIRE_CUDA();
  const Tensor logits = random_logits(4, 33, DType::kF32, 71).to(Device::cuda());
  const Tensor labels =
      Tensor::from_vector(std::vector<int32_t>{0, 33, kIgnore, -5}, {4}).to(Device::cuda());
  const CeOut o = run_fused(logits, labels, 1.0f, true);
  EXPECT_TRUE(std::isnan(scalar(o.loss_sum)));
  const std::vector<float> rl = o.row_loss.to_floats();
  EXPECT_TRUE(std::isfinite(rl[0]));
  EXPECT_TRUE(std::isnan(rl[1]));
  EXPECT_EQ(rl[2], 0.0f);
  EXPECT_TRUE(std::isnan(rl[3]));
  const std::vector<float> g = o.dlogits.to_floats();
  EXPECT_TRUE(std::isfinite(g[0]));
  EXPECT_TRUE(std::isnan(g[33]));
  EXPECT_EQ(g[66], 0.0f);
}

}  // namespace
}  // namespace helix
