// gemm: the double CPU reference against hand-computed linear-layer GEMMs and against plain double
// loops (every transpose, epilogue, output dtype, f32/bf16/fp8 inputs, fp8 outputs); the OpenBLAS
// path that gemm() runs on the CPU against that reference; the OpenBLAS thread policy; the
// validation rules; and on a GPU cuBLASLt against the CPU reference on odd, tiny and large shapes
// with poisoned outputs.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/convert.h"
#include "core/random.h"
#include "kernels/gemm/gemm.h"
#include "test_util.h"

namespace helix {
namespace {

using testing::tolerance_for;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- plain double loops ------------------------------------------------------------------------

// A stored row-major matrix decoded to double, times `scale` (fp8 scale_inv).
struct Stored {
  std::vector<double> v;
  int64_t cols;
  Stored(const Tensor& t, double scale) : v(static_cast<size_t>(t.numel())), cols(t.dim(1)) {
    for (int64_t i = 0; i < t.numel(); ++i) v[static_cast<size_t>(i)] = scale * cpu_value(t, i);
  }
  // Element (i, j) of op(X), read straight from the stored matrix.
  double op_at(GemmOp op, int64_t i, int64_t j) const {
    return v[static_cast<size_t>(op == GemmOp::kNone ? i * cols + j : j * cols + i)];
  }
};

struct Naive {
  std::vector<double> value;      // [M*N] alpha*AB + beta*C + bias (before GELU / rounding)
  std::vector<double> magnitude;  // [M*N] sum |terms|: scale of the accumulation error
  std::vector<double> bias_grad;  // [M] or [N]
  std::vector<double> grad_magnitude;
};

Naive naive_gemm(const GemmParams& p) {
  const GemmShape s = gemm_shape(p);
  const Stored a(p.a, p.a_scale_inv.defined() ? cpu_value(p.a_scale_inv, 0) : 1.0);
  const Stored b(p.b, p.b_scale_inv.defined() ? cpu_value(p.b_scale_inv, 0) : 1.0);
  Naive r;
  for (int64_t i = 0; i < s.m; ++i) {
    for (int64_t j = 0; j < s.n; ++j) {
      double acc = 0, mag = 0;
      for (int64_t k = 0; k < s.k; ++k) {
        const double t = a.op_at(p.op_a, i, k) * b.op_at(p.op_b, k, j);
        acc += t;
        mag += std::abs(t);
      }
      double v = p.alpha * acc;
      mag *= std::abs(p.alpha);
      if (p.beta != 0) {
        v += p.beta * cpu_value(p.c, i * s.n + j);
        mag += std::abs(p.beta * cpu_value(p.c, i * s.n + j));
      }
      if (p.bias.defined()) {
        v += cpu_value(p.bias, j);
        mag += std::abs(cpu_value(p.bias, j));
      }
      r.value.push_back(v);
      r.magnitude.push_back(mag);
    }
  }
  if (p.epilogue == GemmEpilogue::kBiasGradA || p.epilogue == GemmEpilogue::kBiasGradB) {
    const bool on_a = p.epilogue == GemmEpilogue::kBiasGradA;
    for (int64_t x = 0; x < (on_a ? s.m : s.n); ++x) {
      double sum = 0, mag = 0;
      for (int64_t k = 0; k < s.k; ++k) {
        const double t = on_a ? a.op_at(p.op_a, x, k) : b.op_at(p.op_b, k, x);
        sum += t;
        mag += std::abs(t);
      }
      r.bias_grad.push_back(sum);
      r.grad_magnitude.push_back(mag);
    }
  }
  return r;
}

double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

struct Expected {
  Tensor c, pre_gelu, bias_grad;
  std::vector<double> c_magnitude;  // in the units of c (times c_scale for fp8)
  float amax = 0;
};

// What gemm() must write, rounded through Tensor::from_floats (convert.h, as CUDA rounds).
Expected expected_outputs(const GemmParams& p, const Naive& nv) {
  const Shape shape = p.c.shape();
  const DType dt = p.c.dtype();
  const double c_scale = dtype_is_fp8(dt) ? cpu_value(p.c_scale, 0) : 1.0;
  Expected e;
  std::vector<float> c(nv.value.size()), pre(nv.value.size());
  double amax = 0;
  for (size_t i = 0; i < nv.value.size(); ++i) {
    double v = nv.value[i];
    if (p.epilogue == GemmEpilogue::kBiasGelu) {
      pre[i] = static_cast<float>(v);
      // GELU of the stored (rounded) pre-activation.
      v = gelu_erf(Tensor::from_floats({pre[i]}, {1}, dt).to_floats()[0]);
    }
    amax = std::max(amax, std::abs(v));
    c[i] = static_cast<float>(v * c_scale);
    e.c_magnitude.push_back(nv.magnitude[i] * c_scale);
  }
  e.c = Tensor::from_floats(c, shape, dt);
  if (p.epilogue == GemmEpilogue::kBiasGelu) e.pre_gelu = Tensor::from_floats(pre, shape, dt);
  if (!nv.bias_grad.empty()) {
    std::vector<float> g(nv.bias_grad.begin(), nv.bias_grad.end());
    e.bias_grad = Tensor::from_floats(g, {static_cast<int64_t>(g.size())}, DType::kF32);
  }
  e.amax = static_cast<float>(amax);
  return e;
}

// |actual - expected| <= atol + rtol * |expected| + accum_rtol * magnitude, per element: the dtype
// table of test_util.h plus an allowance for the order of an fp32 accumulation (zero when both
// sides sum in double).
::testing::AssertionResult gemm_close(const Tensor& actual, const Tensor& expected,
                                      const std::vector<double>& magnitude, double accum_rtol) {
  if (!(actual.shape() == expected.shape()) || actual.dtype() != expected.dtype())
    return ::testing::AssertionFailure() << actual.str() << " vs expected " << expected.str();
  const testing::Tolerance tol = tolerance_for(expected.dtype());
  const std::vector<float> a = actual.to_floats(), b = expected.to_floats();
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - double(b[i]));
    const double mag = i < magnitude.size() ? magnitude[i] : 0.0;
    if (!(d <= tol.atol + tol.rtol * std::abs(double(b[i])) + accum_rtol * mag))
      return ::testing::AssertionFailure()
             << "element " << i << ": " << a[i] << " vs expected " << b[i] << " (|diff| " << d
             << ", magnitude " << mag << ")";
  }
  return ::testing::AssertionSuccess();
}

