// LayerNorm CUDA kernels. Forward: one row per group of threads_per_row threads (a multiple of 32),
// the row in registers, 16-byte loads when C and the pointers allow, fp8 output with amax.
// Backward: dx per row, and dgamma/dbeta without float atomics: every row slice writes its column
// sums to its own partial row, and a second kernel adds the partial rows in a fixed order.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "core/cuda_check.h"
#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/layernorm/layernorm.h"

namespace helix {
namespace {

using elem::from_float;
using elem::load_floats;
using elem::Pack;
using elem::store_floats;
using elem::to_float;

// Row elements one thread holds in registers (the backward also keeps column partial sums, so it
// spreads a row over more threads). Rows take at most kMaxRowThreads threads, so C <= kMaxCols; the
// kernels are compiled for blocks of kMaxRowThreads (at most 128 registers a thread, no launch
// failure for any C up to the limit).
constexpr int kFwdElemsPerThread = 32;
constexpr int kBwdElemsPerThread = 16;
constexpr int kMaxRowThreads = 512;
constexpr int kMaxCols = kMaxRowThreads * kBwdElemsPerThread;  // 8192

constexpr int kRowsPerBlockMax = 8;  // 256 threads / 32 threads per row
// Backward partial rows (row slices): enough slices to fill the GPU, few enough that the second
// pass stays short, at most 16 MiB per parameter. A function of C only, never of the device.
constexpr int64_t kMaxPartialRows = 2048;
constexpr int64_t kMaxPartialFloats = int64_t{1} << 22;

// Sum of v over the blockDim.x threads of this thread's row (all of them get the same bits: the xor
// butterfly pairs commute and the per-warp sums are added in warp order). `red` holds 32 slots per
// row of the block. Called uniformly by the whole block.
__device__ __forceinline__ float2 row_sum(float2 v, float2* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xFFFFFFFFu, v.x, o);
    v.y += __shfl_xor_sync(0xFFFFFFFFu, v.y, o);
  }
  if (blockDim.x == 32) return v;
  float2* r = red + threadIdx.y * 32;
  __syncthreads();  // the previous call's reads of `red` are done
  if ((threadIdx.x & 31) == 0) r[threadIdx.x >> 5] = v;
  __syncthreads();
  float2 s = r[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) {
    s.x += r[w].x;
    s.y += r[w].y;
  }
  return s;
}

struct FwdArgs {
  const void* x;         // [T, C]
  const void* residual;  // [T, C] or null
  void* residual_out;    // [T, C] or null
  const void* gamma;     // [C]
  const void* beta;      // [C]
  void* y;               // [T, C]
  const float* scale;    // [1] or null (non-fp8 y)
  unsigned* amax;        // [1] bits of a non-negative float, or null
  float* mean;           // [T] or null
  float* rstd;           // [T] or null
  void* y_t;             // [C, T] fp8 codes (kTranspose only)
  int64_t rows;
  int cols;
  int tile_rows;         // kTranspose: rows per shared-memory tile (a multiple of 16 and of blockDim.y)
  bool vec_t;            // kTranspose: C % 4 == 0, T % 16 == 0 and y_t 16-byte aligned
  float eps;
};

// The transposed store of one tile of fp8 codes: tile [nrows][cols] bytes in shared memory (rows
// base.. of y) -> y_t[c, base + r]. Fast path (full tile, vec_t): a thread takes 4 adjacent columns
// (one conflict-free 4-byte shared load per row), regroups the bytes with byte permutes and writes
// 16 rows of each column as one 16-byte store. Otherwise one byte per thread, rows fastest.
__device__ __forceinline__ uint32_t bytes_at(uint32_t w0, uint32_t w1, uint32_t w2, uint32_t w3, int j) {
  const uint32_t lo = __byte_perm(w0, w1, static_cast<uint32_t>(j | ((4 + j) << 4)));
  const uint32_t hi = __byte_perm(w2, w3, static_cast<uint32_t>(j | ((4 + j) << 4)));
  return __byte_perm(lo, hi, 0x5410);
}

