// AdamW: the CPU reference against hand-computed steps and plain double loops, the skip on a
// non-finite flag, and CUDA against the CPU reference (bitwise: same f32 operations, no
// contraction).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/random.h"
#include "kernels/adamw/adamw.h"
#include "test_util.h"

namespace helix {
namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

Tensor vec(const std::vector<float>& v) { return Tensor::from_vector(v, {int64_t(v.size())}); }

// A list of parameters with random values, their state and (every other one) a NaN-poisoned bf16
// copy; every third tensor has no weight decay. Host tensors.
std::vector<AdamWTensor> random_params(const std::vector<int64_t>& sizes, uint64_t seed) {
  std::vector<AdamWTensor> out;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const Shape shape{sizes[i]};
    AdamWTensor t;
    t.param = Tensor::empty(shape, DType::kF32);
    t.grad = Tensor::empty(shape, DType::kF32);
    t.exp_avg = Tensor::empty(shape, DType::kF32);
    t.exp_avg_sq = Tensor::empty(shape, DType::kF32);
    fill_normal(t.param, seed, 4 * i, 0.0f, 1.0f);
    fill_normal(t.grad, seed, 4 * i + 1, 0.0f, 0.1f);
    fill_normal(t.exp_avg, seed, 4 * i + 2, 0.0f, 0.01f);
    fill_uniform(t.exp_avg_sq, seed, 4 * i + 3, 0.0f, 1e-3f);
    if (i % 2 == 0) {
      t.param_bf16 = Tensor::empty(shape, DType::kBF16);
      t.param_bf16.fill(kNaN);
    }
    t.apply_weight_decay = i % 3 != 0;
    out.push_back(t);
  }
  return out;
}

// Copies on `dev`. With misalign, odd-numbered tensors live one element into a larger buffer, so
// their pointers are not 16-byte aligned and the kernel takes its scalar path.
Tensor place(const Tensor& host, Device dev, bool misalign) {
  if (!misalign) return host.to(dev);
  Tensor big = Tensor::empty({host.numel() + 1}, host.dtype(), dev);
  Tensor view = big.slice(1, host.numel() + 1).view(host.shape());
  view.copy_from(host);
  return view;
}
std::vector<AdamWTensor> copy_params(const std::vector<AdamWTensor>& src, Device dev,
                                     bool misalign) {
  std::vector<AdamWTensor> out;
  for (size_t i = 0; i < src.size(); ++i) {
    const bool m = misalign && i % 2 == 1;
    AdamWTensor t = src[i];
    t.param = place(src[i].param, dev, m);
    t.grad = place(src[i].grad, dev, m);
    t.exp_avg = place(src[i].exp_avg, dev, m);
    t.exp_avg_sq = place(src[i].exp_avg_sq, dev, m);
    if (src[i].param_bf16.defined()) t.param_bf16 = place(src[i].param_bf16, dev, m);
    out.push_back(t);
  }
  return out;
}

::testing::AssertionResult bitwise_equal(const Tensor& a, const Tensor& b) {
  if (!(a.shape() == b.shape()) || a.dtype() != b.dtype())
    return ::testing::AssertionFailure() << a.str() << " vs " << b.str();
  const Tensor ha = a.is_cpu() ? a : a.to(Device::cpu());
  const Tensor hb = b.is_cpu() ? b : b.to(Device::cpu());
  const size_t es = dtype_size(a.dtype());
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (std::memcmp(static_cast<const char*>(ha.data_ptr()) + i * es,
                    static_cast<const char*>(hb.data_ptr()) + i * es, es) != 0)
      return ::testing::AssertionFailure()
             << "element " << i << ": " << cpu_value(ha, i) << " vs " << cpu_value(hb, i);
  }
  return ::testing::AssertionSuccess();
}