// ---- building test problems --------------------------------------------------------------------

struct Case {
  int64_t m, n, k;
  GemmOp op_a = GemmOp::kNone, op_b = GemmOp::kNone;
  DType a = DType::kBF16, b = DType::kBF16, c = DType::kF32;
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  float alpha = 1.0f, beta = 0.0f;
  float c_scale = 1.0f;  // fp8 output
  Fp8Accumulation accumulation = Fp8Accumulation::kPrecise;
  uint64_t seed = 1;
  std::string str() const {
    return "M=" + std::to_string(m) + " N=" + std::to_string(n) + " K=" + std::to_string(k) +
           " op_a=" + std::to_string(int(op_a)) + " op_b=" + std::to_string(int(op_b)) + " " +
           std::string(dtype_name(a)) + "x" + std::string(dtype_name(b)) + "->" +
           std::string(dtype_name(c)) + " epilogue=" + std::to_string(int(epilogue)) +
           " alpha=" + std::to_string(alpha) + " beta=" + std::to_string(beta);
  }
};

// A random matrix of `dtype`: f32 / bf16 uniform in [-1, 1); fp8 codes of normal values cast with
// `scale` (so that scale_inv = 1/scale recovers them).
Tensor random_matrix(int64_t r, int64_t c, DType dtype, uint64_t seed, uint64_t sub, float scale) {
  Tensor f = Tensor::empty({r, c}, DType::kF32);
  if (dtype == DType::kF32) {
    fill_uniform(f, seed, sub, -1.0f, 1.0f);
    return f;
  }
  if (dtype == DType::kBF16) {
    fill_uniform(f, seed, sub, -1.0f, 1.0f);
    return f.to(DType::kBF16);
  }
  fill_normal(f, seed, sub, 0.0f, 1.0f);
  std::vector<float> v = f.to_floats();
  for (float& x : v) x *= scale;
  return Tensor::from_floats(v, {r, c}, dtype);
}

Tensor scalar(float v) { return Tensor::from_floats({v}, {1}, DType::kF32); }

Tensor poisoned(const Shape& shape, DType dtype) {
  Tensor t = Tensor::empty(shape, dtype);
  t.fill(kNaN);
  return t;
}

GemmParams make_params(const Case& cs) {
  GemmParams p;
  const bool fp8 = dtype_is_fp8(cs.a);
  const float sa = 8.0f, sb = 32.0f;  // fp8 cast scales (scale_inv = 1/8, 1/32)
  p.op_a = cs.op_a;
  p.op_b = cs.op_b;
  p.a = cs.op_a == GemmOp::kNone ? random_matrix(cs.m, cs.k, cs.a, cs.seed, 1, sa)
                                 : random_matrix(cs.k, cs.m, cs.a, cs.seed, 1, sa);
  p.b = cs.op_b == GemmOp::kNone ? random_matrix(cs.k, cs.n, cs.b, cs.seed, 2, sb)
                                 : random_matrix(cs.n, cs.k, cs.b, cs.seed, 2, sb);
  if (cs.beta != 0.0f) {
    Tensor c = Tensor::empty({cs.m, cs.n}, DType::kF32);
    fill_uniform(c, cs.seed, 3, -2.0f, 2.0f);
    p.c = c.to(cs.c);
  } else {
    p.c = poisoned({cs.m, cs.n}, cs.c);  // beta = 0: c must be neither read nor left unwritten
  }
  p.alpha = cs.alpha;
  p.beta = cs.beta;
  p.epilogue = cs.epilogue;
  if (cs.epilogue == GemmEpilogue::kBias || cs.epilogue == GemmEpilogue::kBiasGelu) {
    Tensor bias = Tensor::empty({cs.n}, DType::kF32);
    fill_uniform(bias, cs.seed, 4, -1.0f, 1.0f);
    p.bias = bias.to(fp8 ? DType::kBF16 : cs.c);
  }
  if (cs.epilogue == GemmEpilogue::kBiasGelu) p.pre_gelu = poisoned({cs.m, cs.n}, cs.c);
  if (cs.epilogue == GemmEpilogue::kBiasGradA) p.bias_grad = poisoned({cs.m}, DType::kF32);
  if (cs.epilogue == GemmEpilogue::kBiasGradB) p.bias_grad = poisoned({cs.n}, DType::kF32);
  if (fp8) {
    p.a_scale_inv = scalar(1.0f / sa);
    p.b_scale_inv = scalar(1.0f / sb);
    p.fp8_accumulation = cs.accumulation;
  }
  if (dtype_is_fp8(cs.c)) {
    p.c_scale = scalar(cs.c_scale);
    p.c_amax = poisoned({1}, DType::kF32);  // overwritten
  }
  return p;
}