__device__ void store_tile_transposed(const unsigned char* tile, int nrows, int64_t base, const FwdArgs& a) {
  unsigned char* yt = static_cast<unsigned char*>(a.y_t);
  const int nthreads = blockDim.x * blockDim.y;
  const int lin = threadIdx.y * blockDim.x + threadIdx.x;
  if (a.vec_t && nrows == a.tile_rows) {
    for (int q = lin; q < a.cols / 4; q += nthreads) {
      for (int g = 0; g < nrows; g += 16) {
        uint32_t w[16];
#pragma unroll
        for (int r = 0; r < 16; ++r) w[r] = *reinterpret_cast<const uint32_t*>(tile + (g + r) * a.cols + 4 * q);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint4 v;
          v.x = bytes_at(w[0], w[1], w[2], w[3], j);
          v.y = bytes_at(w[4], w[5], w[6], w[7], j);
          v.z = bytes_at(w[8], w[9], w[10], w[11], j);
          v.w = bytes_at(w[12], w[13], w[14], w[15], j);
          *reinterpret_cast<uint4*>(yt + (4 * q + j) * a.rows + base + g) = v;
        }
      }
    }
    return;
  }
  for (int64_t i = lin; i < static_cast<int64_t>(nrows) * a.cols; i += nthreads) {
    const int64_t c = i / nrows, r = i - c * nrows;
    yt[c * a.rows + base + r] = tile[r * a.cols + c];
  }
}

// Grid: min(ceil(T / rows_per_block), resident blocks), each block looping over groups of
// rows_per_block rows. Block (threads_per_row, rows_per_block): thread x of a row owns the vectors
// x, x + threads_per_row, ... of kVec elements (at most kFwdElemsPerThread elements).
// kTranspose (fp8 Y): a block takes tiles of tile_rows consecutive rows (rows_per_block at a time),
// keeps the tile's codes in dynamic shared memory and writes their transpose to y_t after the tile.
template <typename X, typename W, typename Y, int kVec, bool kTranspose>
__global__ void __launch_bounds__(kMaxRowThreads) layernorm_fwd_kernel(FwdArgs a) {
  constexpr int kVecs = kFwdElemsPerThread / kVec;
  constexpr bool kFp8 = elem::kIsFp8<Y>;
  static_assert(!kTranspose || kFp8, "the transposed output is fp8 only");
  __shared__ float2 red[kRowsPerBlockMax * 32];
  __shared__ unsigned amax_red[32];
  extern __shared__ __align__(16) unsigned char ln_tile[];  // kTranspose: [tile_rows, cols] codes
  const X* x = static_cast<const X*>(a.x);
  const X* res = static_cast<const X*>(a.residual);
  X* res_out = static_cast<X*>(a.residual_out);
  const W* gamma = static_cast<const W*>(a.gamma);
  const W* beta = static_cast<const W*>(a.beta);
  Y* y = static_cast<Y*>(a.y);
  const int nvec = a.cols / kVec;
  const float scale = kFp8 ? *a.scale : 1.f;
  unsigned amax = 0;
  const int64_t per_iter = kTranspose ? a.tile_rows : blockDim.y;
  const int64_t step = static_cast<int64_t>(gridDim.x) * per_iter;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * per_iter; base < a.rows; base += step) {
    for (int sub = 0; sub < per_iter; sub += blockDim.y) {
      const int64_t row = base + sub + threadIdx.y;
      const bool active = row < a.rows;
      const int64_t off = row * a.cols;
      float v[kVecs][kVec];
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int j = threadIdx.x + i * blockDim.x;
        if (active && j < nvec) {
          load_floats(x + off + j * kVec, v[i]);
          if (res) {
            float r[kVec];
            load_floats(res + off + j * kVec, r);
#pragma unroll
            for (int e = 0; e < kVec; ++e) v[i][e] = to_float(from_float<X>(v[i][e] + r[e]));
            store_floats(res_out + off + j * kVec, v[i]);
          }
#pragma unroll
          for (int e = 0; e < kVec; ++e) sum += v[i][e];
        }
      }
      const float mean = row_sum(make_float2(sum, 0.f), red).x / a.cols;
      float sq = 0.f;
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int j = threadIdx.x + i * blockDim.x;
        if (active && j < nvec) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) sq += (v[i][e] - mean) * (v[i][e] - mean);
        }
      }
      const float rstd = 1.f / sqrtf(row_sum(make_float2(sq, 0.f), red).x / a.cols + a.eps);
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int j = threadIdx.x + i * blockDim.x;
        if (active && j < nvec) {
          float g[kVec], b[kVec];
          load_floats(gamma + j * kVec, g);
          load_floats(beta + j * kVec, b);
          Pack<Y, kVec> out;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float o = (v[i][e] - mean) * rstd * g[e] + b[e];
            amax = max(amax, elem::abs_bits(o));
            out.v[e] = from_float<Y>(kFp8 ? o * scale : o);
          }
          *reinterpret_cast<Pack<Y, kVec>*>(y + off + j * kVec) = out;
          if constexpr (kTranspose)
            *reinterpret_cast<Pack<Y, kVec>*>(ln_tile + (sub + threadIdx.y) * a.cols + j * kVec) = out;
        }
      }
      if (active && threadIdx.x == 0) {
        if (a.mean) a.mean[row] = mean;
        if (a.rstd) a.rstd[row] = rstd;
      }
    }
    if constexpr (kTranspose) {
      __syncthreads();  // the tile is complete
      store_tile_transposed(ln_tile, static_cast<int>(per_iter < a.rows - base ? per_iter : a.rows - base), base, a);
      __syncthreads();  // before the next tile overwrites it
    }
  }
  if (a.amax) elem::block_amax(amax, amax_red, a.amax);
}