void expect_lists_bitwise(const std::vector<AdamWTensor>& a, const std::vector<AdamWTensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    SCOPED_TRACE(::testing::Message()
                 << "tensor " << i << " of " << a[i].param.numel() << " elements");
    EXPECT_TRUE(bitwise_equal(a[i].param, b[i].param));
    EXPECT_TRUE(bitwise_equal(a[i].exp_avg, b[i].exp_avg));
    EXPECT_TRUE(bitwise_equal(a[i].exp_avg_sq, b[i].exp_avg_sq));
    if (a[i].param_bf16.defined()) EXPECT_TRUE(bitwise_equal(a[i].param_bf16, b[i].param_bf16));
  }
}

// The textbook AdamW step (decoupled decay, bias-corrected moments) in double on double state.
struct DoubleState {
  std::vector<double> p, m, v;
};
void double_adamw_step(DoubleState& st, const std::vector<float>& grad, double scale,
                       const AdamWParams& hp, bool decay) {
  const double bc1 = 1 - std::pow(hp.beta1, double(hp.step)),
               bc2 = 1 - std::pow(hp.beta2, double(hp.step));
  for (size_t i = 0; i < st.p.size(); ++i) {
    const double g = double(grad[i]) * scale;
    if (decay) st.p[i] *= 1 - hp.lr * hp.weight_decay;
    st.m[i] = hp.beta1 * st.m[i] + (1 - hp.beta1) * g;
    st.v[i] = hp.beta2 * st.v[i] + (1 - hp.beta2) * g * g;
    st.p[i] -= hp.lr * (st.m[i] / bc1) / (std::sqrt(st.v[i] / bc2) + hp.eps);
  }
}
std::vector<double> as_double(const Tensor& t) {
  const std::vector<float> f = t.to_floats();
  return {f.begin(), f.end()};
}

void expect_close(const Tensor& actual, const std::vector<double>& expected, const char* what) {
  std::vector<float> e(expected.begin(), expected.end());
  EXPECT_TRUE(testing::all_close(actual, Tensor::from_vector(e, actual.shape()),
                                 testing::tolerance_for(DType::kF32)))
      << what;
}

// ---- CPU reference ------------------------------------------------------------------------------
TEST(AdamWCpu, HandComputedFirstStep) {
  // p = 1, g = 0.5, lr = 0.1, wd = 0.01, betas (0.9, 0.999), eps 1e-8, step 1:
  //   decay: p = 1 * (1 - 0.001) = 0.999;  m = 0.1 * 0.5 = 0.05;  v = 0.001 * 0.25 = 0.00025
  //   m_hat = 0.05 / 0.1 = 0.5;  sqrt(v_hat) = sqrt(0.00025 / 0.001) = 0.5
  //   p = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.899000002;  without decay 0.900000002
  AdamWTensor a{
      vec({1.0f}), vec({0.5f}), vec({0.0f}), vec({0.0f}), Tensor::empty({1}, DType::kBF16), true};
  AdamWTensor b{vec({1.0f}), vec({0.5f}), vec({0.0f}), vec({0.0f}), Tensor(), false};
  AdamWTensorList list({a, b});
  AdamWParams p;
  p.tensors = &list;
  p.lr = 0.1;
  p.weight_decay = 0.01;
  adamw_step(p, Stream());
  EXPECT_NEAR(a.param.to_floats()[0], 0.899000002, 1e-7);
  EXPECT_NEAR(b.param.to_floats()[0], 0.900000002, 1e-7);
  EXPECT_NEAR(a.exp_avg.to_floats()[0], 0.05, 1e-9);
  EXPECT_NEAR(a.exp_avg_sq.to_floats()[0], 0.00025, 3e-11);  // f32 half-ulp
  EXPECT_EQ(a.param_bf16.to_floats()[0], bf16_t::from_float(a.param.to_floats()[0]).to_float());
  // Step 2 with g = -0.25 (no decay): m = 0.9*0.05 - 0.025 = 0.02, v = 0.999*0.00025 + 0.001*0.0625
  //   = 0.00031225; p = 0.900000002 - 0.1 * (0.02/0.19) / (sqrt(0.00031225/0.001999) + 1e-8)
  b.grad.data<float>()[0] = -0.25f;
  AdamWTensorList list_b({b});
  p.tensors = &list_b;
  p.step = 2;
  adamw_step(p, Stream());
  const double expected =
      0.900000002 - 0.1 * (0.02 / 0.19) / (std::sqrt(0.00031225 / 0.001999) + 1e-8);
  EXPECT_NEAR(b.param.to_floats()[0], expected, 2e-7);
  EXPECT_NEAR(b.exp_avg.to_floats()[0], 0.02, 1e-9);
  EXPECT_NEAR(b.exp_avg_sq.to_floats()[0], 0.00031225, 3e-11);
}

