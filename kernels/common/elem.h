#pragma once
// Element access shared by the elementwise and row-wise ops (layernorm, gelu, rotary, embedding):
// float views of the storage types, the ordered bits used for amax, dtype dispatch to C++ types,
// and (CUDA only) N-element packed loads and stores that compile to one 16-byte access where
// aligned. The same helpers serve the CPU references and the kernels, so both round identically.
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>

#include "core/convert.h"
#if defined(__CUDACC__)
#include "core/cuda_check.h"
#endif
#include "core/dtype.h"
#include "core/error.h"

namespace helix::elem {

template <typename T>
HELIX_HD float to_float(T v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return v.to_float();
}
template <typename T>
HELIX_HD T from_float(float v) {
  if constexpr (std::is_same_v<T, float>)
    return v;
  else
    return T::from_float(v);
}
template <typename T>
inline constexpr bool kIsFp8 = std::is_same_v<T, e4m3_t> || std::is_same_v<T, e5m2_t>;

// |v| as bits: for non-negative floats the unsigned order is the float order, and NaN (0x7FC00000
// and up) sorts above +inf, so a max over these bits propagates NaN; on CUDA one atomicMax on them
// merges blocks in any order with the same result.
HELIX_HD uint32_t abs_bits(float v) { return float_bits(v) & 0x7FFFFFFFu; }

// Calls f(T{}) for the C++ type of an f32 or bf16 dtype; other dtypes throw naming op and input.
template <typename F>
void visit_f32_bf16(DType t, const char* op, const char* what, F&& f) {
  switch (t) {
    case DType::kF32:
      f(float{});
      return;
    case DType::kBF16:
      f(bf16_t{});
      return;
    default:
      HELIX_FAIL("{}: expected {} f32 or bf16, got {}", op, what, dtype_name(t));
  }
}
// Same for an output that may also be fp8 (e4m3, e5m2).
template <typename F>
void visit_output(DType t, const char* op, const char* what, F&& f) {
  switch (t) {
    case DType::kF32:
      f(float{});
      return;
    case DType::kBF16:
      f(bf16_t{});
      return;
    case DType::kE4M3:
      f(e4m3_t{});
      return;
    case DType::kE5M2:
      f(e5m2_t{});
      return;
    default:
      HELIX_FAIL("{}: expected {} f32, bf16, e4m3 or e5m2, got {}", op, what, dtype_name(t));
  }
}

#if defined(__CUDACC__)
// Multiprocessors of a device (sizes grid-stride launches).
inline int sm_count(int device) {
  int n = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

// Blocks of `kernel` resident per multiprocessor with `threads` threads and `smem` bytes of dynamic
// shared memory on the current device; raises the kernel's dynamic shared-memory limit to `smem`
// first where needed (the limit only ever grows, so an earlier answer stays valid). Cached per
// (kernel, device, threads, smem): the runtime calls cost microseconds, and the launchers that use
// this run a few hundred times a training step.
inline int resident_blocks(const void* kernel, int threads, int smem) {
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int>, int> cache;
  static std::map<std::pair<const void*, int>, int> smem_limit;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, dev, threads, smem);
  if (const auto it = cache.find(key); it != cache.end()) return it->second;
  int& limit = smem_limit[{kernel, dev}];
  if (smem > limit) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    limit = smem;
  }
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  cache.emplace(key, per_sm);
  return per_sm;
}

// N consecutive elements moved as one aligned access (16 bytes for 8 bf16 or 4 f32).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
template <int N, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int e = 0; e < N; ++e) out[e] = to_float(pk.v[e]);
}
template <int N, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int e = 0; e < N; ++e) pk.v[e] = from_float<T>(in[e]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Max of amax bits over a block (a multiple of 32 threads, at most 1024), then one atomicMax into
// *out.
// `red` is 32 words of shared memory. Called uniformly by the whole block.
__device__ __forceinline__ void block_amax(unsigned v, unsigned* red, unsigned* out) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xFFFFFFFFu, v, o));
  const int lin = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y * blockDim.z;
  if ((lin & 31) == 0) red[lin >> 5] = v;
  __syncthreads();
  if (lin == 0) {
    unsigned m = 0;
    for (int w = 0; w < nthreads / 32; ++w) m = max(m, red[w]);
    atomicMax(out, m);
  }
}
#endif

}  // namespace helix::elem
