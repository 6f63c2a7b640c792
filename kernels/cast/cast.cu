// CUDA casts: vectorized elementwise fp8 / bf16 / f32 casts and the tiled fp8 cast-transpose.
// Every input element is read once through a 16-byte load; outputs are written with the widest
// store their alignment allows. amax: per-thread max of |x|'s bits, warp and block reductions, one
// atomicMax per block (bit patterns of non-negative floats order like the floats).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/convert.h"
#include "core/cuda_check.h"
#include "kernels/cast/cast.h"
#include "kernels/gelu/gelu_math.h"

namespace helix {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride kernels: enough blocks to fill any GPU

// Raw storage of kBytes bytes, for one vector load or store.
template <int kBytes>
struct Raw;
template <>
struct Raw<4> {
  using T = uint32_t;
};
template <>
struct Raw<8> {
  using T = uint2;
};
template <>
struct Raw<16> {
  using T = uint4;
};
struct alignas(16) Raw32 {
  uint4 lo, hi;
};
template <>
struct Raw<32> {
  using T = Raw32;
};

// N elements of T viewed as one raw vector.
template <typename T, int N>
union Pack {
  T e[N];
  typename Raw<int(sizeof(T)) * N>::T raw;
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16_t x) { return x.to_float(); }

template <Fp8Format kFmt>
__device__ __forceinline__ uint8_t to_fp8(float x, float scale) {
  return float_to_fp8_bits(__fmul_rn(x, scale), kFmt);  // no FMA contraction: same as the CPU
}

__device__ __forceinline__ uint32_t abs_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

// Block-wide max of `bits`, then one atomicMax into *amax. Every thread of the block calls it.
__device__ void block_amax(uint32_t bits, float* amax) {
  __shared__ uint32_t warp_max[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) bits = max(bits, __shfl_xor_sync(0xFFFFFFFFu, bits, off));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_max[warp] = bits;
  __syncthreads();
  if (warp == 0) {
    bits = lane < int(blockDim.x / 32) ? warp_max[lane] : 0u;
#pragma unroll
    for (int off = 16; off > 0; off /= 2) bits = max(bits, __shfl_xor_sync(0xFFFFFFFFu, bits, off));
    if (lane == 0 && bits != 0u) atomicMax(reinterpret_cast<unsigned int*>(amax), bits);
  }
}

// out[i] = fp8(in[i] * scale). grid-stride, kThreads threads; with kAligned each thread moves
// 16 bytes of input (8 bf16 / 4 f32) per step, the scalar loop takes the tail.
template <typename In, Fp8Format kFmt, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    cast_fp8_kernel(const In* __restrict__ in, uint8_t* __restrict__ out, int64_t n,
                    const float* __restrict__ scale_ptr, float* amax) {
  constexpr int kVec = 16 / int(sizeof(In));
  const float scale = *scale_ptr;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  uint32_t local = 0;
  const int64_t nvec = kAligned ? n / kVec : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    Pack<In, kVec> x;
    x.raw = reinterpret_cast<const uint4*>(in)[v];
    Pack<uint8_t, kVec> y;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float f = to_float(x.e[j]);
      local = max(local, abs_bits(f));
      y.e[j] = to_fp8<kFmt>(f, scale);
    }
    reinterpret_cast<decltype(y.raw)*>(out)[v] = y.raw;
  }
  for (int64_t i = nvec * kVec + tid; i < n; i += stride) {
    const float f = to_float(in[i]);
    local = max(local, abs_bits(f));
    out[i] = to_fp8<kFmt>(f, scale);
  }
  if (amax) block_amax(local, amax);
}

// The value a cast-transpose casts (see CastActivation), rounded to In as the unfused op stores it.
template <typename In, CastActivation kAct>
__device__ __forceinline__ float act_value(In x, In pre) {
  if constexpr (kAct == CastActivation::kNone) {
    return to_float(x);
  } else {
    const float v = kAct == CastActivation::kGelu ? gelu_math::value(to_float(x))
                                                  : to_float(x) * gelu_math::grad(to_float(pre));
    if constexpr (sizeof(In) == 4)
      return v;
    else
      return bf16_t::from_float(v).to_float();
  }
}