TEST(AdamWCpu, MatchesDoubleLoopsOverSeveralSteps) {
  const std::vector<int64_t> sizes{1, 7, 33, 229, 1000, 4099};
  std::vector<AdamWTensor> ts = random_params(sizes, 11);
  std::vector<DoubleState> ref;
  for (const AdamWTensor& t : ts)
    ref.push_back({as_double(t.param), as_double(t.exp_avg), as_double(t.exp_avg_sq)});
  AdamWTensorList list(ts);
  Tensor scale_tensor = vec({0.5f});
  for (int64_t step = 1; step <= 5; ++step) {
    AdamWParams p;
    p.tensors = &list;
    p.lr = 3e-3;
    p.beta1 = step == 4 ? 0.3 : 0.9;  // one step with 1 - beta1 >= 0.5 (the other lerp form)
    p.beta2 = 0.98;
    p.eps = 1e-6;
    p.weight_decay = 0.1;
    p.step = step;
    p.grad_scale = step == 2 ? 0.75f : 1.0f;
    if (step == 3) p.grad_scale_tensor = scale_tensor;
    const double scale = step == 2 ? 0.75 : step == 3 ? 0.5 : 1.0;
    for (size_t i = 0; i < ts.size(); ++i) {
      fill_normal(ts[i].grad, 100 + step, i, 0.0f, 0.2f);
      double_adamw_step(ref[i], ts[i].grad.to_floats(), scale, p, ts[i].apply_weight_decay);
    }
    adamw_step(p, Stream());
    for (size_t i = 0; i < ts.size(); ++i) {
      SCOPED_TRACE(::testing::Message() << "step " << step << " tensor " << i);
      expect_close(ts[i].param, ref[i].p, "param");
      expect_close(ts[i].exp_avg, ref[i].m, "exp_avg");
      expect_close(ts[i].exp_avg_sq, ref[i].v, "exp_avg_sq");
      if (ts[i].param_bf16.defined())
        EXPECT_TRUE(bitwise_equal(ts[i].param_bf16, ts[i].param.to(DType::kBF16)));
    }
  }
}

TEST(AdamWCpu, SkipsWholeStepOnNonFiniteFlag) {
  std::vector<AdamWTensor> ts = random_params({5, 64, 229}, 21);
  const std::vector<AdamWTensor> before = copy_params(ts, Device::cpu(), false);
  AdamWTensorList list(ts);
  AdamWParams p;
  p.tensors = &list;
  for (const Tensor& flag :
       {Tensor::from_vector(std::vector<int32_t>{1}, {1}), vec({1.0f}), vec({float(kNaN)})}) {
    p.nonfinite_flag = flag;
    adamw_step(p, Stream());
    expect_lists_bitwise(ts, before);
  }
  p.nonfinite_flag = Tensor::from_vector(std::vector<int32_t>{0}, {1});
  adamw_step(p, Stream());
  EXPECT_FALSE(bitwise_equal(ts[1].param, before[1].param));
  EXPECT_FALSE(bitwise_equal(ts[1].exp_avg_sq, before[1].exp_avg_sq));
}

