// cuBLASLt implementation of gemm() plus the erf-GELU pass of kBiasGelu and the column sums that
// give an f32 GEMM its bias gradient.
// Row-major C[M,N] = op(A) op(B) is column-major C^T[N,M] = op(B)^T op(A)^T, so cuBLASLt sees
// A' = b, B' = a, m' = N, n' = M, and a row-major operand's op is its column-major op unchanged
// (a stored [r, c] row-major is a [c, r] column-major matrix, i.e. already transposed).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "core/convert.h"
#include "core/cuda_check.h"
#include "kernels/gemm/gemm.h"

namespace helix {
namespace {

// ---- device kernels ----------------------------------------------------------------------------

__device__ __forceinline__ float gelu_erf(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f));
}

// out[i] = gelu(in[i]). grid-stride, 256 threads; each thread handles 16-byte vectors
// (8 bf16 or 4 f32); `aligned` selects vector or scalar access (the launcher checks alignment).
template <typename T>
__global__ void gelu_erf_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t n,
                                bool aligned) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = aligned ? n / kVec : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    union {
      uint4 raw;
      T e[kVec];
    } x;
    x.raw = reinterpret_cast<const uint4*>(in)[v];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if constexpr (sizeof(T) == 4) {
        x.e[j] = gelu_erf(x.e[j]);
      } else {
        x.e[j] = T::from_float(gelu_erf(x.e[j].to_float()));
      }
    }
    reinterpret_cast<uint4*>(out)[v] = x.raw;
  }
  for (int64_t i = nvec * kVec + tid; i < n; i += stride) {
    if constexpr (sizeof(T) == 4) {
      out[i] = gelu_erf(in[i]);
    } else {
      out[i] = T::from_float(gelu_erf(in[i].to_float()));
    }
  }
}

// out[c] = sum over r of x[r, c], x row-major [rows, cols] f32: the bias gradient of an f32 GEMM
// (the stored a [K, M] or b [K, N]). grid (ceil(cols / 32)), block (32, 16): threadIdx.x picks the
// column (a warp reads 32 consecutive floats of a row), threadIdx.y strides over the rows; each
// thread sums in double, and the 16 partials of a column meet in shared memory in a fixed order,
// so the result is deterministic.
constexpr int kColSumX = 32, kColSumY = 16;
__global__ void column_sum_kernel(const float* __restrict__ x, float* __restrict__ out,
                                  int64_t rows, int64_t cols) {
  __shared__ double partial[kColSumY][kColSumX];
  const int64_t c = int64_t(blockIdx.x) * kColSumX + threadIdx.x;
  double acc = 0.0;
  if (c < cols) {
    for (int64_t r = threadIdx.y; r < rows; r += kColSumY) acc += x[r * cols + c];
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    double sum = 0.0;
#pragma unroll
    for (int y = 0; y < kColSumY; ++y) sum += partial[y][threadIdx.x];
    out[c] = static_cast<float>(sum);
  }
}

// ---- cuBLASLt plumbing -------------------------------------------------------------------------

constexpr size_t kWorkspaceBytes = size_t(32) << 20;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride kernels: enough blocks to fill any GPU

cudaDataType_t cuda_dtype(DType t) {
  switch (t) {
    case DType::kF32:
      return CUDA_R_32F;
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kE4M3:
      return CUDA_R_8F_E4M3;
    case DType::kE5M2:
      return CUDA_R_8F_E5M2;
    default:
      HELIX_FAIL("gemm: no cuBLASLt type for {}", dtype_name(t));
  }
}

// Makes `device` current for the scope (cuBLASLt and cudaMalloc act on the current device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

struct AlgoKey {
  int device;
  int64_t m, n, k;  // column-major problem (N, M, K of the row-major one)
  DType a, b, c, bias;
  GemmOp op_a, op_b;
  GemmEpilogue epilogue;
  bool beta_nonzero;
  bool amax;  // AMAX_D requested (narrows the algorithms)
  Fp8Accumulation accumulation;
  auto operator<=>(const AlgoKey&) const = default;
};

// Process-wide cuBLASLt state: one handle per device, one workspace per (device, stream), the
// heuristic's algorithm per problem. Handles and workspaces live until the process exits (freeing
// them from static destructors would race the CUDA runtime's own teardown).
class LtState {
 public:
  static LtState& get() {
    static LtState* state = new LtState();  // never destroyed, see above
    return *state;
  }

