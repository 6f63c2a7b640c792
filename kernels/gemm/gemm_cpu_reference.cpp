// Double-precision reference of gemm() on the CPU: plain loops, products summed in double, epilogue
// in double, one rounding to the output dtype through convert.h (as the GPU rounds). gemm() uses it
// for fp8 inputs; the tests check the BLAS path (gemm_cpu.cpp) and CUDA against it. fp8 inputs are
// decoded with convert.h and multiplied by their scale_inv; an fp8 output is value * c_scale
// rounded with satfinite, and the amax is max |value| before the scale, as cuBLASLt reports it.
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/convert.h"
#include "kernels/gemm/gemm.h"

namespace helix {
namespace {

// op(X) decoded to double (times scale_inv for fp8), materialised row-major [rows, cols], or its
// transpose when `transpose_result`, so that the dot products below run over contiguous memory.
std::vector<double> decode(const Tensor& t, GemmOp op, const Tensor& scale_inv,
                           bool transpose_result) {
  const double scale = scale_inv.defined() ? cpu_value(scale_inv, 0) : 1.0;
  const int64_t r = t.dim(0), c = t.dim(1);
  // The stored element (i, j) lands at (i, j) or (j, i): op and the requested layout cancel out.
  const bool swap = (op == GemmOp::kTranspose) != transpose_result;
  std::vector<double> out(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < c; ++j)
      out[static_cast<size_t>(swap ? j * r + i : i * c + j)] = cpu_value(t, i * c + j) * scale;
  return out;
}

double gelu_erf(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752440)); }

// Stores v (already in the output's units) into element i of a float tensor with CUDA's rounding.
void store(const Tensor& t, int64_t i, double v) {
  const float f = static_cast<float>(v);
  switch (t.dtype()) {
    case DType::kF32:
      t.data<float>()[i] = f;
      break;
    case DType::kBF16:
      t.data<bf16_t>()[i] = bf16_t::from_float(f);
      break;
    case DType::kE4M3:
      t.data<e4m3_t>()[i] = e4m3_t::from_float(f);
      break;
    case DType::kE5M2:
      t.data<e5m2_t>()[i] = e5m2_t::from_float(f);
      break;
    default:
      HELIX_FAIL("gemm_cpu_reference: unexpected output dtype {}", dtype_name(t.dtype()));
  }
}

// max |x| with the float's bit pattern as the order, so NaN wins (as on the GPU).
float abs_max(float acc, float x) {
  const uint32_t a = float_bits(acc), b = float_bits(x) & 0x7FFFFFFFu;
  return bits_float(a > b ? a : b);
}

}  // namespace

void detail::gemm_cpu_reference(const GemmParams& p, GemmShape s) {
  const std::vector<double> a = decode(p.a, p.op_a, p.a_scale_inv, false);  // op(A)   [M, K]
  const std::vector<double> bt = decode(p.b, p.op_b, p.b_scale_inv, true);  // op(B)^T [N, K]
  const bool fp8_out = dtype_is_fp8(p.c.dtype());
  const double c_scale = fp8_out ? cpu_value(p.c_scale, 0) : 1.0;
  float amax = 0.0f;
  const size_t K = static_cast<size_t>(s.k);

  for (int64_t i = 0; i < s.m; ++i) {
    const double* ar = a.data() + static_cast<size_t>(i) * K;
    for (int64_t j = 0; j < s.n; ++j) {
      const double* br = bt.data() + static_cast<size_t>(j) * K;
      double acc = 0.0;
      for (size_t k = 0; k < K; ++k) acc += ar[k] * br[k];
      const int64_t idx = i * s.n + j;
      double v = static_cast<double>(p.alpha) * acc;
      // beta = 0 never reads c (it may hold NaN), as in BLAS.
      if (p.beta != 0.0f) v += static_cast<double>(p.beta) * cpu_value(p.c, idx);
      if (p.bias.defined()) v += cpu_value(p.bias, j);
      if (p.epilogue == GemmEpilogue::kBiasGelu) {
        store(p.pre_gelu, idx, v);
        v = gelu_erf(cpu_value(p.pre_gelu, idx));  // GELU of the pre-activation as stored
      }
      if (fp8_out) {
        amax = abs_max(amax, static_cast<float>(v));
        v *= c_scale;
      }
      store(p.c, idx, v);
    }
  }
  if (fp8_out && p.c_amax.defined()) p.c_amax.data<float>()[0] = amax;

  if (p.epilogue == GemmEpilogue::kBiasGradA) {  // bias_grad[m] = sum over k of op(A)[m, k]
    for (int64_t i = 0; i < s.m; ++i) {
      double sum = 0.0;
      for (size_t k = 0; k < K; ++k) sum += a[static_cast<size_t>(i) * K + k];
      p.bias_grad.data<float>()[i] = static_cast<float>(sum);
    }
  } else if (p.epilogue == GemmEpilogue::kBiasGradB) {  // bias_grad[n] = sum over k of op(B)[k, n]
    for (int64_t j = 0; j < s.n; ++j) {
      double sum = 0.0;
      for (size_t k = 0; k < K; ++k) sum += bt[static_cast<size_t>(j) * K + k];
      p.bias_grad.data<float>()[j] = static_cast<float>(sum);
    }
  }
}

}  // namespace helix