TEST(AdamWCpu, RejectsBadLists) {
  AdamWTensor t{vec({1, 2}), vec({1, 2}), vec({0, 0}), vec({0, 0}), Tensor(), true};
  AdamWTensor bad = t;
  bad.grad = vec({1, 2, 3});
  try {
    AdamWTensorList list({t, bad});
    FAIL() << "expected a throw for a grad of the wrong shape";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tensor 1: expected grad f32[2]"), std::string::npos)
        << e.what();
  }
  bad = t;
  bad.param_bf16 = Tensor::empty({2}, DType::kF32);
  EXPECT_THROW(AdamWTensorList({bad}), Error);
  AdamWTensorList list({t});
  AdamWParams p;
  p.tensors = &list;
  p.step = 0;
  EXPECT_THROW(adamw_step(p, Stream()), Error);
  p.step = 1;
  p.nonfinite_flag = Tensor::empty({2}, DType::kI32);
  EXPECT_THROW(adamw_step(p, Stream()), Error);
}

// ---- CUDA against the CPU reference -------------------------------------------------------------
TEST(AdamWGpu, MatchesCpuBitwiseOnManyOddTensors) {
  HELIX_REQUIRE_CUDA();
  const Stream s = Stream::create(Device::cuda());
  const std::vector<int64_t> sizes{1,        3,        17,     229, 16383,         16384, 16385,
                                   71 * 229, 29 * 541, 100003, 5,   (1 << 20) + 7, 2};
  std::vector<AdamWTensor> cpu = random_params(sizes, 31);
  std::vector<AdamWTensor> gpu = copy_params(cpu, Device::cuda(), true);  // odd ones misaligned
  AdamWTensorList cpu_list(cpu), gpu_list(gpu);
  Tensor scale_cpu = vec({0.25f});
  Tensor scale_gpu = scale_cpu.to(Device::cuda());
  for (int64_t step = 1; step <= 4; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    for (size_t i = 0; i < cpu.size(); ++i) {  // fresh gradients each step
      fill_normal(cpu[i].grad, 200 + step, i, 0.0f, step == 2 ? 1e3f : 0.05f);
      gpu[i].grad.copy_from(cpu[i].grad);
    }
    AdamWParams p;
    p.lr = 1e-3;
    p.beta1 = step == 3 ? 0.25 : 0.9;
    p.weight_decay = 0.05;
    p.step = step;
    p.grad_scale = step == 2 ? 1e-3f : 1.0f;
    p.tensors = &cpu_list;
    if (step == 4) p.grad_scale_tensor = scale_cpu;
    adamw_step(p, Stream());
    p.tensors = &gpu_list;
    if (step == 4) p.grad_scale_tensor = scale_gpu;
    adamw_step(p, s);
    s.synchronize();
    expect_lists_bitwise(gpu, cpu);
  }
}

TEST(AdamWGpu, SkipsWholeStepOnNonFiniteFlag) {
  HELIX_REQUIRE_CUDA();
  std::vector<AdamWTensor> host = random_params({7, 16384, 40001}, 41);
  for (AdamWTensor& t : host)
    if (t.param_bf16.defined()) t.param_bf16.fill(-3.0);  // a known value the skip must keep
  std::vector<AdamWTensor> gpu = copy_params(host, Device::cuda(), false);
  const std::vector<AdamWTensor> before = copy_params(host, Device::cpu(), false);
  AdamWTensorList list(gpu);
  AdamWParams p;
  p.tensors = &list;
  for (const Tensor& flag :
       {Tensor::from_vector(std::vector<int32_t>{1}, {1}), vec({1.0f}), vec({float(kNaN)})}) {
    p.nonfinite_flag = flag.to(Device::cuda());
    adamw_step(p, Stream());
    expect_lists_bitwise(gpu, host);
  }
  // A cleared flag updates, and exactly as the CPU reference does.
  p.nonfinite_flag = vec({0.0f}).to(Device::cuda());
  adamw_step(p, Stream());
  AdamWTensorList host_list(host);
  p.tensors = &host_list;
  p.nonfinite_flag = vec({0.0f});
  adamw_step(p, Stream());
  EXPECT_FALSE(bitwise_equal(host[2].param, before[2].param));
  expect_lists_bitwise(gpu, host);
}

}  // namespace
}  // namespace helix
