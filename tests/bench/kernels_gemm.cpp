// helix_bench_kernels_gemm: the linear-layer GEMMs of ESM-2 650M and 3B at 16384 tokens (QKV,
// out-proj, FC1, FC2; forward, dgrad, wgrad), timed through gemm() and through a plain cuBLASLt
// call of the same problem built once up front (same types, layout and cuBLASLt epilogue; no
// erf-GELU pass), plus gemm() with fp8 e4m3 inputs in the TN layout. Prints TFLOP/s and the ratios.
//   helix_bench_kernels_gemm [tokens=16384] [iterations=20]
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/random.h"
#include "core/tensor.h"
#include "kernels/gemm/gemm.h"

#if HELIX_WITH_CUDA
#include "core/cuda_check.h"

namespace helix {
namespace {

// The baseline: one cuBLASLt matmul with descriptors, heuristic and workspace prepared once.
class PlainMatmul {
 public:
  explicit PlainMatmul(const GemmParams& p) : p_(p) {
    const GemmShape s = gemm_shape(p);
    const bool gelu = p.epilogue == GemmEpilogue::kBiasGelu;
    d_ = gelu ? p.pre_gelu : p.c;
    const cublasOperation_t ta = p.op_b == GemmOp::kNone ? CUBLAS_OP_N : CUBLAS_OP_T;
    const cublasOperation_t tb = p.op_a == GemmOp::kNone ? CUBLAS_OP_N : CUBLAS_OP_T;
    CUBLAS_CHECK(cublasLtCreate(&handle_));
    CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    set(CUBLASLT_MATMUL_DESC_TRANSA, ta);
    set(CUBLASLT_MATMUL_DESC_TRANSB, tb);
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
    if (p.bias.defined()) {
      epi = CUBLASLT_EPILOGUE_BIAS;
      set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias.data_ptr());
      set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, type(p.bias.dtype()));
    } else if (p.bias_grad.defined()) {
      epi = p.epilogue == GemmEpilogue::kBiasGradA ? CUBLASLT_EPILOGUE_BGRADB
                                                   : CUBLASLT_EPILOGUE_BGRADA;
      set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias_grad.data_ptr());
    }
    set(CUBLASLT_MATMUL_DESC_EPILOGUE, epi);
    if (dtype_is_fp8(p.a.dtype())) {
      set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, p.b_scale_inv.data_ptr());
      set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, p.a_scale_inv.data_ptr());
    }
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&a_, type(p.b.dtype()), ta == CUBLAS_OP_N ? s.n : s.k,
                                            ta == CUBLAS_OP_N ? s.k : s.n, p.b.dim(1)));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&b_, type(p.a.dtype()), tb == CUBLAS_OP_N ? s.k : s.m,
                                            tb == CUBLAS_OP_N ? s.m : s.k, p.a.dim(1)));
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d_desc_, type(d_.dtype()), s.n, s.m, s.n));
    CUDA_CHECK(cudaMalloc(&workspace_, kWorkspace));
    cublasLtMatmulPreference_t pref;
    CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &kWorkspace, sizeof(kWorkspace)));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    CUBLAS_CHECK(cublasLtMatmulAlgoGetHeuristic(handle_, desc_, a_, b_, d_desc_, d_desc_, pref, 1,
                                                &result, &found));
    HELIX_CHECK(found > 0, "plain cuBLASLt: no algorithm");
    algo_ = result.algo;
    cublasLtMatmulPreferenceDestroy(pref);
  }
  ~PlainMatmul() {
    cublasLtMatrixLayoutDestroy(a_);
    cublasLtMatrixLayoutDestroy(b_);
    cublasLtMatrixLayoutDestroy(d_desc_);
    cublasLtMatmulDescDestroy(desc_);
    cublasLtDestroy(handle_);
    cudaFree(workspace_);
  }
  PlainMatmul(const PlainMatmul&) = delete;
  PlainMatmul& operator=(const PlainMatmul&) = delete;

  void run(const Stream& s) {
    CUBLAS_CHECK(cublasLtMatmul(handle_, desc_, &p_.alpha, p_.b.data_ptr(), a_, p_.a.data_ptr(), b_,
                                &p_.beta, d_.data_ptr(), d_desc_, d_.data_ptr(), d_desc_, &algo_,
                                workspace_, kWorkspace, static_cast<cudaStream_t>(s.handle())));
  }

 private:
  static cudaDataType_t type(DType t) {
    switch (t) {
      case DType::kF32:
        return CUDA_R_32F;
      case DType::kBF16:
        return CUDA_R_16BF;
      case DType::kE4M3:
        return CUDA_R_8F_E4M3;
      default:
        return CUDA_R_8F_E5M2;
    }
  }
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attr, const T& v) {
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_, attr, &v, sizeof(v)));
  }
  static constexpr size_t kWorkspace = size_t(32) << 20;
  GemmParams p_;
  Tensor d_;
  cublasLtHandle_t handle_ = nullptr;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, d_desc_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
  void* workspace_ = nullptr;
};

