#pragma once
// gemm: row-major C[M,N] = epilogue(alpha * op(A) * op(B) + beta * C) with f32, bf16 or fp8 inputs
// and fp32 accumulation; on CUDA one cuBLASLt call (row-major mapped to column-major by swapping
// the operands), on the CPU OpenBLAS sgemm plus f32 epilogue loops (fp8: the double reference). The
// same rules are checked on both devices, so a call that passes on the CPU is one cuBLASLt accepts.
//
// The three GEMMs of a linear layer y[T,out] = x[T,in] * W[out,in]^T + b:
//   forward  y  = x  * W^T        a=x  [T,in],   b=W  [out,in], op_a=kNone,      op_b=kTranspose
//   dgrad    dx = dy * W          a=dy [T,out],  b=W  [out,in], op_a=kNone,      op_b=kNone
//   wgrad    dW += dy^T * x       a=dy [T,out],  b=x  [T,in],   op_a=kTranspose, op_b=kNone,
//            c=dW f32, beta=1, epilogue kBiasGradA writes db[out] = sum over T of dy (f32)
// FP8 (Hopper cuBLASLt accepts only its "TN" layout, which in row-major terms is op_a=kNone,
// op_b=kTranspose: both operands K-contiguous). The forward fits as is; dgrad and wgrad take the
// transposed copies that cast_transpose_fp8 writes:
//   dgrad    dx = dy * (W^T)^T    a=dy [T,out],  b=W^T [in,out]
//   wgrad    dW = dy^T * (x^T)^T  a=dy^T [out,T], b=x^T [in,T]
//
// Epilogues (applied in this order, in fp32: acc -> alpha*acc -> +beta*C -> +bias -> GELU):
//   kBias       + bias[N]
//   kBiasGelu   pre_gelu = alpha*AB + bias (stored), C = GELU_erf(pre_gelu as stored). cuBLASLt's
//               fused GELU is the tanh approximation, ESM-2 uses erf: so on CUDA the GEMM writes
//               pre_gelu through the bias epilogue and one vectorized pass applies erf-GELU.
//   kBiasGradA  bias_grad[M] = sum_k op(A)[m,k]   (cuBLASLt BGRADB; needs op_a == kTranspose)
//   kBiasGradB  bias_grad[N] = sum_k op(B)[k,n]   (cuBLASLt BGRADA; needs op_b == kNone)
//   bias_grad is overwritten, never accumulated (cuBLASLt writes it), even when beta = 1.
//
// Type rules (cuBLASLt's, enforced on both devices):
//   bf16 x bf16: C bf16 or f32; bias dtype == C dtype; pre_gelu dtype == C dtype; bias-gradient
//     epilogues need C f32 (bias_grad f32) and alpha == 1.
//   f32 x f32: C f32, bias f32, pre_gelu f32, bias_grad f32; every epilogue (bias gradients with
//     alpha == 1). True fp32 on both devices: CUDA uses CUBLAS_COMPUTE_32F, never TF32, so CPU and
//     CUDA runs of the model in f32 agree to fp32 rounding. On CUDA the bias gradient of an f32
//     GEMM is a separate column-sum kernel (double partial sums), not cuBLASLt's BGRAD epilogue.
//   Mixed inputs (f32 x bf16, bf16 x fp8, ...) are rejected; c must not overlap a or b.
//   fp8: (a, b) in {(e4m3,e4m3), (e5m2,e4m3), (e4m3,e5m2)}; op_a=kNone, op_b=kTranspose;
//     M, N, K multiples of 16 (leading dimensions and the rows of the K-major operands);
//     a_scale_inv / b_scale_inv f32 [1] required (value = code * scale_inv); C bf16, f32, e4m3,
//     or e5m2 (e5m2 only when an input is e5m2); bias bf16; no bias-gradient epilogue.
//     FP8 output: c = fp8(value * c_scale) with satfinite rounding, beta must be 0, c_amax
//     (optional) is OVERWRITTEN with max |value| before c_scale is applied (cuBLASLt's AMAX_D
//     semantics), the value being the epilogue's result. No GELU with an fp8 C.
//
// CPU: f32 inputs go to cblas_sgemm as they are; bf16 inputs are widened to f32 first (exact), the
// product lands in an f32 buffer, the epilogue runs in f32 and rounds once to c's dtype (buffers:
// per thread, grown to the largest GEMM seen, kept). The sums run in BLAS order, not in double: the
// tests hold this path to the double reference (detail::gemm_cpu_reference) within
// |err| <= 1e-5 * sum |a*b| (bf16 outputs: plus one bf16 ulp, two for c after GELU).
//
// CPU threads: OpenBLAS's own pool. OPENBLAS_NUM_THREADS (or GOTO_NUM_THREADS / OMP_NUM_THREADS,
// which OpenBLAS also reads) is respected; helix never sets it. When none is set and mpirun started
// several ranks on this node (OMPI_COMM_WORLD_LOCAL_SIZE or MPI_LOCALNRANKS), the first CPU GEMM
// sizes the pool to the CPUs the rank is bound to or, unbound, to max(1, node CPUs / local ranks),
// so that N ranks on one node do not each start a pool as large as the node.
//
// CUDA: pointers 16-byte aligned, tensors contiguous. Algorithms come from
// cublasLtMatmulAlgoGetHeuristic once per (device, shape, dtypes, transposes, epilogue, beta != 0,
// accumulation) and are cached; one cuBLASLt handle per device; one 32 MiB workspace per (device,
// stream), since two streams running GEMMs at once must not share scratch memory.
#include <cstdint>