// The FP8 path's LayerNorm (fp8 y, with or without the transposed y_t), for bf16 x with 16-byte
// vectors: a warp per row, the row in registers as kLaneVecs packs of 8 bf16 per lane (C <= 256 *
// kLaneVecs), so the row reductions are warp shuffles. Blocks of kWarps warps take tiles of
// kWarps * kRowsPerWarp = 16 rows; a warp issues the loads of all its rows of the tile before any math
// (kRowsPerWarp rows in flight). With y_t the codes are staged in shared memory and the transpose
// is stored after each tile; without it the warps run free of each other. (The generic
// kernel above spends a block-wide reduction per row; at C = 2560 it was slower than a LayerNorm
// plus a separate cast-transpose, and a first warp-per-row version with 8 warps and one row at a
// time reached 0.65 waves and 22% occupancy.)

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}

// The warp's rows of the tile at `base` into registers (all loads issued before any use).
template <int kWarps, int kRowsPerWarp, int kLaneVecs>
__device__ __forceinline__ void load_warp_rows(Pack<bf16_t, 8> (&xs)[kRowsPerWarp][kLaneVecs], const bf16_t* x,
                                               int64_t base, int warp, int lane, const FwdArgs& a) {
  const int nvec = a.cols / 8;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = base + warp + r * kWarps;
#pragma unroll
    for (int i = 0; i < kLaneVecs; ++i) {
      const int j = lane + 32 * i;
      if (row < a.rows && j < nvec) xs[r][i] = *reinterpret_cast<const Pack<bf16_t, 8>*>(x + row * a.cols + j * 8);
    }
  }
}