GemmParams to_device(const GemmParams& p, Device d) {
  GemmParams q = p;
  for (Tensor* t : {&q.a, &q.b, &q.c, &q.bias, &q.pre_gelu, &q.bias_grad, &q.a_scale_inv,
                    &q.b_scale_inv, &q.c_scale, &q.c_amax}) {
    if (t->defined()) *t = t->to(d);
  }
  return q;
}

// Every valid bf16 combination of transposes, epilogues, output dtypes and beta.
std::vector<Case> bf16_cases(int64_t m, int64_t n, int64_t k, uint64_t seed) {
  std::vector<Case> out;
  for (GemmOp op_a : {GemmOp::kNone, GemmOp::kTranspose})
    for (GemmOp op_b : {GemmOp::kNone, GemmOp::kTranspose})
      for (GemmEpilogue e : {GemmEpilogue::kNone, GemmEpilogue::kBias, GemmEpilogue::kBiasGelu,
                             GemmEpilogue::kBiasGradA, GemmEpilogue::kBiasGradB})
        for (DType c : {DType::kBF16, DType::kF32})
          for (float beta : {0.0f, 1.0f}) {
            const bool grad = e == GemmEpilogue::kBiasGradA || e == GemmEpilogue::kBiasGradB;
            if (e == GemmEpilogue::kBiasGradA && op_a != GemmOp::kTranspose) continue;
            if (e == GemmEpilogue::kBiasGradB && op_b != GemmOp::kNone) continue;
            if (grad && c != DType::kF32) continue;
            if (e == GemmEpilogue::kBiasGelu && beta != 0.0f) continue;
            Case cs{m, n, k, op_a, op_b};
            cs.c = c;
            cs.epilogue = e;
            cs.alpha = grad ? 1.0f : 0.75f;
            cs.beta = beta;
            cs.seed = seed + out.size();
            out.push_back(cs);
          }
  return out;
}

// Every valid f32 combination (c f32) of transposes, epilogues and beta.
std::vector<Case> f32_cases(int64_t m, int64_t n, int64_t k, uint64_t seed) {
  std::vector<Case> out;
  for (Case cs : bf16_cases(m, n, k, seed)) {
    if (cs.c != DType::kF32) continue;
    cs.a = cs.b = DType::kF32;
    cs.seed = seed + out.size();
    out.push_back(cs);
  }
  return out;
}

// Every valid fp8 combination of input formats, output dtypes and epilogues (TN layout).
std::vector<Case> fp8_cases(int64_t m, int64_t n, int64_t k, uint64_t seed) {
  std::vector<Case> out;
  const std::pair<DType, DType> inputs[] = {
      {DType::kE4M3, DType::kE4M3}, {DType::kE5M2, DType::kE4M3}, {DType::kE4M3, DType::kE5M2}};
  for (auto [a, b] : inputs)
    for (DType c : {DType::kBF16, DType::kF32, DType::kE4M3, DType::kE5M2})
      for (GemmEpilogue e : {GemmEpilogue::kNone, GemmEpilogue::kBias, GemmEpilogue::kBiasGelu}) {
        if (c == DType::kE5M2 && a != DType::kE5M2 && b != DType::kE5M2) continue;
        if (e == GemmEpilogue::kBiasGelu && dtype_is_fp8(c)) continue;
        Case cs{m, n, k, GemmOp::kNone, GemmOp::kTranspose, a, b, c, e};
        cs.alpha = 0.5f;
        cs.c_scale = 4.0f;  // != 1, so an amax taken after the scale would show
        cs.seed = seed + out.size();
        out.push_back(cs);
      }
  return out;
}

// The double reference, validated as gemm() validates.
void run_reference(const GemmParams& p) {
  const GemmShape s = gemm_shape(p);
  detail::validate_gemm(p, s);
  detail::gemm_cpu_reference(p, s);
}

// Runs `cs` through the double reference and checks it against the double loops.
void check_reference_against_naive(const Case& cs) {
  SCOPED_TRACE(cs.str());
  GemmParams p = make_params(cs);
  const Naive nv = naive_gemm(p);  // reads c before the reference overwrites it
  const Expected e = expected_outputs(p, nv);
  run_reference(p);
  EXPECT_TRUE(gemm_close(p.c, e.c, {}, 0.0));
  if (e.pre_gelu.defined()) EXPECT_TRUE(gemm_close(p.pre_gelu, e.pre_gelu, {}, 0.0));
  if (e.bias_grad.defined()) EXPECT_TRUE(gemm_close(p.bias_grad, e.bias_grad, {}, 0.0));
  if (p.c_amax.defined()) EXPECT_EQ(p.c_amax.to_floats()[0], e.amax);
}

// ---- CPU reference -----------------------------------------------------------------------------

