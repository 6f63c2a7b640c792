// Gradient norm: the CPU reference against a plain double loop, the non-finite flag, the clip
// coefficient, CUDA against the CPU reference and bitwise determinism of the CUDA reduction.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/random.h"
#include "kernels/adamw/adamw.h"
#include "kernels/grad_norm/grad_norm.h"
#include "test_util.h"

namespace helix {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

struct Spec {
  int64_t n;
  DType dtype;
};

std::vector<Tensor> random_grads(const std::vector<Spec>& specs, uint64_t seed) {
  std::vector<Tensor> out;
  for (size_t i = 0; i < specs.size(); ++i) {
    Tensor t = Tensor::empty({specs[i].n}, specs[i].dtype);
    fill_normal(t, seed, i, 0.0f, i % 3 == 0 ? 1e-3f : 0.5f);
    out.push_back(t);
  }
  return out;
}

// Copies on `dev`; with misalign, odd-numbered tensors start one element into a larger buffer.
std::vector<Tensor> place(const std::vector<Tensor>& src, Device dev, bool misalign) {
  std::vector<Tensor> out;
  for (size_t i = 0; i < src.size(); ++i) {
    if (!(misalign && i % 2 == 1)) {
      out.push_back(src[i].to(dev));
      continue;
    }
    Tensor big = Tensor::empty({src[i].numel() + 1}, src[i].dtype(), dev);
    Tensor view = big.slice(1, src[i].numel() + 1);
    view.copy_from(src[i]);
    out.push_back(view);
  }
  return out;
}

double double_sumsq(const std::vector<Tensor>& ts) {
  double acc = 0;
  for (const Tensor& t : ts)
    for (float v : t.to_floats()) acc += double(v) * double(v);
  return acc;
}

struct NormOut {
  Tensor sumsq, flag;
};
NormOut run_norm(const GradNormTensorList& list, Device dev, DType flag_dtype, double flag_init,
                 const Stream& s = Stream()) {
  NormOut o;
  o.sumsq = Tensor::empty({1}, DType::kF32, dev, s);
  o.sumsq.fill(kNaN, s);
  o.flag = Tensor::empty({1}, flag_dtype, dev, s);
  o.flag.fill(flag_init, s);
  GradNormParams p;
  p.grads = &list;
  p.sumsq = o.sumsq;
  p.nonfinite_flag = o.flag;
  grad_norm_sumsq(p, s);
  s.synchronize();
  return o;
}

float scalar(const Tensor& t) { return t.to_floats()[0]; }
uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

::testing::AssertionResult close_f32(float actual, double expected) {
  const testing::Tolerance tol = testing::tolerance_for(DType::kF32);
  const double d = std::abs(double(actual) - expected);
  if (d <= tol.atol + tol.rtol * std::abs(expected)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << actual << " vs expected " << expected;
}

// ---- CPU reference ------------------------------------------------------------------------------
TEST(GradNormCpu, MatchesDoubleLoop) {
  const std::vector<Tensor> grads = random_grads({{1, DType::kF32},
                                                  {17, DType::kF32},
                                                  {33, DType::kBF16},
                                                  {229, DType::kF32},
                                                  {71 * 229, DType::kF32},
                                                  {541, DType::kBF16},
                                                  {100003, DType::kF32}},
                                                 5);
  GradNormTensorList list(grads);
  const NormOut o = run_norm(list, Device::cpu(), DType::kI32, 0);
  EXPECT_TRUE(close_f32(scalar(o.sumsq), double_sumsq(grads)));
  EXPECT_EQ(scalar(o.flag), 0.0f);
  GradNormTensorList empty(std::vector<Tensor>{});
  EXPECT_EQ(scalar(run_norm(empty, Device::cpu(), DType::kI32, 0).sumsq), 0.0f);
}

TEST(GradNormCpu, FlagIsSetOnNonFiniteAndNeverCleared) {
  std::vector<Tensor> grads = random_grads({{100, DType::kF32}, {50, DType::kBF16}}, 6);
  GradNormTensorList list(grads);
  EXPECT_EQ(scalar(run_norm(list, Device::cpu(), DType::kF32, 1.0).flag), 1.0f);  // stays set
  grads[0].data<float>()[37] = kInf;
  NormOut o = run_norm(list, Device::cpu(), DType::kI32, 0);
  EXPECT_EQ(scalar(o.sumsq), kInf);
  EXPECT_EQ(scalar(o.flag), 1.0f);
  grads[0].data<float>()[37] = 0.0f;
  grads[1].data<bf16_t>()[49] = bf16_t::from_float(float(kNaN));
  o = run_norm(list, Device::cpu(), DType::kF32, 0);
  EXPECT_TRUE(std::isnan(scalar(o.sumsq)));
  EXPECT_EQ(scalar(o.flag), 1.0f);
  grads[1].data<bf16_t>()[49] = bf16_t::from_float(1e20f);  // finite, but its square overflows f32
  EXPECT_EQ(scalar(run_norm(list, Device::cpu(), DType::kI32, 0).flag), 1.0f);
}

TEST(GradClipCpu, CoefficientAsPyTorchComputesIt) {
  struct Case {
    float sumsq;
    double max_norm;
    float coef, norm;
    bool flag;
  };
  const float c4 = (1.0f / (2.0f + 1e-6f)) * 1.0f;
  for (const Case c : {Case{4.0f, 1.0, c4, 2.0f, false}, Case{0.25f, 1.0, 1.0f, 0.5f, false},
                       Case{0.0f, 0.5, 1.0f, 0.0f, false}, Case{kInf, 1.0, 0.0f, kInf, true}}) {
    GradClipParams p;
    p.sumsq = Tensor::from_vector(std::vector<float>{c.sumsq}, {1});
    p.clip_coef = Tensor::empty({1}, DType::kF32);
    p.norm = Tensor::empty({1}, DType::kF32);
    p.nonfinite_flag = Tensor::zeros({1}, DType::kI32);
    p.max_norm = c.max_norm;
    grad_clip_coef(p, Stream());
    EXPECT_EQ(scalar(p.clip_coef), c.coef) << c.sumsq;
    EXPECT_EQ(scalar(p.norm), c.norm) << c.sumsq;
    EXPECT_EQ(scalar(p.nonfinite_flag), c.flag ? 1.0f : 0.0f) << c.sumsq;
  }
  EXPECT_NEAR(c4, 0.5, 1e-6);
  GradClipParams p;
  p.sumsq = Tensor::from_vector(std::vector<float>{float(kNaN)}, {1});
  p.clip_coef = Tensor::empty({1}, DType::kF32);
  p.nonfinite_flag = Tensor::zeros({1}, DType::kF32);
  grad_clip_coef(p, Stream());
  EXPECT_TRUE(std::isnan(scalar(p.clip_coef)));  // as torch.clamp: NaN stays NaN
  EXPECT_EQ(scalar(p.nonfinite_flag), 1.0f);
}

// The sync-free chain: grad_norm_sumsq -> grad_clip_coef -> adamw_step(grad_scale_tensor) equals an
// AdamW step given the same coefficient as a host scale.
TEST(GradClipCpu, DeviceCoefficientFeedsAdamW) {
  auto make = [] {
    std::vector<AdamWTensor> ts;
    for (int64_t n : {31, 229}) {
      AdamWTensor t{Tensor::empty({n}, DType::kF32),
                    Tensor::empty({n}, DType::kF32),
                    Tensor::zeros({n}, DType::kF32),
                    Tensor::zeros({n}, DType::kF32),
                    Tensor(),
                    true};
      fill_normal(t.param, 9, n, 0.0f, 1.0f);
      fill_normal(t.grad, 10, n, 0.0f, 3.0f);
      ts.push_back(t);
    }
    return ts;
  };
  std::vector<AdamWTensor> a = make(), b = make();
  GradNormTensorList grads({a[0].grad, a[1].grad});
  const NormOut n = run_norm(grads, Device::cpu(), DType::kI32, 0);
  GradClipParams cp;
  cp.sumsq = n.sumsq;
  cp.clip_coef = Tensor::empty({1}, DType::kF32);
  cp.max_norm = 1.0;
  grad_clip_coef(cp, Stream());
  ASSERT_LT(scalar(cp.clip_coef), 1.0f);
  AdamWTensorList la(a), lb(b);
  AdamWParams p;
  p.tensors = &la;
  p.grad_scale_tensor = cp.clip_coef;
  p.nonfinite_flag = n.flag;
  adamw_step(p, Stream());
  p.tensors = &lb;
  p.grad_scale_tensor = Tensor();
  p.grad_scale = scalar(cp.clip_coef);
  adamw_step(p, Stream());
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(testing::all_close(a[i].param, b[i].param, {0, 0}));
}

// ---- CUDA against the CPU reference -------------------------------------------------------------
TEST(GradNormGpu, MatchesCpuOnManyOddTensors) {
  HELIX_REQUIRE_CUDA();
  const Stream s = Stream::create(Device::cuda());
  const std::vector<Tensor> host = random_grads({{1, DType::kF32},
                                                 {3, DType::kBF16},
                                                 {229, DType::kF32},
                                                 {16383, DType::kF32},
                                                 {16384, DType::kBF16},
                                                 {16385, DType::kF32},
                                                 {71 * 229, DType::kBF16},
                                                 {29 * 541, DType::kF32},
                                                 {(1 << 24) + 3, DType::kF32},
                                                 {0, DType::kF32},
                                                 {100003, DType::kBF16},
                                                 {2, DType::kF32}},
                                                7);
  GradNormTensorList cpu(host), gpu(place(host, Device::cuda(), true));
  const NormOut c = run_norm(cpu, Device::cpu(), DType::kI32, 0);
  const NormOut g = run_norm(gpu, Device::cuda(), DType::kI32, 0, s);
  EXPECT_TRUE(close_f32(scalar(g.sumsq), scalar(c.sumsq)));
  EXPECT_TRUE(close_f32(scalar(c.sumsq), double_sumsq(host)));
  EXPECT_EQ(scalar(g.flag), 0.0f);
  GradNormTensorList empty(std::vector<Tensor>{});
  GradNormParams p;
  p.grads = &empty;
  p.sumsq = Tensor::empty({1}, DType::kF32, Device::cuda());
  p.sumsq.fill(kNaN);
  grad_norm_sumsq(p, Stream());
  EXPECT_EQ(scalar(p.sumsq), 0.0f);
}

TEST(GradNormGpu, BitwiseDeterministic) {
  HELIX_REQUIRE_CUDA();
  const std::vector<Tensor> host = random_grads({{(1 << 22) + 17, DType::kF32},
                                                 {999, DType::kBF16},
                                                 {3 * 16384, DType::kF32},
                                                 {77777, DType::kF32}},
                                                8);
  GradNormTensorList gpu(place(host, Device::cuda(), true));
  const uint32_t first = bits(scalar(run_norm(gpu, Device::cuda(), DType::kI32, 0).sumsq));
  const Stream other = Stream::create(Device::cuda());
  for (int run = 0; run < 5; ++run) {
    EXPECT_EQ(bits(scalar(
                  run_norm(gpu, Device::cuda(), DType::kI32, 0, run % 2 ? other : Stream()).sumsq)),
              first)
        << "run " << run;
  }
}

TEST(GradNormGpu, FlagIsSetOnNonFiniteAndNeverCleared) {
  HELIX_REQUIRE_CUDA();
  std::vector<Tensor> host =
      random_grads({{300001, DType::kF32}, {5000, DType::kBF16}, {7, DType::kF32}}, 9);
  {
    GradNormTensorList gpu(place(host, Device::cuda(), false));
    EXPECT_EQ(scalar(run_norm(gpu, Device::cuda(), DType::kI32, 0).flag), 0.0f);
    EXPECT_EQ(scalar(run_norm(gpu, Device::cuda(), DType::kF32, 1.0).flag), 1.0f);
  }
  host[0].data<float>()[299999] = -kInf;
  {
    GradNormTensorList gpu(place(host, Device::cuda(), true));
    const NormOut o = run_norm(gpu, Device::cuda(), DType::kF32, 0);
    EXPECT_EQ(scalar(o.sumsq), kInf);
    EXPECT_EQ(scalar(o.flag), 1.0f);
  }
  host[0].data<float>()[299999] = 1.0f;
  host[1].data<bf16_t>()[4097] = bf16_t::from_float(float(kNaN));
  {
    GradNormTensorList gpu(place(host, Device::cuda(), false));
    const NormOut o = run_norm(gpu, Device::cuda(), DType::kI32, 0);
    EXPECT_TRUE(std::isnan(scalar(o.sumsq)));
    EXPECT_EQ(scalar(o.flag), 1.0f);
  }
}

TEST(GradClipGpu, MatchesCpuBitwise) {
  HELIX_REQUIRE_CUDA();
  for (const float sumsq : {4.0f, 0.25f, 1234.5678f, 3e-9f, 0.0f, kInf, float(kNaN)}) {
    Tensor out[2][3];
    for (int d = 0; d < 2; ++d) {
      const Device dev = d ? Device::cuda() : Device::cpu();
      GradClipParams p;
      p.sumsq = Tensor::from_vector(std::vector<float>{sumsq}, {1}, dev);
      p.clip_coef = Tensor::empty({1}, DType::kF32, dev);
      p.clip_coef.fill(-1.0);
      p.norm = Tensor::empty({1}, DType::kF32, dev);
      p.norm.fill(-1.0);
      p.nonfinite_flag = Tensor::zeros({1}, DType::kI32, dev);
      p.max_norm = 0.7;
      grad_clip_coef(p, Stream());
      out[d][0] = p.clip_coef;
      out[d][1] = p.norm;
      out[d][2] = p.nonfinite_flag;
    }
    for (int k = 0; k < 3; ++k) {
      const std::vector<float> a = out[1][k].to_floats(), b = out[0][k].to_floats();
      if (std::isnan(a[0]) && std::isnan(b[0])) continue;  // NaN payloads may differ
      EXPECT_EQ(bits(a[0]), bits(b[0]))
          << "sumsq " << sumsq << " output " << k << ": " << a[0] << " vs " << b[0];
    }
  }
}

}  // namespace
}  // namespace helix