// 16 warps per SM resident at least (8-warp blocks: two, so at most 128 registers a thread).
template <typename W, typename Y, int kLaneVecs, int kRowsPerWarp, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 16 / kWarps) layernorm_fwd_fp8_t_kernel(FwdArgs a) {
  constexpr int kVec = 8;
  constexpr int kTileRows = kWarps * kRowsPerWarp;
  using XP = Pack<bf16_t, kVec>;
  __shared__ unsigned amax_red[32];
  extern __shared__ __align__(16) unsigned char ln_tile[];  // [kTileRows, cols] codes (y_t only)
  const bf16_t* x = static_cast<const bf16_t*>(a.x);
  const W* gamma = static_cast<const W*>(a.gamma);
  const W* beta = static_cast<const W*>(a.beta);
  Y* y = static_cast<Y*>(a.y);
  const bool transpose = a.y_t != nullptr;  // uniform
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nvec = a.cols / kVec;
  const float scale = *a.scale;
  unsigned amax = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kTileRows;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kTileRows; base < a.rows; base += step) {
    XP xs[kRowsPerWarp][kLaneVecs];
    load_warp_rows<kWarps>(xs, x, base, warp, lane, a);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int tr = warp + r * kWarps;
      const int64_t row = base + tr;
      if (row >= a.rows) continue;  // warp-uniform
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kLaneVecs; ++i) {
        if (lane + 32 * i < nvec) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) sum += to_float(xs[r][i].v[e]);
        }
      }
      const float mean = warp_sum(sum) / a.cols;
      float sq = 0.f;
#pragma unroll
      for (int i = 0; i < kLaneVecs; ++i) {
        if (lane + 32 * i < nvec) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float d = to_float(xs[r][i].v[e]) - mean;
            sq += d * d;
          }
        }
      }
      const float rstd = 1.f / sqrtf(warp_sum(sq) / a.cols + a.eps);
#pragma unroll
      for (int i = 0; i < kLaneVecs; ++i) {
        const int j = lane + 32 * i;
        if (j < nvec) {
          float g[kVec], b[kVec];
          load_floats(gamma + j * kVec, g);
          load_floats(beta + j * kVec, b);
          Pack<Y, kVec> out;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float o = (to_float(xs[r][i].v[e]) - mean) * rstd * g[e] + b[e];
            amax = max(amax, elem::abs_bits(o));
            out.v[e] = from_float<Y>(o * scale);
          }
          *reinterpret_cast<Pack<Y, kVec>*>(y + row * a.cols + j * kVec) = out;
          if (transpose) *reinterpret_cast<Pack<Y, kVec>*>(ln_tile + tr * a.cols + j * kVec) = out;
        }
      }
      if (lane == 0) {
        if (a.mean) a.mean[row] = mean;
        if (a.rstd) a.rstd[row] = rstd;
      }
    }
    // (Issuing the next tile's loads before this transposed store keeps the row registers live
    // through it: 600 bytes of spills at C = 2560 with 128 registers.)
    if (transpose) {
      __syncthreads();  // the tile is complete
      store_tile_transposed(ln_tile, static_cast<int>(kTileRows < a.rows - base ? kTileRows : a.rows - base), base, a);
      __syncthreads();  // before the next tile overwrites it
    }
  }
  if (a.amax) elem::block_amax(amax, amax_red, a.amax);
}

struct BwdArgs {
  const void* x;       // [T, C]
  const void* gamma;   // [C]
  const float* mean;   // [T]
  const float* rstd;   // [T]
  const void* dy;      // [T, C]
  void* dx;            // [T, C] or null
  float* dgamma_part;  // [P, C] or null
  float* dbeta_part;   // [P, C] or null
  int64_t rows;
  int cols;
  bool accumulate;
};