// Column sums for the bias gradient: every thread holds partial sums of kCols consecutive columns
// over its rows; the kGroups threads that share those columns (row groups 0..kGroups-1) reduce
// through shared memory in group order, and threads 0..kWidth-1 write the tile's partial sums to
// ws[blockIdx.y, col0 + c]. Every thread of the block calls it.
template <int kGroups, int kWidth, int kCols>
__device__ void tile_colsum(const float (&part)[kCols], int group, int col, int64_t col0, int64_t n,
                            float* __restrict__ ws) {
  __shared__ float red[kGroups][kWidth];
#pragma unroll
  for (int j = 0; j < kCols; ++j) red[group][col + j] = part[j];
  __syncthreads();
  if (threadIdx.x < kWidth && col0 + threadIdx.x < n) {
    float sum = 0.f;
    for (int g = 0; g < kGroups; ++g) sum += red[g][threadIdx.x];
    ws[int64_t(blockIdx.y) * n + col0 + threadIdx.x] = sum;
  }
}

// dbias[c] += sum over the tile rows of ws[r, c], in a fixed order: block (32, kColsumGroups),
// one column per x; thread y adds rows y, y + kColsumGroups, ... in order (loads unrolled, so that
// several are in flight), then y == 0 adds the kColsumGroups partial sums in order. (One thread per
// column walking all rows left a 10240-column sum with 40 blocks, latency-bound.)
constexpr int kColsumGroups = 8;
__global__ void __launch_bounds__(32 * kColsumGroups)
    colsum_reduce_kernel(const float* __restrict__ ws, int64_t rows, int64_t n, float* __restrict__ dbias) {
  __shared__ float red[kColsumGroups][33];
  const int64_t c = blockIdx.x * int64_t(32) + threadIdx.x;
  float sum = 0.f;
  if (c < n) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < rows; r += kColsumGroups) sum += ws[r * n + c];
  }
  red[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float total = red[0][threadIdx.x];
#pragma unroll
    for (int g = 1; g < kColsumGroups; ++g) total += red[g][threadIdx.x];
    dbias[c] += total;
  }
}

// Tiled cast-transpose for M % 4 == 0, N % 8 == 0, 16-byte aligned pointers.
// grid (ceil(N/64), ceil(M/64)), block 256: one 64x64 tile of `in` per block.
// Load: each thread reads 16-byte vectors along a row (and of `pre` for kGeluGrad), writes fp8
// codes to `out` and into the shared tile (row stride 68 bytes). Store: each thread reads a 4x4
// byte block of the tile (four conflict-free 32-bit loads: a warp covers 8 row groups x 4 column
// groups), transposes it in registers and writes four 32-bit words of `out_t`, 8 threads per
// 32-byte output segment. With ws, the tile's column sums of the values go to ws[blockIdx.y, :].
constexpr int kTile = 64;
constexpr int kTileStride = kTile + 4;  // bytes; 17 words, odd, so the 4x4 reads spread over banks

template <typename In, Fp8Format kFmt, CastActivation kAct>
__global__ void __launch_bounds__(kThreads)
    cast_transpose_tiled_kernel(const In* __restrict__ in, const In* __restrict__ pre,
                                uint8_t* __restrict__ out, uint8_t* __restrict__ out_t, int64_t m,
                                int64_t n, const float* __restrict__ scale_ptr, float* amax,
                                float* __restrict__ ws) {
  constexpr int kVec = 16 / int(sizeof(In));
  constexpr int kThreadsPerRow = kTile / kVec;
  constexpr int kRowsPerPass = kThreads / kThreadsPerRow;
  __shared__ __align__(16) uint8_t tile[kTile * kTileStride];
  const float scale = *scale_ptr;
  const int64_t row0 = int64_t(blockIdx.y) * kTile, col0 = int64_t(blockIdx.x) * kTile;
  uint32_t local = 0;
  float part[kVec] = {};

  const int tcol = threadIdx.x % kThreadsPerRow;
  const int64_t gc = col0 + int64_t(tcol) * kVec;
  // All of the thread's loads are issued before any math (the GELU's erf/exp would otherwise
  // serialise each row's load behind the previous row's compute and stores).
  constexpr int kPasses = kTile / kRowsPerPass;
  Pack<In, kVec> x[kPasses], xp[kPasses];
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const int64_t gr = row0 + threadIdx.x / kThreadsPerRow + k * kRowsPerPass;
    if (gr < m && gc < n) {  // n % kVec == 0: the vector lies wholly inside
      x[k].raw = *reinterpret_cast<const uint4*>(in + gr * n + gc);
      if constexpr (kAct == CastActivation::kGeluGrad) xp[k].raw = *reinterpret_cast<const uint4*>(pre + gr * n + gc);
    }
  }