#include "core/device.h"
#include "core/tensor.h"

namespace helix {

// op(X) = X or X^T (X as stored, row-major).
enum class GemmOp : uint8_t { kNone, kTranspose };

enum class GemmEpilogue : uint8_t { kNone, kBias, kBiasGelu, kBiasGradA, kBiasGradB };

// FP8 accumulation: kPrecise promotes partial sums to fp32 periodically (cuBLASLt's default);
// kFast (CUBLASLT_MATMUL_DESC_FAST_ACCUM) skips that, faster and less accurate. bf16 ignores it,
// and so does the CPU reference.
enum class Fp8Accumulation : uint8_t { kPrecise, kFast };

struct GemmParams {
  Tensor a;  // [M, K] (op_a = kNone) or [K, M] (op_a = kTranspose); f32, bf16, e4m3 or e5m2
  Tensor b;  // [K, N] (op_b = kNone) or [N, K] (op_b = kTranspose); f32, bf16, e4m3 or e5m2
  Tensor c;  // [M, N] output; bf16, f32, e4m3 or e5m2; also read as input when beta != 0
  GemmOp op_a = GemmOp::kNone;
  GemmOp op_b = GemmOp::kNone;
  float alpha = 1.0f;
  float beta = 0.0f;
  GemmEpilogue epilogue = GemmEpilogue::kNone;
  Tensor bias;       // [N] kBias / kBiasGelu
  Tensor pre_gelu;   // [M, N] kBiasGelu: alpha*AB + bias before GELU, dtype of c
  Tensor bias_grad;  // [M] kBiasGradA or [N] kBiasGradB, f32, overwritten
  // FP8 only.
  Tensor a_scale_inv;  // [1] f32: dequantization factor of a (1 / the scale it was cast with)
  Tensor b_scale_inv;  // [1] f32
  Tensor c_scale;      // [1] f32, fp8 c: c = fp8(value * c_scale)
  Tensor c_amax;       // [1] f32, fp8 c, optional: overwritten with max |value| (before c_scale)
  Fp8Accumulation fp8_accumulation = Fp8Accumulation::kPrecise;
};

// Dispatches on the tensors' device: CPU reference or cuBLASLt. All tensors on one device.
void gemm(const GemmParams& p, const Stream& stream);

// Problem size as seen after the transposes (validated by gemm()).
struct GemmShape {
  int64_t m, n, k;
};
GemmShape gemm_shape(const GemmParams& p);

namespace detail {
void validate_gemm(const GemmParams& p, GemmShape s);  // the rules above; throws helix::Error
// CPU: OpenBLAS for f32 / bf16 inputs, the reference for fp8 (what gemm() runs on the CPU).
void gemm_cpu(const GemmParams& p, GemmShape s);
// CPU, every dtype: products and epilogue in double, one rounding. For the tests only.
void gemm_cpu_reference(const GemmParams& p, GemmShape s);

// The OpenBLAS thread count gemm_cpu() sets (see "Threads" above), as a pure function of the
// environment; 0 = leave OpenBLAS's own choice.
struct BlasThreadEnv {
  bool user_set;    // OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS or OMP_NUM_THREADS is set
  int local_ranks;  // processes of this job on this node (0: not under mpirun)
  int bound_cpus;   // CPUs this process may run on (its affinity mask)
  int node_cpus;    // CPUs of the node
};
int blas_thread_count(const BlasThreadEnv& env);
void gemm_cuda(const GemmParams& p, GemmShape s, const Stream& stream);
// GELU(erf) in place of the cuBLASLt tanh epilogue: out = gelu(in), in/out bf16 or f32, n elements.
void gelu_erf_cuda(const Tensor& in, const Tensor& out, const Stream& stream);
}  // namespace detail

}  // namespace helix