// Grid: G blocks (a function of T and C only), block (threads_per_row, rows_per_block). Row slice
// p = blockIdx.x * rows_per_block + threadIdx.y takes rows p, p + P, p + 2P, ... (P = G *
// rows_per_block), writes dx for each, and its column sums of dy * xhat and dy to partial row p.
// x and dy stay in registers in their storage type between the reduction and the dx pass.
template <typename X, typename W, int kVec>
__global__ void __launch_bounds__(kMaxRowThreads) layernorm_bwd_kernel(BwdArgs a) {
  constexpr int kVecs = kBwdElemsPerThread / kVec;
  __shared__ float2 red[kRowsPerBlockMax * 32];
  const X* x = static_cast<const X*>(a.x);
  const X* dy = static_cast<const X*>(a.dy);
  X* dx = static_cast<X*>(a.dx);
  const W* gamma = static_cast<const W*>(a.gamma);
  const int nvec = a.cols / kVec;
  float dg[kVecs][kVec], db[kVecs][kVec];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) dg[i][e] = db[i][e] = 0.f;
  }
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < a.rows; row0 += step) {
    const int64_t row = row0 + threadIdx.y;
    const bool active = row < a.rows;
    const int64_t off = row * a.cols;
    const float mean = active ? a.mean[row] : 0.f;
    const float rstd = active ? a.rstd[row] : 0.f;
    Pack<X, kVec> xs[kVecs], dys[kVecs], dx0[kVecs];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int j = threadIdx.x + i * blockDim.x;
      if (active && j < nvec) {
        xs[i] = *reinterpret_cast<const Pack<X, kVec>*>(x + off + j * kVec);
        dys[i] = *reinterpret_cast<const Pack<X, kVec>*>(dy + off + j * kVec);
        // The accumulated dx goes out with x and dy: its latency hides behind the row reduction.
        if (a.accumulate && dx) dx0[i] = *reinterpret_cast<const Pack<X, kVec>*>(dx + off + j * kVec);
        float g[kVec];
        load_floats(gamma + j * kVec, g);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float d = to_float(dys[i].v[e]);
          const float xh = (to_float(xs[i].v[e]) - mean) * rstd;
          const float gd = d * g[e];
          s1 += gd;
          s2 += gd * xh;
          dg[i][e] += d * xh;
          db[i][e] += d;
        }
      }
    }
    if (!dx) continue;  // uniform across the block
    const float2 s = row_sum(make_float2(s1, s2), red);
    const float m1 = s.x / a.cols, m2 = s.y / a.cols;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int j = threadIdx.x + i * blockDim.x;
      if (active && j < nvec) {
        float g[kVec], out[kVec];
        load_floats(gamma + j * kVec, g);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float xh = (to_float(xs[i].v[e]) - mean) * rstd;
          const float v = rstd * (to_float(dys[i].v[e]) * g[e] - m1 - xh * m2);
          out[e] = a.accumulate ? to_float(dx0[i].v[e]) + v : v;
        }
        store_floats(dx + off + j * kVec, out);
      }
    }
  }
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    const int j = threadIdx.x + i * blockDim.x;
    if (j < nvec) {
      if (a.dgamma_part) store_floats(a.dgamma_part + p * a.cols + j * kVec, dg[i]);
      if (a.dbeta_part) store_floats(a.dbeta_part + p * a.cols + j * kVec, db[i]);
    }
  }
}

// Grid: (ceil(C / 16), 2) blocks of (16, 32); blockIdx.y 0 reduces dgamma, 1 reduces dbeta (the two
// are independent; a block per parameter and 16 columns a block spread the pass over more SMs
// without changing any sum). Thread (tx, ty) adds partial rows ty, ty + 32, ... of column
// blockIdx.x * 16 + tx in that order (the loop is unrolled so that the loads are in flight
// together; the adds stay in order); row ty == 0 then adds the 32 sums in order and accumulates.
__global__ void layernorm_param_reduce_kernel(const float* __restrict__ dgamma_part,
                                              const float* __restrict__ dbeta_part, int64_t parts,
                                              int cols, float* dgamma, float* dbeta) {
  __shared__ float sg[32][17];
  const float* part = blockIdx.y == 0 ? dgamma_part : dbeta_part;
  float* out = blockIdx.y == 0 ? dgamma : dbeta;
  if (!out) return;  // uniform across the block
  const int c = blockIdx.x * 16 + threadIdx.x;
  float g = 0.f;
  if (c < cols) {
#pragma unroll 8
    for (int64_t p = threadIdx.y; p < parts; p += 32) g += part[p * cols + c];
  }
  sg[threadIdx.y][threadIdx.x] = g;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    for (int k = 1; k < 32; ++k) g += sg[k][threadIdx.x];
    out[c] += g;
  }
}