double time_ms(const std::function<void()>& f, const Stream& s, int iters) {
  for (int i = 0; i < 3; ++i) f();
  Event start(s.device()), end(s.device());
  start.record(s);
  for (int i = 0; i < iters; ++i) f();
  end.record(s);
  end.synchronize();
  return start.elapsed_ms(end) / iters;
}

Tensor rand_dev(const Shape& shape, DType dtype, uint64_t seed, const Stream& s) {
  Tensor t = Tensor::empty(shape, dtype == DType::kF32 ? DType::kF32 : DType::kBF16, s.device(), s);
  fill_uniform(t, seed, 0, -1.0f, 1.0f, s);
  return dtype_is_fp8(dtype) ? t.to(dtype, s) : t;
}

enum class Pass { kFwd, kDgrad, kWgrad };

// The gemm() parameters of one pass of a linear layer y[T,out] = x[T,in] W[out,in]^T + b.
// fp8: the operands that bf16 uses transposed come as stored transposed copies (TN layout).
GemmParams linear_params(int64_t t, int64_t out, int64_t in, Pass pass, bool gelu, bool fp8,
                         const Stream& s) {
  const DType in_t = fp8 ? DType::kE4M3 : DType::kBF16;
  GemmParams p;
  switch (pass) {
    case Pass::kFwd:
      p.a = rand_dev({t, in}, in_t, 1, s);
      p.b = rand_dev({out, in}, in_t, 2, s);
      p.op_b = GemmOp::kTranspose;
      p.c = Tensor::empty({t, out}, DType::kBF16, s.device(), s);
      p.epilogue = gelu ? GemmEpilogue::kBiasGelu : GemmEpilogue::kBias;
      p.bias = rand_dev({out}, DType::kBF16, 3, s);
      if (gelu) p.pre_gelu = Tensor::empty({t, out}, DType::kBF16, s.device(), s);
      break;
    case Pass::kDgrad:
      p.a = rand_dev({t, out}, in_t, 4, s);
      p.b = fp8 ? rand_dev({in, out}, in_t, 5, s) : rand_dev({out, in}, in_t, 5, s);
      p.op_b = fp8 ? GemmOp::kTranspose : GemmOp::kNone;
      p.c = Tensor::empty({t, in}, DType::kBF16, s.device(), s);
      break;
    case Pass::kWgrad:
      p.a = fp8 ? rand_dev({out, t}, in_t, 6, s) : rand_dev({t, out}, in_t, 6, s);
      p.op_a = fp8 ? GemmOp::kNone : GemmOp::kTranspose;
      p.b = fp8 ? rand_dev({in, t}, in_t, 7, s) : rand_dev({t, in}, in_t, 7, s);
      p.op_b = fp8 ? GemmOp::kTranspose : GemmOp::kNone;
      p.c = Tensor::zeros({out, in}, DType::kF32, s.device(), s);
      p.beta = 1.0f;
      if (!fp8) {  // cuBLASLt has no fp8 bias-gradient epilogue
        p.epilogue = GemmEpilogue::kBiasGradA;
        p.bias_grad = Tensor::empty({out}, DType::kF32, s.device(), s);
      }
      break;
  }
  if (fp8) {
    p.a_scale_inv = Tensor::from_floats({1.0f}, {1}, DType::kF32, s.device());
    p.b_scale_inv = Tensor::from_floats({1.0f}, {1}, DType::kF32, s.device());
  }
  return p;
}

