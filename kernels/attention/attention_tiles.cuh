#pragma once
// Internal to kernels/attention: the warp-level building blocks of the attention kernels. bf16
// tensor-core MMAs (mma.sync m16n8k16, fp32 accumulate), ldmatrix fragment loads from swizzled
// shared-memory tiles, cp.async 16-byte copies with zero fill, and the per-launch argument struct.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A 16x16 (row-major), 4 regs of 2 bf16: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//     a3 = (g+8, 2t+8..).
//   B 16x8 (k x n), 2 regs: b0 = (k = 2t..2t+1, n = g), b1 = (k = 2t+8.., n = g).
//   C 16x8 fp32, 4 regs: c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1).
// ldmatrix .x4 loads four 8x8 b16 matrices, lanes 8i..8i+7 giving the row addresses of matrix i;
// each lane receives (row g, cols 2t..2t+1) of every matrix, or with .trans (rows 2t..2t+1, col g).
// So an A fragment or a B fragment whose k runs along a smem row (Q, K for S = Q K^T) comes from
// plain ldmatrix, and a B fragment whose k runs down the smem rows (V for P V) from ldmatrix.trans.
// The C fragment of S = Q K^T, rounded to bf16, is directly the A fragment of P for P V.
//
// Shared-memory tiles hold rows of DT bf16 (DT/8 chunks of 16 bytes), DT = tile_dim(D): the head
// dim rounded up to a multiple of 16 (one MMA k-step), the extra columns zero-filled (D = 24 runs
// in tiles of 32). Chunks are XOR-swizzled so that the 8 row addresses of one ldmatrix matrix
// (8 consecutive rows, first one a multiple of 8), and the 16-byte stores of 8 consecutive cp.async
// threads, hit the 8 different 16-byte bank groups of a 128-byte line:
//   DT >= 64: chunk c of row r at chunk c ^ (r % 8) (one row spans every group);
//   DT = 32 (4 chunks, 2 rows a line): c ^ ((r / 2) % 4);  DT = 16 (2 chunks, 4 rows a line):
//   c ^ ((r / 4) % 2). In both, rows sharing a line differ in r % (rows a line) and the rows that
//   map to the same groups differ in the XOR term.
#include <cuda_bf16.h>

#include <cstdint>

#include "core/convert.h"