// ---- host side ---------------------------------------------------------------------------------

struct RowLayout {
  int threads_per_row;  // a multiple of 32, at most kMaxRowThreads for C <= kMaxCols
  int rows_per_block;   // 256 / threads_per_row, at least 1
};

RowLayout row_layout(int64_t cols, int vec, int elems_per_thread) {
  const int64_t nvec = cols / vec;
  const int64_t per_thread = elems_per_thread / vec;
  int64_t tpr = (nvec + per_thread - 1) / per_thread;
  tpr = std::max<int64_t>(32, (tpr + 31) / 32 * 32);
  return {static_cast<int>(tpr), static_cast<int>(std::max<int64_t>(1, 256 / tpr))};
}

using checks::aligned_to;

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mut_ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

template <typename X, typename W, typename Y, int kVec, bool kTranspose>
void launch_fwd(const FwdArgs& args, const RowLayout& l, int sms, cudaStream_t st) {
  const auto kernel = layernorm_fwd_kernel<X, W, Y, kVec, kTranspose>;
  const dim3 block(l.threads_per_row, l.rows_per_block);
  const int smem = kTranspose ? args.tile_rows * args.cols : 0;
  const int per_sm = elem::resident_blocks(reinterpret_cast<const void*>(kernel), l.threads_per_row * l.rows_per_block, smem);
  const int64_t rows_per_iter = kTranspose ? args.tile_rows : l.rows_per_block;
  const int64_t needed = (args.rows + rows_per_iter - 1) / rows_per_iter;
  const int64_t grid = std::min<int64_t>(needed, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
  kernel<<<static_cast<unsigned>(grid), block, smem, st>>>(args);
  HELIX_LAUNCH_CHECK();
}

template <typename W, typename Y, int kLaneVecs, int kRowsPerWarp, int kWarps>
void launch_fwd_fp8_t_with(FwdArgs args, int sms, cudaStream_t st) {
  const auto kernel = layernorm_fwd_fp8_t_kernel<W, Y, kLaneVecs, kRowsPerWarp, kWarps>;
  args.tile_rows = kWarps * kRowsPerWarp;
  const int smem = args.y_t != nullptr ? args.tile_rows * args.cols : 0;
  const int per_sm = elem::resident_blocks(reinterpret_cast<const void*>(kernel), kWarps * 32, smem);
  const int64_t needed = (args.rows + args.tile_rows - 1) / args.tile_rows;
  const int64_t grid = std::min<int64_t>(needed, static_cast<int64_t>(std::max(per_sm, 1)) * sms);
  kernel<<<static_cast<unsigned>(grid), kWarps * 32, smem, st>>>(args);
  HELIX_LAUNCH_CHECK();
}

// Two rows a warp: blocks of 8 warps (16-row tiles, two blocks resident per SM, so that one
// block's transposed store overlaps the other's loads; 66.9 us at [8192, 2560] on the H100 against
// 76.9 us for 16 warps and 32-row tiles with one block per SM). One row a warp: 16 warps.
template <typename W, typename Y, int kLaneVecs, int kRowsPerWarp>
void launch_fwd_fp8_t(const FwdArgs& args, int sms, cudaStream_t st) {
  launch_fwd_fp8_t_with<W, Y, kLaneVecs, kRowsPerWarp, kRowsPerWarp == 2 ? 8 : 16>(args, sms, st);
}

// The warp-per-row kernel's register budget: packs of 8 bf16 per lane (C <= 256 * kLaneVecs), two
// rows in flight per warp up to C = 2560, one up to C = 4096 (16-row tiles either way); wider rows
// would spill and take the generic kernel.
template <typename W, typename Y>
bool try_launch_fwd_fp8_t(const FwdArgs& args, int sms, cudaStream_t st) {
  const int lane_vecs = (args.cols / 8 + 31) / 32;
  if (lane_vecs <= 4) launch_fwd_fp8_t<W, Y, 4, 2>(args, sms, st);
  else if (lane_vecs <= 6) launch_fwd_fp8_t<W, Y, 6, 2>(args, sms, st);
  else if (lane_vecs <= 8) launch_fwd_fp8_t<W, Y, 8, 2>(args, sms, st);
  else if (lane_vecs <= 10) launch_fwd_fp8_t<W, Y, 10, 2>(args, sms, st);
  else if (lane_vecs <= 12) launch_fwd_fp8_t<W, Y, 12, 1>(args, sms, st);
  else if (lane_vecs <= 16) launch_fwd_fp8_t<W, Y, 16, 1>(args, sms, st);
  else return false;
  return true;
}

// Rows per transposed tile: 32 (32-byte column segments) while two tiles fit in shared memory next
// to each other on an SM, else 16 (C <= 8192: at most 128 KiB).
int transpose_tile_rows(int64_t cols) { return cols <= 3200 ? 32 : 16; }

}  // namespace