// y = x W^T + b, dx = dy W, dW += dy^T x, db = sum dy: values computed by hand.
TEST(GemmCpu, LinearLayerGemmsOnHandComputedValues) {
  const Tensor x = Tensor::from_floats({1, 2, -1, 0, 3, 2}, {2, 3}, DType::kBF16);
  const Tensor w =
      Tensor::from_floats({1, 0, 2, -1, 1, 0, 2, 2, 1, 0, -3, 1}, {4, 3}, DType::kBF16);
  const Tensor dy = Tensor::from_floats({1, -2, 0, 1, 2, 1, -1, 0}, {2, 4}, DType::kBF16);

  GemmParams fwd;
  fwd.a = x;
  fwd.b = w;
  fwd.op_b = GemmOp::kTranspose;
  fwd.c = Tensor::empty({2, 4}, DType::kF32);
  fwd.epilogue = GemmEpilogue::kBias;
  fwd.bias = Tensor::from_floats({0.5f, -1, 0, 2}, {4}, DType::kF32);
  gemm(fwd, Stream::cpu());
  EXPECT_EQ(fwd.c.to_floats(), (std::vector<float>{-0.5f, 0, 5, -5, 4.5f, 2, 8, -5}));

  GemmParams dgrad;
  dgrad.a = dy;
  dgrad.b = w;
  dgrad.c = Tensor::empty({2, 3}, DType::kBF16);
  gemm(dgrad, Stream::cpu());
  EXPECT_EQ(dgrad.c.to_floats(), (std::vector<float>{3, -5, 3, -1, -1, 3}));

  GemmParams wgrad;
  wgrad.a = dy;
  wgrad.op_a = GemmOp::kTranspose;
  wgrad.b = x;
  wgrad.c = Tensor::from_floats(std::vector<float>(12, 10.0f), {4, 3}, DType::kF32);
  wgrad.beta = 1.0f;
  wgrad.epilogue = GemmEpilogue::kBiasGradA;
  wgrad.bias_grad = Tensor::from_floats({7, 7, 7, 7}, {4}, DType::kF32);
  gemm(wgrad, Stream::cpu());
  EXPECT_EQ(wgrad.c.to_floats(),
            (std::vector<float>{11, 18, 13, 8, 9, 14, 10, 7, 8, 11, 12, 9}));  // 10 + dW
  EXPECT_EQ(wgrad.bias_grad.to_floats(), (std::vector<float>{3, -1, -1, 1}));  // overwritten
}

TEST(GemmCpu, GeluIsErfOfStoredPreActivation) {
  GemmParams p;
  p.a = Tensor::from_floats({1, 0, 0, 1}, {2, 2}, DType::kBF16);  // identity
  p.b = Tensor::from_floats({-3, -0.5f, 0.25f, 2}, {2, 2}, DType::kBF16);
  p.c = Tensor::empty({2, 2}, DType::kF32);
  p.pre_gelu = Tensor::empty({2, 2}, DType::kF32);
  p.epilogue = GemmEpilogue::kBiasGelu;
  p.bias = Tensor::from_floats({1, 0}, {2}, DType::kF32);
  gemm(p, Stream::cpu());
  const std::vector<float> pre = {-2, -0.5f, 1.25f, 2};
  EXPECT_EQ(p.pre_gelu.to_floats(), pre);
  for (int i = 0; i < 4; ++i) {
    // erf-GELU, not the tanh approximation (they differ by ~1e-4 .. 1e-3 here).
    EXPECT_NEAR(p.c.to_floats()[i], 0.5 * pre[i] * (1 + std::erf(pre[i] / std::sqrt(2.0))), 1e-6)
        << i;
  }
  EXPECT_NEAR(p.c.to_floats()[0], -0.04550026, 1e-7);  // GELU(-2)
}

TEST(GemmCpuReference, MatchesDoubleLoopsForEveryTransposeEpilogueAndDtype) {
  for (const Case& cs : bf16_cases(7, 5, 6, 100)) check_reference_against_naive(cs);
  for (const Case& cs : bf16_cases(3, 9, 13, 200)) check_reference_against_naive(cs);
  for (const Case& cs : f32_cases(7, 5, 6, 250)) check_reference_against_naive(cs);
  for (const Case& cs : f32_cases(3, 9, 13, 270)) check_reference_against_naive(cs);
}

TEST(GemmCpuReference, Fp8MatchesDoubleLoopsWithScalesAndAmax) {
  for (const Case& cs : fp8_cases(16, 32, 48, 300)) check_reference_against_naive(cs);
}

TEST(GemmCpu, Fp8RunsTheReference) {
  // gemm() on the CPU sends fp8 to the double reference: bit-identical outputs and amax.
  for (const Case& cs : fp8_cases(16, 32, 48, 350)) {
    SCOPED_TRACE(cs.str());
    GemmParams fast = make_params(cs);
    GemmParams ref = make_params(cs);
    gemm(fast, Stream::cpu());
    run_reference(ref);
    EXPECT_TRUE(testing::all_close(fast.c, ref.c, {0, 0}));
    if (ref.pre_gelu.defined())
      EXPECT_TRUE(testing::all_close(fast.pre_gelu, ref.pre_gelu, {0, 0}));
    if (ref.c_amax.defined()) EXPECT_EQ(fast.c_amax.to_floats()[0], ref.c_amax.to_floats()[0]);
  }
}

// ---- the OpenBLAS path against the reference ---------------------------------------------------

// One bf16 ulp at |x| (the spacing of bf16 values in x's binade; subnormals: 2^-133).
double bf16_ulp(double x) {
  int e = 0;
  std::frexp(std::max(std::abs(x), std::ldexp(1.0, -126)), &e);  // |x| in [2^(e-1), 2^e)
  return std::ldexp(1.0, e - 1 - 7);
}