  cublasLtHandle_t handle(int device) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = handles_.find(device);
    if (it != handles_.end()) return it->second;
    cublasLtHandle_t h;
    CUBLAS_CHECK(cublasLtCreate(&h));
    handles_.emplace(device, h);
    return h;
  }

  void* workspace(int device, void* stream) {
    std::lock_guard<std::mutex> lock(mu_);
    const auto key = std::make_pair(device, stream);
    auto it = workspaces_.find(key);
    if (it != workspaces_.end()) return it->second;
    void* ws = nullptr;
    CUDA_CHECK(cudaMalloc(&ws, kWorkspaceBytes));
    workspaces_.emplace(key, ws);
    return ws;
  }

  bool find_algo(const AlgoKey& key, cublasLtMatmulAlgo_t* algo) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = algos_.find(key);
    if (it == algos_.end()) return false;
    *algo = it->second;
    return true;
  }
  void store_algo(const AlgoKey& key, const cublasLtMatmulAlgo_t& algo) {
    std::lock_guard<std::mutex> lock(mu_);
    algos_.emplace(key, algo);
  }

 private:
  std::mutex mu_;
  std::map<int, cublasLtHandle_t> handles_;
  std::map<std::pair<int, void*>, void*> workspaces_;
  std::map<AlgoKey, cublasLtMatmulAlgo_t> algos_;
};

// RAII owners of the per-call descriptors (cheap host objects; only the algorithm is cached).
// Compute type CUBLAS_COMPUTE_32F for every dtype: with f32 operands that is true fp32 math
// (TF32 would need CUBLAS_COMPUTE_32F_FAST_TF32, which helix never asks for).
struct MatmulDesc {
  cublasLtMatmulDesc_t d = nullptr;
  MatmulDesc() { CUBLAS_CHECK(cublasLtMatmulDescCreate(&d, CUBLAS_COMPUTE_32F, CUDA_R_32F)); }
  ~MatmulDesc() { cublasLtMatmulDescDestroy(d); }
  template <typename T>
  void set(cublasLtMatmulDescAttributes_t attr, const T& value) {
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(d, attr, &value, sizeof(value)));
  }
};
struct Layout {
  cublasLtMatrixLayout_t d = nullptr;
  Layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
    CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d, type, static_cast<uint64_t>(rows),
                                            static_cast<uint64_t>(cols), ld));
  }
  ~Layout() { cublasLtMatrixLayoutDestroy(d); }
};
struct Preference {
  cublasLtMatmulPreference_t d = nullptr;
  Preference() { CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&d)); }
  ~Preference() { cublasLtMatmulPreferenceDestroy(d); }
  template <typename T>
  void set(cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
    CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(d, attr, &value, sizeof(value)));
  }
};

void check_aligned(const Tensor& t, const char* name) {
  if (!t.defined()) return;
  const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
  HELIX_CHECK(addr % 16 == 0, "gemm: expected {} 16-byte aligned (cuBLASLt), got address {} ({})",
              name, addr, t.str());
}

}  // namespace

void detail::gelu_erf_cuda(const Tensor& in, const Tensor& out, const Stream& stream) {
  HELIX_CHECK(
      in.is_cuda() && out.is_cuda() && in.dtype() == out.dtype() && in.numel() == out.numel(),
      "gelu_erf_cuda: expected two CUDA tensors of one dtype and size, got {} and {}", in.str(),
      out.str());
  const int64_t n = in.numel();
  if (n == 0) return;
  const bool aligned = reinterpret_cast<uintptr_t>(in.data_ptr()) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  const int64_t per_block = 256 * (aligned ? int64_t(16 / dtype_size(in.dtype())) : 1);
  const int64_t blocks = std::min<int64_t>((n + per_block - 1) / per_block, kMaxBlocks);
  auto st = static_cast<cudaStream_t>(stream.handle());
  if (in.dtype() == DType::kF32) {
    gelu_erf_kernel<float><<<static_cast<unsigned>(blocks), 256, 0, st>>>(
        in.data<float>(), out.data<float>(), n, aligned);
  } else if (in.dtype() == DType::kBF16) {
    gelu_erf_kernel<bf16_t><<<static_cast<unsigned>(blocks), 256, 0, st>>>(
        in.data<bf16_t>(), out.data<bf16_t>(), n, aligned);
  } else {
    HELIX_FAIL("gelu_erf_cuda: expected bf16 or f32, got {}", in.str());
  }
  HELIX_LAUNCH_CHECK();
}

namespace {

void column_sum_cuda(const Tensor& x, const Tensor& out, const Stream& stream) {
  HELIX_CHECK(x.is_cuda() && out.is_cuda() && x.dtype() == DType::kF32 &&
                  out.dtype() == DType::kF32 && x.ndim() == 2 && out.numel() == x.dim(1),
              "gemm: column sums: expected f32 x [R, C] and f32 out [C] on CUDA, got {} and {}",
              x.str(), out.str());
  const int64_t rows = x.dim(0), cols = x.dim(1);
  const dim3 grid(static_cast<unsigned>((cols + kColSumX - 1) / kColSumX));
  const dim3 block(kColSumX, kColSumY);
  column_sum_kernel<<<grid, block, 0, static_cast<cudaStream_t>(stream.handle())>>>(
      x.data<float>(), out.data<float>(), rows, cols);
  HELIX_LAUNCH_CHECK();
}

}  // namespace