void detail::layernorm_fwd_cuda(const LayerNormFwdParams& p, const Stream& stream) {
  const int64_t T = p.x.dim(0), C = p.x.dim(1);
  HELIX_CHECK(C <= kMaxCols, "layernorm_fwd: expected C <= {}, got x {}", kMaxCols, p.x.str());
  HELIX_CHECK(T * C < (int64_t{1} << 62), "layernorm_fwd: x {} too large", p.x.str());
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  if (p.y_amax.defined() && !p.accumulate_amax)
    CUDA_CHECK(cudaMemsetAsync(p.y_amax.data_ptr(), 0, sizeof(float), st));
  if (T == 0) return;
  FwdArgs args{p.x.data_ptr(),
               ptr_or_null(p.residual),
               mut_ptr_or_null(p.residual_out),
               p.gamma.data_ptr(),
               p.beta.data_ptr(),
               p.y.data_ptr(),
               p.y_scale.defined() ? p.y_scale.data<float>() : nullptr,
               p.y_amax.defined() ? static_cast<unsigned*>(p.y_amax.data_ptr()) : nullptr,
               p.mean.defined() ? p.mean.data<float>() : nullptr,
               p.rstd.defined() ? p.rstd.data<float>() : nullptr,
               mut_ptr_or_null(p.y_t),
               T,
               static_cast<int>(C),
               transpose_tile_rows(C),
               C % 4 == 0 && T % 16 == 0 && aligned_to(p.y_t, 16),
               p.eps};
  const bool transpose = p.y_t.defined();
  const int sms = elem::sm_count(p.x.device().index);
  elem::visit_f32_bf16(p.x.dtype(), "layernorm_fwd", "x", [&](auto xt) {
    using X = decltype(xt);
    elem::visit_f32_bf16(p.gamma.dtype(), "layernorm_fwd", "gamma", [&](auto wt) {
      using W = decltype(wt);
      elem::visit_output(p.y.dtype(), "layernorm_fwd", "y", [&](auto yt) {
        using Y = decltype(yt);
        constexpr int kVec = 16 / sizeof(X);
        const bool vec_ok =
            C % kVec == 0 && aligned_to(p.x, 16) && aligned_to(p.residual, 16) &&
            aligned_to(p.residual_out, 16) && aligned_to(p.gamma, kVec * sizeof(W)) &&
            aligned_to(p.beta, kVec * sizeof(W)) && aligned_to(p.y, kVec * sizeof(Y));
        const RowLayout l = row_layout(C, vec_ok ? kVec : 1, kFwdElemsPerThread);
        if constexpr (elem::kIsFp8<Y>) {
          if constexpr (std::is_same_v<X, bf16_t>) {  // with or without the transpose
            if (vec_ok && !p.residual.defined() && try_launch_fwd_fp8_t<W, Y>(args, sms, st)) return;
          }
          if (transpose) {
            if (vec_ok) launch_fwd<X, W, Y, kVec, true>(args, l, sms, st);
            else launch_fwd<X, W, Y, 1, true>(args, l, sms, st);
            return;
          }
        }
        if (vec_ok) launch_fwd<X, W, Y, kVec, false>(args, l, sms, st);
        else launch_fwd<X, W, Y, 1, false>(args, l, sms, st);
      });
    });
  });
}