// The OpenBLAS path sums in f32 in BLAS's order, the reference in double:
//   f32 outputs:  |fast - ref| <= 1e-5 * magnitude + 1e-6 * |ref| + 1e-7
//   bf16 outputs: |fast - ref| <= ulps * bf16_ulp + 1e-5 * magnitude
// magnitude = sum |terms| of the element (|alpha a b| products, |beta c|, |bias|). The f32 rounding
// terms cover the erf of the GELU (f32 on this path, double in the reference).
::testing::AssertionResult fast_close(const Tensor& fast, const Tensor& ref,
                                      const std::vector<double>& magnitude, int bf16_ulps) {
  if (!(fast.shape() == ref.shape()) || fast.dtype() != ref.dtype())
    return ::testing::AssertionFailure() << fast.str() << " vs reference " << ref.str();
  const std::vector<float> a = fast.to_floats(), b = ref.to_floats();
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::abs(double(a[i]) - double(b[i]));
    const double mag = i < magnitude.size() ? magnitude[i] : 0.0;
    const double allowed =
        ref.dtype() == DType::kBF16
            ? bf16_ulps * bf16_ulp(std::max(std::abs(a[i]), std::abs(b[i]))) + 1e-5 * mag
            : 1e-5 * mag + 1e-6 * std::abs(double(b[i])) + 1e-7;
    if (!(d <= allowed))
      return ::testing::AssertionFailure()
             << "element " << i << ": " << a[i] << " vs reference " << b[i] << " (|diff| " << d
             << ", allowed " << allowed << ", magnitude " << mag << ")";
  }
  return ::testing::AssertionSuccess();
}

// gemm() on the CPU (OpenBLAS) against the double reference on the same inputs; outputs of both
// are poisoned with NaN first (make_params), so an element either path leaves unwritten fails.
void check_fast_against_reference(const Case& cs) {
  SCOPED_TRACE(cs.str());
  GemmParams fast = make_params(cs);
  GemmParams ref = make_params(cs);
  const Naive nv = naive_gemm(ref);  // magnitudes; reads c before it is overwritten
  gemm(fast, Stream::cpu());
  run_reference(ref);
  // A bf16 pre-activation may round one ulp apart; GELU (slope <= 1.13) carries that into c,
  // which then rounds once more: two ulps for a bf16 c under kBiasGelu.
  const int c_ulps = cs.epilogue == GemmEpilogue::kBiasGelu ? 2 : 1;
  EXPECT_TRUE(fast_close(fast.c, ref.c, nv.magnitude, c_ulps));
  if (ref.pre_gelu.defined()) EXPECT_TRUE(fast_close(fast.pre_gelu, ref.pre_gelu, nv.magnitude, 1));
  if (ref.bias_grad.defined())
    EXPECT_TRUE(fast_close(fast.bias_grad, ref.bias_grad, nv.grad_magnitude, 1));
}

TEST(GemmCpu, F32MatchesReferenceForEveryTransposeAndEpilogue) {
  for (const Case& cs : f32_cases(71, 229, 53, 400)) check_fast_against_reference(cs);
  for (const Case& cs : f32_cases(29, 541, 67, 500)) check_fast_against_reference(cs);
  for (const Case& cs : f32_cases(1, 1, 1, 600)) check_fast_against_reference(cs);
  for (const Case& cs : f32_cases(7, 5, 6, 650)) check_fast_against_reference(cs);
}

TEST(GemmCpu, Bf16MatchesReferenceForEveryTransposeEpilogueAndDtype) {
  for (const Case& cs : bf16_cases(71, 229, 53, 700)) check_fast_against_reference(cs);
  for (const Case& cs : bf16_cases(29, 541, 67, 800)) check_fast_against_reference(cs);
  for (const Case& cs : bf16_cases(1, 1, 1, 900)) check_fast_against_reference(cs);
}

TEST(GemmCpu, F32GeluAcrossTheRange) {
  // pre_gelu = 1 x b, so c = GELU(b) for every x in [-14, 14] (steps of 1/64) and NaN. The f32
  // GELU of the BLAS path keeps its relative accuracy in the negative tail, where 0.5 x (1 + erf)
  // would cancel to nothing; past x = -12.7 the result (|y| < 1e-35) is flushed to 0.
  std::vector<float> xs;
  for (int i = -14 * 64; i <= 14 * 64; ++i) xs.push_back(static_cast<float>(i) / 64.0f);
  xs.push_back(std::numeric_limits<float>::quiet_NaN());
  const int64_t n = static_cast<int64_t>(xs.size());
  GemmParams p;
  p.a = Tensor::from_floats({1.0f}, {1, 1}, DType::kF32);
  p.b = Tensor::from_floats(xs, {1, n}, DType::kF32);
  p.c = poisoned({1, n}, DType::kF32);
  p.pre_gelu = poisoned({1, n}, DType::kF32);
  p.epilogue = GemmEpilogue::kBiasGelu;
  p.bias = Tensor::from_floats(std::vector<float>(static_cast<size_t>(n), 0.0f), {n}, DType::kF32);
  gemm(p, Stream::cpu());
  const std::vector<float> c = p.c.to_floats(), pre = p.pre_gelu.to_floats();
  for (int64_t i = 0; i + 1 < n; ++i) {
    const double x = xs[i];
    ASSERT_EQ(pre[i], xs[i]);
    const double want = 0.5 * x * std::erfc(-x / std::sqrt(2.0));
    // Relative: 2e-7; for x < 0 3e-7 x (1 + x^2/2), as e^(-x^2/2) carries the rounding of x^2/2
    // (2.4e-5 at x = -12.5). 0.5 x (1 + erff) would be off by 2e-3 at x = -4 already.
    const double rel = x >= 0 ? 2e-7 : 3e-7 * (1 + x * x / 2);
    const double allowed = x >= -12.5 ? rel * std::abs(want) : 1e-35;
    EXPECT_LE(std::abs(c[i] - want), allowed) << "x = " << x << ": " << c[i] << " vs " << want;
  }
  EXPECT_TRUE(std::isnan(c[n - 1])) << c[n - 1];
}