void detail::gemm_cuda(const GemmParams& p, GemmShape s, const Stream& stream) {
  const int device = p.c.device().index;
  DeviceGuard guard(device);
  for (const auto& [t, name] : {std::pair{&p.a, "a"},
                                {&p.b, "b"},
                                {&p.c, "c"},
                                {&p.bias, "bias"},
                                {&p.pre_gelu, "pre_gelu"},
                                {&p.bias_grad, "bias_grad"}}) {
    check_aligned(*t, name);
  }
  const bool fp8 = dtype_is_fp8(p.a.dtype());
  const bool fp8_out = dtype_is_fp8(p.c.dtype());
  const bool gelu = p.epilogue == GemmEpilogue::kBiasGelu;
  // f32 inputs: the bias gradient comes from column_sum_cuda after the GEMM, not from BGRAD.
  const bool grad_epilogue =
      p.epilogue == GemmEpilogue::kBiasGradA || p.epilogue == GemmEpilogue::kBiasGradB;
  const bool separate_bias_grad = grad_epilogue && p.a.dtype() == DType::kF32;
  const GemmEpilogue lt_epilogue = separate_bias_grad ? GemmEpilogue::kNone : p.epilogue;
  // kBiasGelu: cuBLASLt writes the pre-activation (bias epilogue) into pre_gelu, GELU follows.
  const Tensor& d = gelu ? p.pre_gelu : p.c;

  // Column-major problem: m' = N, n' = M; A' = b, B' = a.
  const int64_t cm = s.n, cn = s.m, ck = s.k;
  const cublasOperation_t trans_a = p.op_b == GemmOp::kNone ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasOperation_t trans_b = p.op_a == GemmOp::kNone ? CUBLAS_OP_N : CUBLAS_OP_T;
  Layout a_desc(cuda_dtype(p.b.dtype()), trans_a == CUBLAS_OP_N ? cm : ck,
                trans_a == CUBLAS_OP_N ? ck : cm, p.b.dim(1));
  Layout b_desc(cuda_dtype(p.a.dtype()), trans_b == CUBLAS_OP_N ? ck : cn,
                trans_b == CUBLAS_OP_N ? cn : ck, p.a.dim(1));
  // An fp8 D takes a bf16 C descriptor (cuBLASLt: C type = bias type); beta is 0 there.
  const DType c_type = fp8_out ? DType::kBF16 : d.dtype();
  Layout c_desc(cuda_dtype(c_type), cm, cn, cm);
  Layout d_desc(cuda_dtype(d.dtype()), cm, cn, cm);

  MatmulDesc desc;
  desc.set(CUBLASLT_MATMUL_DESC_TRANSA, trans_a);
  desc.set(CUBLASLT_MATMUL_DESC_TRANSB, trans_b);
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias_ptr = nullptr;
  switch (lt_epilogue) {
    case GemmEpilogue::kNone:
      break;
    case GemmEpilogue::kBias:
    case GemmEpilogue::kBiasGelu:
      epilogue = CUBLASLT_EPILOGUE_BIAS;
      bias_ptr = p.bias.data_ptr();
      desc.set(CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, cuda_dtype(p.bias.dtype()));
      break;
    case GemmEpilogue::kBiasGradA:  // reduces row-major a = column-major B'
      epilogue = CUBLASLT_EPILOGUE_BGRADB;
      bias_ptr = p.bias_grad.data_ptr();
      break;
    case GemmEpilogue::kBiasGradB:  // reduces row-major b = column-major A'
      epilogue = CUBLASLT_EPILOGUE_BGRADA;
      bias_ptr = p.bias_grad.data_ptr();
      break;
  }
  desc.set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  if (bias_ptr) desc.set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias_ptr);
  // cuBLASLt 13.1 refuses every FP8 algorithm (NOT_SUPPORTED at cublasLtMatmul) when a scale
  // pointer is only 4-byte aligned, as views into the FP8 manager's flat buffer are: such scales are
  // copied to a 16-byte aligned scratch first (stream-ordered, freed after the launch).
  Tensor a_scale = p.a_scale_inv, b_scale = p.b_scale_inv;
  const auto aligned_scale = [&](const Tensor& t) {
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) return t;
    Tensor c = Tensor::empty(Shape{1}, DType::kF32, p.c.device(), stream);
    c.copy_from(t.view(Shape{1}), stream);
    return c;
  };
  if (fp8) {
    a_scale = aligned_scale(a_scale);
    b_scale = aligned_scale(b_scale);
    desc.set(CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, static_cast<const void*>(b_scale.data_ptr()));
    desc.set(CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, static_cast<const void*>(a_scale.data_ptr()));
    const int8_t fast = p.fp8_accumulation == Fp8Accumulation::kFast ? 1 : 0;
    desc.set(CUBLASLT_MATMUL_DESC_FAST_ACCUM, fast);
    if (fp8_out) {
      desc.set(CUBLASLT_MATMUL_DESC_D_SCALE_POINTER,
               static_cast<const void*>(p.c_scale.data_ptr()));
      if (p.c_amax.defined()) desc.set(CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, p.c_amax.data_ptr());
    }
  }

  LtState& lt = LtState::get();
  cublasLtHandle_t handle = lt.handle(device);
  void* workspace = lt.workspace(device, stream.handle());
  const AlgoKey key{device,
                    cm,
                    cn,
                    ck,
                    p.b.dtype(),
                    p.a.dtype(),
                    d.dtype(),
                    p.bias.defined() ? p.bias.dtype() : DType::kU8,
                    p.op_a,
                    p.op_b,
                    lt_epilogue,
                    p.beta != 0.0f,
                    p.c_amax.defined(),
                    fp8 ? p.fp8_accumulation : Fp8Accumulation::kPrecise};
  const float alpha = p.alpha, beta = p.beta;
  const void* c_ptr = fp8_out ? nullptr : d.data_ptr();
  const auto matmul = [&](const cublasLtMatmulAlgo_t& a) {
    return cublasLtMatmul(handle, desc.d, &alpha, p.b.data_ptr(), a_desc.d, p.a.data_ptr(), b_desc.d, &beta,
                          c_ptr, c_desc.d, d.data_ptr(), d_desc.d, &a, workspace, kWorkspaceBytes,
                          static_cast<cudaStream_t>(stream.handle()));
  };
  cublasLtMatmulAlgo_t algo;
  if (lt.find_algo(key, &algo)) {
    CUBLAS_CHECK(matmul(algo));
  } else {
    Preference pref;
    pref.set(CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kWorkspaceBytes);
    // Every pointer is checked to be 16-byte aligned, so the algorithm is valid for any call of
    // this key, not only for this call's pointers.
    const uint32_t align = 16;
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align);
    pref.set(CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align);
    // Several candidates in heuristic order: cuBLASLt 13.1 has been seen to return an FP8 algorithm
    // (small M/N/K, bias epilogue, a cluster shape) that cublasLtMatmul then refuses with
    // NOT_SUPPORTED; the first candidate that runs is cached for the key.
    constexpr int kCandidates = 8;
    cublasLtMatmulHeuristicResult_t results[kCandidates] = {};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
        handle, desc.d, a_desc.d, b_desc.d, c_desc.d, d_desc.d, pref.d, kCandidates, results, &found);
    HELIX_CHECK(status == CUBLAS_STATUS_SUCCESS && found > 0,
                "gemm: cuBLASLt has no algorithm ({}) for M={} N={} K={}, a {} b {} c {}, op_a={} "
                "op_b={}, epilogue {} (0 none, 1 bias, 2 bias+gelu, 3 bgrad-a, 4 bgrad-b)",
                cublasLtGetStatusName(status), s.m, s.n, s.k, dtype_name(p.a.dtype()),
                dtype_name(p.b.dtype()), dtype_name(p.c.dtype()),
                p.op_a == GemmOp::kNone ? "kNone" : "kTranspose",
                p.op_b == GemmOp::kNone ? "kNone" : "kTranspose", int(lt_epilogue));
    cublasStatus_t run = CUBLAS_STATUS_NOT_SUPPORTED;
    for (int i = 0; i < found && run == CUBLAS_STATUS_NOT_SUPPORTED; ++i) {
      run = matmul(results[i].algo);
      if (run == CUBLAS_STATUS_SUCCESS) lt.store_algo(key, results[i].algo);
    }
    HELIX_CHECK(run == CUBLAS_STATUS_SUCCESS,
                "gemm: cuBLASLt refused all {} candidate algorithms ({}) for M={} N={} K={}, a {} b {} c {}",
                found, cublasLtGetStatusName(run), s.m, s.n, s.k, dtype_name(p.a.dtype()),
                dtype_name(p.b.dtype()), dtype_name(p.c.dtype()));
  }
  if (gelu) gelu_erf_cuda(p.pre_gelu, p.c, stream);
  if (separate_bias_grad) {
    // kBiasGradA: a stored [K, M] (op_a = kTranspose); kBiasGradB: b stored [K, N] (op_b = kNone).
    column_sum_cuda(p.epilogue == GemmEpilogue::kBiasGradA ? p.a : p.b, p.bias_grad, stream);
  }
}

}  // namespace helix
