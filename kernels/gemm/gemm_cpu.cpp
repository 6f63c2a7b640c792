// CPU path of gemm(): OpenBLAS cblas_sgemm for f32 and bf16 inputs, then the epilogue in f32 loops
// with one rounding to c's dtype; fp8 inputs go to the double reference (gemm_cpu_reference.cpp).
// Also the OpenBLAS thread policy under mpirun (gemm.h, "Threads").
#include <cblas.h>
#include <sched.h>

#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#include "core/convert.h"
#include "core/error.h"
#include "kernels/gemm/gemm.h"

// OpenBLAS's own API (declared by its cblas.h, restated so that another cblas.h on the include
// path cannot hide it; the BLAS linked is OpenBLAS, see CMakeLists.txt).
extern "C" void openblas_set_num_threads(int num_threads);

namespace helix {
namespace {

// ---- OpenBLAS threads ------------------------------------------------------------------------

int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return end != v && n > 0 && n < INT_MAX ? static_cast<int>(n) : 0;
}

bool env_set(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0';
}

detail::BlasThreadEnv read_thread_env() {
  detail::BlasThreadEnv env{};
  env.user_set =
      env_set("OPENBLAS_NUM_THREADS") || env_set("GOTO_NUM_THREADS") || env_set("OMP_NUM_THREADS");
  env.local_ranks = env_int("OMPI_COMM_WORLD_LOCAL_SIZE");                 // Open MPI
  if (env.local_ranks == 0) env.local_ranks = env_int("MPI_LOCALNRANKS");  // MPICH / Intel MPI
  cpu_set_t set;
  CPU_ZERO(&set);
  env.bound_cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 0;
  env.node_cpus = static_cast<int>(std::thread::hardware_concurrency());
  return env;
}

void configure_blas_threads_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    const int n = detail::blas_thread_count(read_thread_env());
    if (n > 0) openblas_set_num_threads(n);
  });
}

// ---- f32 operands and epilogue -----------------------------------------------------------------

// Per-thread f32 scratch that only grows: bf16 operands widened to f32 and the f32 product of a
// bf16 GEMM live here, so that a training step does not allocate (and page in) them per call.
struct Scratch {
  std::vector<float> a, b, acc;
};
Scratch& scratch() {
  thread_local Scratch s;
  return s;
}
float* reserve(std::vector<float>& v, int64_t n) {
  if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
  return v.data();
}

// A stored operand as f32: the tensor's own memory for f32, a widened copy of a bf16 one.
const float* as_f32(const Tensor& t, std::vector<float>& buf) {
  if (t.dtype() == DType::kF32) return t.data<float>();
  const bf16_t* src = t.data<bf16_t>();
  float* dst = reserve(buf, t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) dst[i] = src[i].to_float();
  return dst;
}

// e^y for y in [-81, 0]: y = n ln2 + r with |r| <= ln2 / 2 (ln 2 split in two, Cody-Waite),
// e^r by its degree-7 Taylor polynomial (relative error < 1e-8), 2^n through the exponent bits.
inline float exp_nonpositive(float y) {
  const float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(y / ln 2)
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// GELU(x) = x * Phi(x), Phi(x) = 1 - erfc(z)/2 for x >= 0 and erfc(z)/2 for x < 0, z = |x|/sqrt(2).
// erfc(z) = e^(-z^2) * P(z)/Q(z), a rational fit of erfc(z) e^(z^2) on [0, 9] (relative error
// 5e-9; with these f32 coefficients 2.5e-8); past z = 9 erfc is below f32's normal range and taken
// as 0. Against double over |x| <= 20 (steps of 1e-6): absolute error <= 3.9e-7, under one ulp of
// the result where that is largest, and in the negative tail a relative error of ~1e-6 where
// 0.5 x (1 + erff(z)) loses its digits to cancellation. Written with
// integer masks instead of branches so that GCC vectorizes the loops that call it (with the default
// -ftrapping-math a float compare or a select around the division stops it). NaN propagates.
inline float gelu_erf(float x) {
  const int32_t xb = std::bit_cast<int32_t>(x);
  const int32_t zb =
      std::bit_cast<int32_t>(std::bit_cast<float>(xb & 0x7FFFFFFF) * 0.70710678118654752440f);
  constexpr int32_t kNine = 0x41100000;                        // 9.0f
  const int32_t in_range = -static_cast<int32_t>(zb < kNine);  // all ones while z < 9 (NaN: 0)
  const float z = std::bit_cast<float>((zb & in_range) | (kNine & ~in_range));
  const float p =
      1.0f + z * (1.228646993637085f +
                  z * (0.7214195132255554f + z * (0.22437913715839386f + z * 0.0317857600748539f)));
  const float q =
      1.0f +
      z * (2.3570265769958496f +
           z * (2.3810315132141113f +
                z * (1.306361198425293f + z * (0.3977331817150116f + z * 0.05633791163563728f))));
  const int32_t half_erfc =
      std::bit_cast<int32_t>(0.5f * exp_nonpositive(-z * z) * p / q) & in_range;
  const int32_t one_minus = std::bit_cast<int32_t>(1.0f - std::bit_cast<float>(half_erfc));
  const int32_t neg = xb >> 31;  // all ones for x < 0
  return x * std::bit_cast<float>((half_erfc & neg) | (one_minus & ~neg));
}

void gelu_rows(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gelu_erf(in[i]);
}

// out[c] = sum over r of x[r, c] for a row-major [rows, cols] matrix; double partial sums (the
// reduction is O(rows * cols), cheap next to the GEMM), written as f32.
void column_sums(const float* x, int64_t rows, int64_t cols, float* out) {
  std::vector<double> acc(static_cast<size_t>(cols), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    for (int64_t c = 0; c < cols; ++c) acc[static_cast<size_t>(c)] += row[c];
  }
  for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<float>(acc[static_cast<size_t>(c)]);
}

// c (f32) already holds alpha*AB + beta*C from sgemm: + bias, or + bias -> pre_gelu -> GELU.
void epilogue_f32_out(const GemmParams& p, GemmShape s, float* acc) {
  if (!p.bias.defined()) return;
  const float* bias = p.bias.data<float>();
  for (int64_t i = 0; i < s.m; ++i) {
    float* row = acc + i * s.n;
    for (int64_t j = 0; j < s.n; ++j) row[j] += bias[j];
  }
  if (p.epilogue == GemmEpilogue::kBiasGelu) {  // acc is pre_gelu here, c the activation
    gelu_rows(acc, p.c.data<float>(), s.m * s.n);
  }
}

// bf16 c: acc holds alpha*AB (f32); + beta*C + bias, optional GELU of the stored pre-activation,
// one rounding to bf16. Row by row, in passes that the compiler can vectorize.
void epilogue_bf16_out(const GemmParams& p, GemmShape s, float* acc) {
  bf16_t* c = p.c.data<bf16_t>();
  const bf16_t* bias = p.bias.defined() ? p.bias.data<bf16_t>() : nullptr;
  bf16_t* pre = p.epilogue == GemmEpilogue::kBiasGelu ? p.pre_gelu.data<bf16_t>() : nullptr;
  const float beta = p.beta;
  for (int64_t i = 0; i < s.m; ++i) {
    float* v = acc + i * s.n;
    bf16_t* c_row = c + i * s.n;
    if (beta != 0.0f) {  // beta = 0 never reads c (it may hold NaN)
      for (int64_t j = 0; j < s.n; ++j) v[j] += beta * c_row[j].to_float();
    }
    if (bias) {
      for (int64_t j = 0; j < s.n; ++j) v[j] += bias[j].to_float();
    }
    if (pre) {  // GELU of the pre-activation as stored
      bf16_t* pre_row = pre + i * s.n;
      for (int64_t j = 0; j < s.n; ++j) {
        pre_row[j] = bf16_t::from_float(v[j]);
        v[j] = pre_row[j].to_float();
      }
      gelu_rows(v, v, s.n);
    }
    for (int64_t j = 0; j < s.n; ++j) c_row[j] = bf16_t::from_float(v[j]);
  }
}

CBLAS_TRANSPOSE cblas_op(GemmOp op) { return op == GemmOp::kNone ? CblasNoTrans : CblasTrans; }

}  // namespace