TEST(GemmCpu, LargeLinearLayerShapesMatchReference) {
  // ESM-2 8M on a 256-token step (hidden 320, ffn 1280): FC1 forward with GELU, FC2 dgrad, and a
  // wgrad with its bias gradient over all tokens, accumulated into an f32 gradient.
  for (DType t : {DType::kF32, DType::kBF16}) {
    Case fwd{256, 1280, 320, GemmOp::kNone, GemmOp::kTranspose, t, t};
    fwd.epilogue = GemmEpilogue::kBiasGelu;
    fwd.seed = 950;
    check_fast_against_reference(fwd);
    Case dgrad{256, 1280, 320, GemmOp::kNone, GemmOp::kNone, t, t};
    dgrad.c = t;
    dgrad.seed = 951;
    check_fast_against_reference(dgrad);
    Case wgrad{320, 1280, 256, GemmOp::kTranspose, GemmOp::kNone, t, t};
    wgrad.beta = 1.0f;
    wgrad.epilogue = GemmEpilogue::kBiasGradA;
    wgrad.seed = 952;
    check_fast_against_reference(wgrad);
  }
}

TEST(GemmCpu, BlasThreadPolicy) {
  using detail::blas_thread_count;
  using detail::BlasThreadEnv;
  // Not under mpirun, or one rank per node: OpenBLAS keeps its own choice.
  EXPECT_EQ(blas_thread_count(BlasThreadEnv{false, 0, 16, 16}), 0);
  EXPECT_EQ(blas_thread_count(BlasThreadEnv{false, 1, 16, 16}), 0);
  // The user's OPENBLAS_NUM_THREADS (or OMP_NUM_THREADS) wins.
  EXPECT_EQ(blas_thread_count(BlasThreadEnv{true, 4, 2, 2}), 0);
  // Unbound ranks share the node; never fewer than one thread.
  EXPECT_EQ(blas_thread_count(BlasThreadEnv{false, 2, 16, 16}), 8);
  EXPECT_EQ(blas_thread_count(BlasThreadEnv{false, 3, 16, 16}), 5);
  EXPECT_EQ(blas_thread_count(BlasThreadEnv{false, 4, 2, 2}), 1);
  // A rank bound to some CPUs uses them.
  EXPECT_EQ(blas_thread_count(BlasThreadEnv{false, 2, 1, 2}), 1);
  EXPECT_EQ(blas_thread_count(BlasThreadEnv{false, 4, 4, 16}), 4);
}

TEST(GemmCpu, Fp8OutputSaturatesAndAmaxIsBeforeScale) {
  // One element far above e4m3's range after scaling: code 0x7E (448), amax the unscaled value.
  GemmParams p = make_params(Case{16, 16, 16, GemmOp::kNone, GemmOp::kTranspose, DType::kE4M3,
                                  DType::kE4M3, DType::kE4M3});
  p.c_scale = scalar(1000.0f);
  gemm(p, Stream::cpu());
  const Naive nv = naive_gemm(p);
  double amax = 0;
  for (double v : nv.value) amax = std::max(amax, std::abs(v));
  EXPECT_EQ(p.c_amax.to_floats()[0], static_cast<float>(amax));
  int saturated = 0;
  for (int64_t i = 0; i < p.c.numel(); ++i) {
    const uint8_t code = p.c.data<e4m3_t>()[i].bits & 0x7F;
    EXPECT_NE(code, 0x7F) << "NaN code at " << i;
    saturated += code == 0x7E;
  }
  EXPECT_GT(saturated, 0);
}

// ---- validation --------------------------------------------------------------------------------

void expect_rejected(const GemmParams& p, const std::string& phrase) {
  try {
    gemm(p, Stream::cpu());
    ADD_FAILURE() << "expected an error mentioning '" << phrase << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(phrase), std::string::npos) << e.what();
  }
}