#pragma unroll
  for (int k = 0; k < kPasses; ++k) {
    const int r = threadIdx.x / kThreadsPerRow + k * kRowsPerPass;
    const int64_t gr = row0 + r;
    if (gr < m && gc < n) {
      Pack<uint8_t, kVec> y;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float f = act_value<In, kAct>(x[k].e[j], kAct == CastActivation::kGeluGrad ? xp[k].e[j] : x[k].e[j]);
        local = max(local, abs_bits(f));
        part[j] += f;
        y.e[j] = to_fp8<kFmt>(f, scale);
      }
      *reinterpret_cast<decltype(y.raw)*>(out + gr * n + gc) = y.raw;
      if (out_t != nullptr) {
        const uint32_t* words = reinterpret_cast<const uint32_t*>(y.e);
        uint32_t* dst = reinterpret_cast<uint32_t*>(tile + r * kTileStride + tcol * kVec);
#pragma unroll
        for (int w = 0; w < kVec / 4; ++w) dst[w] = words[w];
      }
    }
  }
  if (ws != nullptr)  // block-uniform: every thread takes part
    tile_colsum<kRowsPerPass, kTile, kVec>(part, threadIdx.x / kThreadsPerRow, tcol * kVec, col0, n, ws);
  if (out_t == nullptr) {  // block-uniform: no transpose wanted
    if (amax) block_amax(local, amax);
    return;
  }
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int q = lane % 8 + 8 * (warp % 2);  // input rows 4q .. 4q+3 of the tile
  const int p = lane / 8 + 4 * (warp / 2);  // input cols 4p .. 4p+3 of the tile
  const int64_t in_row = row0 + 4 * q;      // = column of out_t
  if (in_row < m) {                         // m % 4 == 0: all four rows inside
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = *reinterpret_cast<const uint32_t*>(tile + (4 * q + i) * kTileStride + 4 * p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t in_col = col0 + 4 * p + j;  // = row of out_t
      if (in_col < n) {
        const uint32_t t = ((w[0] >> (8 * j)) & 0xFFu) | (((w[1] >> (8 * j)) & 0xFFu) << 8) |
                           (((w[2] >> (8 * j)) & 0xFFu) << 16) |
                           (((w[3] >> (8 * j)) & 0xFFu) << 24);
        *reinterpret_cast<uint32_t*>(out_t + in_col * m + in_row) = t;
      }
    }
  }
  if (amax) block_amax(local, amax);
}

// Any shape, any alignment: 32x32 tiles, block (32, 8), scalar accesses (coalesced along the
// row of `in` when loading and along the row of `out_t` when storing).
template <typename In, Fp8Format kFmt, CastActivation kAct>
__global__ void __launch_bounds__(kThreads)
    cast_transpose_generic_kernel(const In* __restrict__ in, const In* __restrict__ pre,
                                  uint8_t* __restrict__ out, uint8_t* __restrict__ out_t, int64_t m,
                                  int64_t n, const float* __restrict__ scale_ptr, float* amax,
                                  float* __restrict__ ws) {
  __shared__ uint8_t tile[32][33];
  const float scale = *scale_ptr;
  const int64_t row0 = int64_t(blockIdx.y) * 32, col0 = int64_t(blockIdx.x) * 32;
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  uint32_t local = 0;
  float part[1] = {0.f};
  for (int r = ty; r < 32; r += kThreads / 32) {
    const int64_t gr = row0 + r, gc = col0 + tx;
    if (gr < m && gc < n) {
      const In x = in[gr * n + gc];
      const float f = act_value<In, kAct>(x, kAct == CastActivation::kGeluGrad ? pre[gr * n + gc] : x);
      local = max(local, abs_bits(f));
      part[0] += f;
      const uint8_t code = to_fp8<kFmt>(f, scale);
      out[gr * n + gc] = code;
      tile[r][tx] = code;
    }
  }
  if (ws != nullptr) tile_colsum<kThreads / 32, 32, 1>(part, ty, tx, col0, n, ws);
  __syncthreads();
  for (int r = ty; r < 32 && out_t != nullptr; r += kThreads / 32) {
    const int64_t in_col = col0 + r, in_row = row0 + tx;
    if (in_col < n && in_row < m) out_t[in_col * m + in_row] = tile[tx][r];
  }
  if (amax) block_amax(local, amax);
}