int detail::blas_thread_count(const BlasThreadEnv& env) {
  if (env.user_set || env.local_ranks <= 1) return 0;
  if (env.bound_cpus > 0 && env.node_cpus > 0 && env.bound_cpus < env.node_cpus)
    return env.bound_cpus;  // the launcher bound this rank: use what it was given
  const int node = env.node_cpus > 0 ? env.node_cpus : env.bound_cpus;
  return node / env.local_ranks > 1 ? node / env.local_ranks : 1;
}

void detail::gemm_cpu(const GemmParams& p, GemmShape s) {
  if (dtype_is_fp8(p.a.dtype())) {
    gemm_cpu_reference(p, s);
    return;
  }
  HELIX_CHECK(s.m <= INT_MAX && s.n <= INT_MAX && s.k <= INT_MAX && p.a.dim(1) <= INT_MAX &&
                  p.b.dim(1) <= INT_MAX,
              "gemm: the CPU BLAS takes 32-bit sizes; expected M, N, K and leading dimensions "
              "below 2^31, got M={} N={} K={}",
              s.m, s.n, s.k);
  configure_blas_threads_once();

  Scratch& buf = scratch();
  const float* a = as_f32(p.a, buf.a);
  const float* b = as_f32(p.b, buf.b);
  const bool f32_out = p.c.dtype() == DType::kF32;
  const bool gelu = p.epilogue == GemmEpilogue::kBiasGelu;

  // Where sgemm writes: c itself (f32, so beta*C is BLAS's), pre_gelu (f32 GELU; beta is 0 there),
  // or an f32 buffer that the bf16 epilogue rounds from.
  float* acc;
  float beta = p.beta;
  if (f32_out) {
    acc = gelu ? p.pre_gelu.data<float>() : p.c.data<float>();
  } else {
    acc = reserve(buf.acc, s.m * s.n);
    beta = 0.0f;  // beta*C is added in the epilogue, from the bf16 c
  }
  // beta = 0: OpenBLAS overwrites C without reading it (NaN in c does not propagate).
  cblas_sgemm(CblasRowMajor, cblas_op(p.op_a), cblas_op(p.op_b), static_cast<int>(s.m),
              static_cast<int>(s.n), static_cast<int>(s.k), p.alpha, a,
              static_cast<int>(p.a.dim(1)), b, static_cast<int>(p.b.dim(1)), beta, acc,
              static_cast<int>(s.n));
  if (f32_out) {
    epilogue_f32_out(p, s, acc);
  } else {
    epilogue_bf16_out(p, s, acc);
  }

  // Bias gradients reduce the stored operand over its rows: a stored [K, M] (op_a = kTranspose)
  // or b stored [K, N] (op_b = kNone), as validate_gemm() guarantees.
  if (p.epilogue == GemmEpilogue::kBiasGradA) {
    column_sums(a, s.k, s.m, p.bias_grad.data<float>());
  } else if (p.epilogue == GemmEpilogue::kBiasGradB) {
    column_sums(b, s.k, s.n, p.bias_grad.data<float>());
  }
}

}  // namespace helix