struct Linear {
  const char* name;
  int64_t out, in;
  bool gelu;
};

void bench_model(const char* model, int64_t hidden, int64_t ffn, int64_t tokens, int iters,
                 const Stream& s) {
  const Linear linears[] = {{"qkv", 3 * hidden, hidden, false},
                            {"out_proj", hidden, hidden, false},
                            {"fc1", ffn, hidden, true},
                            {"fc2", hidden, ffn, false}};
  const char* pass_names[] = {"fwd", "dgrad", "wgrad"};
  for (const Linear& l : linears) {
    for (Pass pass : {Pass::kFwd, Pass::kDgrad, Pass::kWgrad}) {
      GemmParams p = linear_params(tokens, l.out, l.in, pass, l.gelu, false, s);
      GemmParams q = linear_params(tokens, l.out, l.in, pass, l.gelu, true, s);
      const GemmShape sh = gemm_shape(p);
      const double flop = 2.0 * double(sh.m) * double(sh.n) * double(sh.k);
      PlainMatmul plain(p);
      const double t_gemm = time_ms([&] { gemm(p, s); }, s, iters);
      const double t_plain = time_ms([&] { plain.run(s); }, s, iters);
      const double t_fp8 = time_ms([&] { gemm(q, s); }, s, iters);
      const auto tflops = [&](double ms) { return flop / (ms * 1e-3) / 1e12; };
      std::printf("%-5s %-9s %-6s %6lld %6lld %6lld %9.1f %9.1f %7.3f %9.1f %7.2f\n", model, l.name,
                  pass_names[int(pass)], (long long)sh.m, (long long)sh.n, (long long)sh.k,
                  tflops(t_gemm), tflops(t_plain), t_plain / t_gemm, tflops(t_fp8), t_gemm / t_fp8);
    }
  }
}

}  // namespace
}  // namespace helix

int main(int argc, char** argv) {
  using namespace helix;
  if (!cuda_available()) {
    std::printf("helix_bench_kernels_gemm needs a CUDA GPU: %s\n",
                cuda_unavailable_reason().c_str());
    return 0;
  }
  const int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 16384;
  const int iters = argc > 2 ? std::atoi(argv[2]) : 20;
  const Stream s = Stream::create(Device::cuda(0));
  std::printf(
      "GEMMs of one ESM-2 layer at T=%lld tokens, mean of %d runs; TFLOP/s = 2MNK/time.\n"
      "plain = one cuBLASLt call prepared up front, same types/layout/epilogue (no erf-GELU "
      "pass);\nratio = plain time / gemm() time; fp8 = gemm() with e4m3 inputs (TN layout), "
      "fp8x = bf16 time / fp8 time.\n",
      (long long)tokens, iters);
  std::printf("%-5s %-9s %-6s %6s %6s %6s %9s %9s %7s %9s %7s\n", "model", "linear", "pass", "M",
              "N", "K", "gemm()", "plain", "ratio", "fp8", "fp8x");
  bench_model("650M", 1280, 5120, tokens, iters, s);
  bench_model("3B", 2560, 10240, tokens, iters, s);
  return 0;
}

#else  // CPU-only build

int main() {
  std::printf("helix_bench_kernels_gemm needs a CUDA build (HELIX_CUDA=ON) and a GPU\n");
  return 0;
}

#endif