void detail::layernorm_bwd_cuda(const LayerNormBwdParams& p, const Stream& stream) {
  const int64_t T = p.x.dim(0), C = p.x.dim(1);
  HELIX_CHECK(C <= kMaxCols, "layernorm_bwd: expected C <= {}, got x {}", kMaxCols, p.x.str());
  if (T == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  elem::visit_f32_bf16(p.x.dtype(), "layernorm_bwd", "x", [&](auto xt) {
    using X = decltype(xt);
    elem::visit_f32_bf16(p.gamma.dtype(), "layernorm_bwd", "gamma", [&](auto wt) {
      using W = decltype(wt);
      constexpr int kVec = 16 / sizeof(X);
      const bool vec_ok = C % kVec == 0 && aligned_to(p.x, 16) && aligned_to(p.dy, 16) &&
                          aligned_to(p.dx, 16) && aligned_to(p.gamma, kVec * sizeof(W));
      const int vec = vec_ok ? kVec : 1;
      const RowLayout l = row_layout(C, vec, kBwdElemsPerThread);
      // The partial layout depends on T and C only (never on the GPU), so results are reproducible.
      const int64_t max_rows = std::min(kMaxPartialRows, kMaxPartialFloats / C);
      const int64_t max_blocks = std::max<int64_t>(1, max_rows / l.rows_per_block);
      const int64_t grid =
          std::min<int64_t>((T + l.rows_per_block - 1) / l.rows_per_block, max_blocks);
      const int64_t parts = grid * l.rows_per_block;
      const bool need_params = p.dgamma.defined() || p.dbeta.defined();
      Tensor partials;
      if (need_params) partials = Tensor::empty({2, parts, C}, DType::kF32, p.x.device(), stream);
      BwdArgs args{p.x.data_ptr(),
                   p.gamma.data_ptr(),
                   p.mean.data<float>(),
                   p.rstd.data<float>(),
                   p.dy.data_ptr(),
                   mut_ptr_or_null(p.dx),
                   p.dgamma.defined() ? partials.data<float>() : nullptr,
                   p.dbeta.defined() ? partials.data<float>() + parts * C : nullptr,
                   T,
                   static_cast<int>(C),
                   p.accumulate_dx};
      const dim3 block(l.threads_per_row, l.rows_per_block);
      if (vec_ok)
        layernorm_bwd_kernel<X, W, kVec><<<static_cast<unsigned>(grid), block, 0, st>>>(args);
      else
        layernorm_bwd_kernel<X, W, 1><<<static_cast<unsigned>(grid), block, 0, st>>>(args);
      HELIX_LAUNCH_CHECK();
      if (need_params) {
        layernorm_param_reduce_kernel<<<dim3(static_cast<unsigned>((C + 15) / 16), 2),
                                        dim3(16, 32), 0, st>>>(args.dgamma_part, args.dbeta_part, parts,
                                              static_cast<int>(C),
                                              p.dgamma.defined() ? p.dgamma.data<float>() : nullptr,
                                              p.dbeta.defined() ? p.dbeta.data<float>() : nullptr);
        HELIX_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace helix