namespace helix::attention_tiles {

constexpr float kLog2e = 1.4426950408889634f;

// Everything a kernel needs, by value (pointers are device pointers; cu_* and off_* are [b+1]).
struct AttnArgs {
  const __nv_bfloat16* q;    // [Tq, H, D]
  const __nv_bfloat16* k;    // [Tk, H, D]
  const __nv_bfloat16* v;    // [Tk, H, D]
  const __nv_bfloat16* o;    // [Tq, H, D] (backward: the forward's output)
  const __nv_bfloat16* d_o;  // [Tq, H, D] (backward)
  __nv_bfloat16* out;        // forward: O [Tq, H, D]; backward dQ pass: dQ [Tq, H, D]
  __nv_bfloat16* d_k;        // [Tk, H, D] (backward)
  __nv_bfloat16* d_v;        // [Tk, H, D] (backward)
  float* lse;                // [H, Tq] (forward writes it, backward reads it)
  const float* delta;        // [H, Tq] rowsum(dO * O) - dLSE (backward)
  float* dq_accum;           // [Tq, H, D] fp32 (backward, atomic mode; the wgmma kernels: [H, Tq, D],
                             // chunks swizzled, see attention_sm90.cu), else nullptr
  const int32_t* cu_q;       // true lengths, cumulative
  const int32_t* cu_kv;
  const int32_t* off_q;  // row offsets (padded layout, or cu_q)
  const int32_t* off_kv;
  int64_t row_stride;  // H * D: elements between consecutive tokens
  int64_t tq;          // rows of q (stride of lse's head dimension)
  float scale;         // softmax scale
  float scale_log2;    // scale * log2(e)
  int causal;          // 1: bottom-right aligned causal mask
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Head dim of the shared-memory tiles for head dim D: D rounded up to a multiple of 16.
template <int D>
constexpr int tile_dim() {
  return (D + 15) / 16 * 16;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of D bf16 per row.
template <int D>
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  static_assert(D == 16 || D == 32 || D % 64 == 0, "tile rows of 16, 32 or a multiple of 64");
  if constexpr (D >= 64) {
    return static_cast<uint32_t>(row * (D * 2) + ((chunk ^ (row & 7)) << 4));
  } else {
    constexpr int kChunks = D / 8;             // 2 or 4 chunks a row
    constexpr int kRowsPerLine = 8 / kChunks;  // rows sharing one 128-byte line: 4 or 2
    return static_cast<uint32_t>(row * (D * 2) +
                                 ((chunk ^ ((row / kRowsPerLine) & (kChunks - 1))) << 4));
  }
}

// 16-byte global -> shared copy; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
// 4-byte global -> shared copy (both 4-byte aligned); when !valid the 4 bytes are zero-filled.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// c += a * b for one m16n8k16 tile (bf16 inputs, fp32 accumulators).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as bf16x2 in one register, `lo` in the low half (the lower column index).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// --- Fragment loads from swizzled [rows][D] tiles. `base` is the tile's shared address. ---------
// A fragment (16 rows x 16 k) at rows r0.., k chunk pair 2*kk (row-major storage: Q, dO).
template <int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], uint32_t base, int r0, int kk, int lane) {
  ldmatrix_x4(a, base + swz<D>(r0 + (lane & 15), 2 * kk + (lane >> 4)));
}
// Two B fragments (n = 16 rows n0.., k = 16 along the row, chunk pair 2*kk) for X K^T-style
// products: b[0], b[1] for rows n0..n0+7 and b[2], b[3] for rows n0+8..n0+15.
template <int D>
__device__ __forceinline__ void load_b_rows(uint32_t (&b)[4], uint32_t base, int n0, int kk,
                                            int lane) {
  ldmatrix_x4(b, base + swz<D>(n0 + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
}
// Two B fragments (k = 16 rows k0.., n = 16 columns, chunk pair 2*nn) for P V-style products:
// b[0], b[1] for columns 16nn..16nn+7 and b[2], b[3] for columns 16nn+8..16nn+15.
template <int D>
__device__ __forceinline__ void load_b_cols(uint32_t (&b)[4], uint32_t base, int k0, int nn,
                                            int lane) {
  ldmatrix_x4_trans(
      b, base + swz<D>(k0 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * nn + (lane >> 4)));
}

// Copies `rows` (<= R) rows of DG bf16 starting at `src` (row stride `stride` elements) into a
// swizzled R x D tile (D = tile_dim<DG>()); rows past `rows`, and columns DG..D-1, are zero-filled.
// All `threads` threads of the CTA call it.
template <int R, int D, int kThreads, int DG = D>
__device__ __forceinline__ void load_tile(uint32_t dst, const __nv_bfloat16* src, int64_t stride,
                                          int rows, int tid) {
  constexpr int kChunks = D / 8;
  static_assert(DG % 8 == 0 && DG <= D && D - DG < 16, "DG: the head dim that D pads");
  static_assert((R * kChunks) % kThreads == 0, "tile chunks must divide among the threads");
#pragma unroll
  for (int i = 0; i < R * kChunks / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = r < rows && (DG == D || c < DG / 8);
    const __nv_bfloat16* p = valid ? src + r * stride + c * 8 : src;
    cp_async_16(dst + swz<D>(r, c), p, valid);
  }
}

// 2^x on the special-function unit alone (ex2.approx.ftz: one MUFU.EX2). exp2f compiles to the
// non-ftz form, which adds a range test and two multiplies around it to keep results below 2^-126
// denormal; a softmax weight that small is zero for every purpose here (the row sum is >= 1).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Max and sum over the 4 lanes (t = 0..3) that share a row of a C fragment.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace helix::attention_tiles