TEST(GemmValidation, RejectsWhatCuBlasLtWouldReject) {
  const Case fp8{32,           32,           32,          GemmOp::kNone, GemmOp::kTranspose,
                 DType::kE4M3, DType::kE4M3, DType::kBF16};
  {
    GemmParams p = make_params(fp8);
    std::swap(p.op_a, p.op_b);  // NN-like: not TN
    p.a = random_matrix(32, 32, DType::kE4M3, 1, 1, 1.0f);
    expect_rejected(p, "TN layout");
  }
  {
    Case c = fp8;
    c.k = 40;
    expect_rejected(make_params(c), "multiples of 16");
  }
  {
    Case c = fp8;
    c.a = c.b = DType::kE5M2;
    expect_rejected(make_params(c), "e5m2 x e5m2");
  }
  {
    Case c = fp8;
    c.c = DType::kE5M2;  // e5m2 output needs an e5m2 input
    expect_rejected(make_params(c), "expected c bf16, f32, e4m3");
  }
  {
    GemmParams p = make_params(fp8);
    p.a_scale_inv = Tensor();
    expect_rejected(p, "a_scale_inv");
  }
  {
    Case c = fp8;
    c.c = DType::kE4M3;
    GemmParams p = make_params(c);
    p.beta = 1.0f;
    expect_rejected(p, "beta 0");
  }
  {
    Case c{8, 8, 8};
    c.epilogue = GemmEpilogue::kBiasGradA;  // op_a = kNone: cuBLASLt BGRADB needs transposed B'
    expect_rejected(make_params(c), "op_a=kTranspose");
  }
  {
    Case c{8, 8, 8, GemmOp::kNone, GemmOp::kTranspose};
    c.epilogue = GemmEpilogue::kBiasGradB;
    expect_rejected(make_params(c), "op_b=kNone");
  }
  {
    Case c{8, 8, 8, GemmOp::kTranspose};
    c.c = DType::kBF16;
    c.epilogue = GemmEpilogue::kBiasGradA;
    expect_rejected(make_params(c), "expected c f32");
  }
  {
    Case c{8, 8, 8};
    c.epilogue = GemmEpilogue::kBias;
    GemmParams p = make_params(c);
    p.bias = p.bias.to(DType::kBF16);  // c is f32
    expect_rejected(p, "expected bias f32");
  }
  {
    GemmParams p = make_params(Case{8, 8, 8});
    p.b = random_matrix(9, 8, DType::kBF16, 1, 2, 1.0f);
    expect_rejected(p, "inner dimensions differ");
  }
  {
    GemmParams p = make_params(Case{8, 8, 8});
    p.a = p.a.to(DType::kF32);  // f32 x bf16
    expect_rejected(p, "both bf16 or both f32");
  }
  {
    Case c{8, 8, 8, GemmOp::kNone, GemmOp::kNone, DType::kF32, DType::kF32};
    c.c = DType::kBF16;
    expect_rejected(make_params(c), "f32 inputs: expected c f32");
  }
  {
    Case c{8, 8, 8, GemmOp::kNone, GemmOp::kNone, DType::kF32, DType::kF32};
    c.epilogue = GemmEpilogue::kBias;
    GemmParams p = make_params(c);
    p.bias = p.bias.to(DType::kBF16);
    expect_rejected(p, "expected bias f32");
  }
  {
    Case c{16, 16, 16, GemmOp::kNone, GemmOp::kTranspose, DType::kF32, DType::kE4M3};
    GemmParams p = make_params(c);
    expect_rejected(p, "both bf16 or both f32");
  }
  {
    GemmParams p = make_params(Case{8, 8, 8});
    p.c = Tensor::empty({8, 7}, DType::kF32);
    expect_rejected(p, "expected c of shape [8, 8]");
  }
  {
    Case c{8, 8, 8};
    c.epilogue = GemmEpilogue::kBiasGelu;
    GemmParams p = make_params(c);
    p.beta = 1.0f;
    expect_rejected(p, "kBiasGelu does not accumulate");
  }
}

// ---- CUDA against the CPU reference ------------------------------------------------------------

// The fp32 accumulation of the GPU against the double sums of the reference: allowed error
// f32-rtol x sum |a b|. A wrong rounding (say to bf16 in an f32 path, or TF32 products for f32
// inputs: ~2^-11 relative) is ~100x larger.
// Measured on the H100 (cuBLASLt 13.1): fp8 GEMMs accumulate in the tensor cores' reduced precision
// between promotions (errors up to ~1.1e-4 x sum|a b| even in the precise mode), and a bf16 output with
// beta != 0 may be formed from split-K partials rounded to bf16 (~2^-9 x sum|a b| seen for the
// transposed-transposed layout). Those get allowances of their own size; everything else the f32 one.
double accum_rtol(const Case& cs) {
  const double f32 = tolerance_for(DType::kF32).rtol;
  if (cs.a == DType::kE4M3 || cs.a == DType::kE5M2)
    return cs.accumulation == Fp8Accumulation::kFast ? 2e-3 : 3e-4;  // ~2^-12: Hopper's fp8 accumulator
  if (cs.c == DType::kBF16) return 4e-3;
  return f32;
}

void check_cuda_against_cpu(const Case& cs) {
  SCOPED_TRACE(cs.str());
  const Stream stream = Stream::cuda_default(0);
  GemmParams cpu = make_params(cs);
  GemmParams gpu = to_device(cpu, Device::cuda(0));
  const Naive nv = naive_gemm(cpu);  // magnitudes for the accumulation allowance
  run_reference(cpu);
  gemm(gpu, stream);
  const double ar = accum_rtol(cs);
  const double c_scale = dtype_is_fp8(cs.c) ? cs.c_scale : 1.0;
  std::vector<double> c_mag;
  for (double m : nv.magnitude) c_mag.push_back(m * c_scale);
  EXPECT_TRUE(gemm_close(gpu.c.to(Device::cpu()), cpu.c, c_mag, ar));
  if (cpu.pre_gelu.defined())
    EXPECT_TRUE(gemm_close(gpu.pre_gelu.to(Device::cpu()), cpu.pre_gelu, nv.magnitude, ar));
  if (cpu.bias_grad.defined())
    EXPECT_TRUE(gemm_close(gpu.bias_grad.to(Device::cpu()), cpu.bias_grad, nv.grad_magnitude, ar));
  if (cpu.c_amax.defined()) {
    const double want = cpu.c_amax.to_floats()[0];
    const double got = gpu.c_amax.to(Device::cpu()).to_floats()[0];
    double max_mag = 0;
    for (double m : nv.magnitude) max_mag = std::max(max_mag, m);
    EXPECT_NEAR(got, want, 1e-5 * std::abs(want) + ar * max_mag) << "amax (before c_scale)";
  }
}