// out[i] = Out(in[i]) between f32 and bf16; grid-stride, each thread moves 16 bytes of input.
template <typename In, typename Out, bool kAligned>
__global__ void __launch_bounds__(kThreads)
    cast_kernel(const In* __restrict__ in, Out* __restrict__ out, int64_t n) {
  constexpr int kVec = 16 / int(sizeof(In));
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t nvec = kAligned ? n / kVec : 0;
  for (int64_t v = tid; v < nvec; v += stride) {
    Pack<In, kVec> x;
    x.raw = reinterpret_cast<const uint4*>(in)[v];
    Pack<Out, kVec> y;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if constexpr (sizeof(Out) == 4)
        y.e[j] = to_float(x.e[j]);
      else
        y.e[j] = bf16_t::from_float(x.e[j]);
    }
    reinterpret_cast<decltype(y.raw)*>(out)[v] = y.raw;
  }
  for (int64_t i = nvec * kVec + tid; i < n; i += stride) {
    if constexpr (sizeof(Out) == 4)
      out[i] = to_float(in[i]);
    else
      out[i] = bf16_t::from_float(in[i]);
  }
}

// ---- launch helpers ----------------------------------------------------------------------------

cudaStream_t cuda_stream(const Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

unsigned grid_for(int64_t work_items) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((work_items + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

float* amax_ptr(const Tensor& amax) { return amax.defined() ? amax.data<float>() : nullptr; }
uint8_t* fp8_ptr(const Tensor& t) { return t.defined() ? static_cast<uint8_t*>(t.data_ptr()) : nullptr; }

template <typename In, Fp8Format kFmt>
void launch_cast_fp8(const CastFp8Params& p, cudaStream_t st) {
  constexpr int kVec = 16 / int(sizeof(In));
  const int64_t n = p.in.numel();
  const In* in = p.in.data<In>();
  uint8_t* out = fp8_ptr(p.out);
  const float* scale = p.scale.data<float>();
  if (aligned(in, 16) && aligned(out, kVec)) {
    cast_fp8_kernel<In, kFmt, true>
        <<<grid_for(n / kVec + 1), kThreads, 0, st>>>(in, out, n, scale, amax_ptr(p.amax));
  } else {
    cast_fp8_kernel<In, kFmt, false>
        <<<grid_for(n), kThreads, 0, st>>>(in, out, n, scale, amax_ptr(p.amax));
  }
  HELIX_LAUNCH_CHECK();
}

template <typename In, Fp8Format kFmt, CastActivation kAct>
void launch_cast_transpose(const CastTransposeFp8Params& p, const Stream& stream) {
  const cudaStream_t st = cuda_stream(stream);
  const int64_t m = p.in.dim(0), n = p.in.dim(1);
  const In* in = p.in.data<In>();
  const In* pre = p.pre.defined() ? p.pre.data<In>() : nullptr;
  uint8_t* out = fp8_ptr(p.out);
  uint8_t* out_t = fp8_ptr(p.out_t);
  const float* scale = p.scale.data<float>();
  const bool tiled = m % 4 == 0 && n % 8 == 0 && aligned(in, 16) && aligned(out, 16) && aligned(out_t, 16) &&
                     (pre == nullptr || aligned(pre, 16));
  const int64_t tile = tiled ? kTile : 32;
  const int64_t gx = (n + tile - 1) / tile, gy = (m + tile - 1) / tile;
  HELIX_CHECK(gx <= INT32_MAX && gy <= 65535, "cast_transpose_fp8: [{}, {}] is too large", m, n);
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  // Per-tile-row partial column sums of the bias gradient, reduced in order by a second kernel.
  Tensor ws;
  if (p.dbias.defined()) ws = Tensor::empty({gy, n}, DType::kF32, p.in.device(), stream);
  float* wsp = ws.defined() ? ws.data<float>() : nullptr;
  if (tiled) {
    cast_transpose_tiled_kernel<In, kFmt, kAct>
        <<<grid, kThreads, 0, st>>>(in, pre, out, out_t, m, n, scale, amax_ptr(p.amax), wsp);
  } else {
    cast_transpose_generic_kernel<In, kFmt, kAct>
        <<<grid, kThreads, 0, st>>>(in, pre, out, out_t, m, n, scale, amax_ptr(p.amax), wsp);
  }
  HELIX_LAUNCH_CHECK();
  if (wsp != nullptr) {
    colsum_reduce_kernel<<<static_cast<unsigned>((n + 31) / 32), dim3(32, kColsumGroups), 0, st>>>(
        wsp, gy, n, p.dbias.data<float>());
    HELIX_LAUNCH_CHECK();
  }
}

template <typename In, Fp8Format kFmt>
void launch_cast_transpose_act(const CastTransposeFp8Params& p, const Stream& stream) {
  switch (p.act) {
    case CastActivation::kNone:
      return launch_cast_transpose<In, kFmt, CastActivation::kNone>(p, stream);
    case CastActivation::kGelu:
      return launch_cast_transpose<In, kFmt, CastActivation::kGelu>(p, stream);
    case CastActivation::kGeluGrad:
      return launch_cast_transpose<In, kFmt, CastActivation::kGeluGrad>(p, stream);
  }
}

template <typename In, typename Out>
void launch_cast(const CastParams& p, cudaStream_t st) {
  constexpr int kVec = 16 / int(sizeof(In));
  const int64_t n = p.in.numel();
  const In* in = p.in.data<In>();
  Out* out = p.out.data<Out>();
  if (aligned(in, 16) && aligned(out, 16)) {
    cast_kernel<In, Out, true><<<grid_for(n / kVec + 1), kThreads, 0, st>>>(in, out, n);
  } else {
    cast_kernel<In, Out, false><<<grid_for(n), kThreads, 0, st>>>(in, out, n);
  }
  HELIX_LAUNCH_CHECK();
}

}  // namespace

void detail::cast_fp8_cuda(const CastFp8Params& p, const Stream& stream) {
  if (p.in.numel() == 0) return;
  const cudaStream_t st = cuda_stream(stream);
  const bool bf16 = p.in.dtype() == DType::kBF16;
  if (p.out.dtype() == DType::kE4M3) {
    bf16 ? launch_cast_fp8<bf16_t, Fp8Format::kE4M3>(p, st)
         : launch_cast_fp8<float, Fp8Format::kE4M3>(p, st);
  } else {
    bf16 ? launch_cast_fp8<bf16_t, Fp8Format::kE5M2>(p, st)
         : launch_cast_fp8<float, Fp8Format::kE5M2>(p, st);
  }
}

void detail::cast_transpose_fp8_cuda(const CastTransposeFp8Params& p, const Stream& stream) {
  if (p.in.numel() == 0) return;
  const bool bf16 = p.in.dtype() == DType::kBF16;
  if (p.out.dtype() == DType::kE4M3) {
    bf16 ? launch_cast_transpose_act<bf16_t, Fp8Format::kE4M3>(p, stream)
         : launch_cast_transpose_act<float, Fp8Format::kE4M3>(p, stream);
  } else {
    bf16 ? launch_cast_transpose_act<bf16_t, Fp8Format::kE5M2>(p, stream)
         : launch_cast_transpose_act<float, Fp8Format::kE5M2>(p, stream);
  }
}

void detail::cast_cuda(const CastParams& p, const Stream& stream) {
  if (p.in.numel() == 0) return;
  const cudaStream_t st = cuda_stream(stream);
  if (p.in.dtype() == DType::kF32) {
    launch_cast<float, bf16_t>(p, st);
  } else {
    launch_cast<bf16_t, float>(p, st);
  }
}

}  // namespace helix