TEST(GemmCuda, MatchesCpuForEveryTransposeEpilogueAndDtype) {
  HELIX_REQUIRE_CUDA();
  for (const Case& cs : bf16_cases(71, 229, 53, 1000)) check_cuda_against_cpu(cs);
  for (const Case& cs : bf16_cases(29, 541, 67, 2000)) check_cuda_against_cpu(cs);
  for (const Case& cs : bf16_cases(1, 1, 1, 3000)) check_cuda_against_cpu(cs);
}

// Short K keeps the allowance tight: TF32 products (inputs rounded to 10 mantissa bits, ~2^-11
// relative each) would miss 1e-5 x sum|ab| by ~10x at K = 53 and ~50x at K = 1.
TEST(GemmCuda, F32MatchesCpuReferenceForEveryTransposeAndEpilogue) {
  HELIX_REQUIRE_CUDA();
  for (const Case& cs : f32_cases(71, 229, 53, 1100)) check_cuda_against_cpu(cs);
  for (const Case& cs : f32_cases(29, 541, 67, 2100)) check_cuda_against_cpu(cs);
  for (const Case& cs : f32_cases(1, 1, 1, 3100)) check_cuda_against_cpu(cs);
}

TEST(GemmCuda, F32LargeShapes) {
  HELIX_REQUIRE_CUDA();
  // Long K accumulations, and bias gradients over many rows (the column-sum kernel: 2048 rows in
  // 16 strides per column for the wgrad; 32 column blocks for the dgrad-shaped kBiasGradB).
  Case fwd{128, 1280, 2048, GemmOp::kNone, GemmOp::kTranspose, DType::kF32, DType::kF32};
  fwd.epilogue = GemmEpilogue::kBiasGelu;
  fwd.seed = 4100;
  check_cuda_against_cpu(fwd);
  Case wgrad{640, 320, 2048, GemmOp::kTranspose, GemmOp::kNone, DType::kF32, DType::kF32};
  wgrad.beta = 1.0f;
  wgrad.epilogue = GemmEpilogue::kBiasGradA;
  wgrad.seed = 4101;
  check_cuda_against_cpu(wgrad);
  Case dgrad{2048, 1000, 320, GemmOp::kNone, GemmOp::kNone, DType::kF32, DType::kF32};
  dgrad.epilogue = GemmEpilogue::kBiasGradB;  // column sums of b stored [320, 1000]
  dgrad.seed = 4102;
  check_cuda_against_cpu(dgrad);
}

TEST(GemmCuda, LargeLinearLayerShapes) {
  HELIX_REQUIRE_CUDA();
  // ESM-2 650M FC1 / FC2 on a 128-token slice (hidden 1280, ffn 5120), and a wgrad over 2048
  // tokens.
  Case fwd{128, 5120, 1280, GemmOp::kNone, GemmOp::kTranspose};
  fwd.c = DType::kBF16;
  fwd.epilogue = GemmEpilogue::kBiasGelu;
  fwd.seed = 4000;
  check_cuda_against_cpu(fwd);
  Case dgrad{128, 1280, 5120};
  dgrad.c = DType::kBF16;
  dgrad.seed = 4001;
  check_cuda_against_cpu(dgrad);
  Case wgrad{640, 320, 2048, GemmOp::kTranspose, GemmOp::kNone};
  wgrad.beta = 1.0f;
  wgrad.epilogue = GemmEpilogue::kBiasGradA;
  wgrad.seed = 4002;
  check_cuda_against_cpu(wgrad);
}

TEST(GemmCuda, Fp8MatchesCpu) {
  HELIX_REQUIRE_CUDA();
  if (cuda_compute_capability(0) < 89) GTEST_SKIP() << "fp8 GEMMs need sm_89 or newer";
  for (const Case& cs : fp8_cases(64, 224, 160, 5000)) check_cuda_against_cpu(cs);
  for (const Case& cs : fp8_cases(16, 16, 16, 6000)) check_cuda_against_cpu(cs);
  Case big{512,          1280,         1024,         GemmOp::kNone,      GemmOp::kTranspose,
           DType::kE4M3, DType::kE4M3, DType::kBF16, GemmEpilogue::kBias};
  big.seed = 7000;
  check_cuda_against_cpu(big);
  big.accumulation = Fp8Accumulation::kFast;
  big.seed = 7001;
  check_cuda_against_cpu(big);
}

TEST(GemmCuda, CachedAlgorithmServesNewTensorsOfTheSameProblem) {
  HELIX_REQUIRE_CUDA();
  Case cs{96, 160, 64, GemmOp::kNone, GemmOp::kTranspose};
  cs.epilogue = GemmEpilogue::kBias;
  for (uint64_t seed : {8000, 8001, 8002}) {  // same key, fresh tensors and pointers each time
    cs.seed = seed;
    check_cuda_against_cpu(cs);
  }
}

TEST(GemmCuda, RejectsMisalignedPointers) {
  HELIX_REQUIRE_CUDA();
  GemmParams p = to_device(make_params(Case{8, 8, 8}), Device::cuda(0));
  Tensor big = Tensor::empty({9, 8}, DType::kBF16, Device::cuda(0));
  p.a = big.view({72}).slice(1, 65).view({8, 8});  // 2 bytes past a 16-byte boundary
  try {
    gemm(p, Stream::cuda_default(0));
    ADD_FAILURE() << "expected a misalignment error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("16-byte aligned"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace helix
