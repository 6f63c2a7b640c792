// CUDA backward of packed-THD attention, dK/dV kernel of AttentionBwdTiling::kTiled2D: the
// structure of FlashAttention-2's sm80 backward. One CTA of 8 warps per (key tile of kBlockN,
// head, sequence) walks the query tiles of kBlockM rows that see its keys (two-stage cp.async
// pipeline for Q, dO, LSE and delta). Every phase has its own 2-D warp partition, so each fragment
// read from shared memory feeds several MMAs:
//  1. S^T = K Q^T and dP^T = V dO^T: warp (i, j) owns keys x queries block (i, j) of the tile;
//  2. P^T = exp2(S^T scale log2e - LSE log2e), dS^T = P^T (dP^T - delta) in registers, stored to
//     two swizzled bf16 tiles [kBlockN][kBlockM] in shared memory;
//  3. dV += P^T dO on warps 0-3 and dK += dS^T Q on warps 4-7: warp (i, j) of each four owns
//     keys x head-dim block (i, j) of its gradient (registers; written once at the end:
//     deterministic), A fragments from the P^T / dS^T tiles. Splitting dV and dK between the warps
//     (rather than every warp holding both) doubles each warp's block for the same registers, so
//     every fragment feeds more MMAs;
//  4. atomic mode: dQ += dS K, warp (i, j) owns queries x head-dim block (i, j), fp32 float2
//     atomics into the dQ accumulator (converted by attention_bwd.cu). Deterministic mode leaves
//     dQ to attention_bwd.cu's dQ pass.
// Delta, the dQ conversion and gap zeroing are attention_bwd.cu's. Tile sizes per head dim: see
// launch_bwd_tiled2d (docs/perf/attention.md, v5).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "core/cuda_check.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/attention_cuda.h"
#include "kernels/attention/attention_tiles.cuh"

namespace helix {
namespace {

using namespace attention_tiles;

// kBlockN keys per CTA, kBlockM query rows per pipeline step; the warp grids (8 warps) of the
// three phases: kSWarpsN warps along the keys of S^T / dP^T (the rest along the queries),
// kKvWarpsN of the 4 warps of dV (and of dK) along the keys (the rest along the head dim),
// kDqWarpsM along the queries
// of dQ (the rest along the head dim).
template <int kBlockN_, int kBlockM_, int kSWarpsN_, int kKvWarpsN_, int kDqWarpsM_>
struct Tiled2dTiling {
  static constexpr int kBlockN = kBlockN_, kBlockM = kBlockM_;
  static constexpr int kSWarpsN = kSWarpsN_, kKvWarpsN = kKvWarpsN_, kDqWarpsM = kDqWarpsM_;
};

// DT: the head dim of the shared-memory tiles (tile_dim<D>()); T: a Tiled2dTiling.
template <int DT, class T>
struct Tiled2dConfig {
  static constexpr int kWarps = 8, kThreads = kWarps * 32;
  static constexpr int kBlockN = T::kBlockN, kBlockM = T::kBlockM;
  // Phase 1: each warp kSKeys keys x kSRows queries of S^T and dP^T.
  static constexpr int kSKeys = kBlockN / T::kSWarpsN;
  static constexpr int kSRows = kBlockM / (kWarps / T::kSWarpsN);
  // Phase 3: each warp kKvKeys keys x kKvCols head-dim columns of dV (warps 0-3) or dK (4-7).
  static constexpr int kKvWarps = kWarps / 2;  // warps per gradient
  static constexpr int kKvKeys = kBlockN / T::kKvWarpsN;
  static constexpr int kKvCols = DT / (kKvWarps / T::kKvWarpsN);
  // Phase 4: each warp kDqRows queries x kDqCols head-dim columns of dQ.
  static constexpr int kDqRows = kBlockM / T::kDqWarpsM;
  static constexpr int kDqCols = DT / (kWarps / T::kDqWarpsM);
  static_assert(kWarps % T::kSWarpsN == 0 && kKvWarps % T::kKvWarpsN == 0 &&
                    kWarps % T::kDqWarpsM == 0,
                "warp grids must divide the 8 warps");
  static_assert(kSKeys % 16 == 0 && kSRows % 16 == 0 && kKvKeys % 16 == 0 && kKvCols % 16 == 0 &&
                    kDqRows % 16 == 0 && kDqCols % 16 == 0,
                "every warp block must be whole m16 / k16 / n16 tiles");
  static constexpr int kKVBytes = kBlockN * DT * 2;
  static constexpr int kQBytes = kBlockM * DT * 2;
  static constexpr int kRowBytes = kBlockM * 4;          // one stage of LSE or delta
  static constexpr int kPBytes = kBlockN * kBlockM * 2;  // one bf16 [key][query] tile
  static constexpr int kOffV = kKVBytes;
  static constexpr int kOffQ = 2 * kKVBytes;                 // + stage * kQBytes
  static constexpr int kOffDo = kOffQ + 2 * kQBytes;         // + stage * kQBytes
  static constexpr int kOffLse = kOffDo + 2 * kQBytes;       // + stage * kRowBytes
  static constexpr int kOffDelta = kOffLse + 2 * kRowBytes;  // + stage * kRowBytes
  static constexpr int kOffP = kOffDelta + 2 * kRowBytes;    // P^T [kBlockN][kBlockM] bf16
  static constexpr int kOffDs = kOffP + kPBytes;             // dS^T [kBlockN][kBlockM] bf16
  static constexpr int kSmem = kOffDs + kPBytes;
};

// Resident CTAs per SM asked of the compiler: 2 (128 registers, 65 KB of shared memory each) for
// the atomic-mode kernel at D = 24, 32, which fits without spills (the deterministic one spills
// 20-48 bytes there); 1 (255 registers) elsewhere.
template <int D, bool kAtomicDq>
constexpr int tiled2d_min_blocks() {
  return tile_dim<D>() == 32 && kAtomicDq ? 2 : 1;
}

// grid (ceil(max_seqlen_kv / kBlockN), H, b), block 256 (8 warps). D is the head dim of the
// tensors, DT = tile_dim<D>() that of the tiles and fragments (D = 24: zero columns 24..31, never
// stored).
template <int D, class T, bool kAtomicDq>
__global__ void __launch_bounds__(256, (tiled2d_min_blocks<D, kAtomicDq>()))
    bwd_tiled2d_kernel(const AttnArgs a) {
  constexpr int DT = tile_dim<D>();
  using C = Tiled2dConfig<DT, T>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kThreads = C::kThreads;
  constexpr int kSKeys = C::kSKeys, kSRows = C::kSRows;
  constexpr int kKvKeys = C::kKvKeys, kKvCols = C::kKvCols;
  constexpr int kDqRows = C::kDqRows, kDqCols = C::kDqCols;
  constexpr int kSKT = kSKeys / 16, kSQT = kSRows / 16;      // m16 key tiles, n16 query blocks
  constexpr int kKvKT = kKvKeys / 16, kKvCT = kKvCols / 16;  // m16 key tiles, n16 column blocks
  constexpr int kDqMT = kDqRows / 16, kDqCT = kDqCols / 16;  // m16 query tiles, n16 col blocks
  // k-steps of S^T / dP^T unrolled together: all of them below D = 128; at D = 128 one at a time
  // (fully unrolled, the loop-invariant fragment addresses the compiler hoists spill 60-76 bytes).
  constexpr int kUnrollS = DT >= 128 ? 1 : DT / 16;
  extern __shared__ __align__(128) unsigned char smem[];

  const int seq = blockIdx.z, head = blockIdx.y;
  const int n0 = blockIdx.x * kBlockN;
  const int len_k = a.cu_kv[seq + 1] - a.cu_kv[seq];
  if (n0 >= len_k) return;
  const int len_q = a.cu_q[seq + 1] - a.cu_q[seq];
  const int64_t q_row0 = a.off_q[seq], k_row0 = a.off_kv[seq];
  const int diag = len_k - len_q;  // query i sees key j iff j <= i + diag (causal)
  // Under a causal mask the first query that sees key n0 is n0 - diag.
  const int m_first = a.causal ? max(0, n0 - diag) / kBlockM : 0;
  const int m_tiles = (len_q + kBlockM - 1) / kBlockM;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t hd = int64_t{head} * D;
  const float sl2 = a.scale_log2;
  // The warp's blocks (offsets within the CTA's tiles) in the three partitions.
  const int s_key0 = (warp % T::kSWarpsN) * kSKeys, s_row0 = (warp / T::kSWarpsN) * kSRows;
  const int kv_warp = warp % C::kKvWarps;
  const int kv_key0 = (kv_warp % T::kKvWarpsN) * kKvKeys;
  const int kv_col0 = (kv_warp / T::kKvWarpsN) * kKvCols;
  const bool kv_is_dk = warp >= C::kKvWarps;  // warps 0-3: dV += P^T dO; 4-7: dK += dS^T Q
  const int dq_row0 = (warp % T::kDqWarpsM) * kDqRows, dq_col0 = (warp / T::kDqWarpsM) * kDqCols;
  const bool kv_active = n0 + kv_key0 < len_k;  // this warp's dV / dK rows hold keys

  const uint32_t s_base = smem_addr(smem);
  const uint32_t s_k = s_base, s_v = s_base + C::kOffV;
  const uint32_t s_p = s_base + C::kOffP, s_ds = s_base + C::kOffDs;
  const uint32_t s_kv_a = kv_is_dk ? s_ds : s_p;  // phase 3's A tile: P^T (dV) or dS^T (dK)
  float* s_lse = reinterpret_cast<float*>(smem + C::kOffLse);
  float* s_delta = reinterpret_cast<float*>(smem + C::kOffDelta);

  auto load_q_tile = [&](int m, int stage) {
    const int mq0 = m * kBlockM;
    const int rows = min(kBlockM, len_q - mq0);
    const int64_t off = (q_row0 + mq0) * a.row_stride + hd;
    load_tile<kBlockM, DT, kThreads, D>(s_base + C::kOffQ + stage * C::kQBytes, a.q + off,
                                        a.row_stride, rows, tid);
    load_tile<kBlockM, DT, kThreads, D>(s_base + C::kOffDo + stage * C::kQBytes, a.d_o + off,
                                        a.row_stride, rows, tid);
    for (int i = tid; i < kBlockM; i += kThreads) {
      const bool ok = i < rows;
      const int64_t li = head * a.tq + q_row0 + mq0 + i;
      const float l = ok ? a.lse[li] : -INFINITY;
      // exp2(S * scale_log2 - lse * log2e); an empty row (lse = -inf) must give P = 0, not inf.
      s_lse[stage * kBlockM + i] = l == -INFINITY ? INFINITY : l * kLog2e;
      s_delta[stage * kBlockM + i] = ok ? a.delta[li] : 0.f;
    }
  };

  float dkv[kKvKT][2 * kKvCT][4];  // this warp's block of dV or dK (unscaled)
#pragma unroll
  for (int i = 0; i < kKvKT; ++i)
#pragma unroll
    for (int j = 0; j < 2 * kKvCT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dkv[i][j][e] = 0.f;

  {
    const int rows = min(kBlockN, len_k - n0);
    const int64_t off = (k_row0 + n0) * a.row_stride + hd;
    load_tile<kBlockN, DT, kThreads, D>(s_k, a.k + off, a.row_stride, rows, tid);
    load_tile<kBlockN, DT, kThreads, D>(s_v, a.v + off, a.row_stride, rows, tid);
  }
  if (m_first < m_tiles) load_q_tile(m_first, 0);
  cp_async_commit();

  for (int m = m_first; m < m_tiles; ++m) {
    const int stage = (m - m_first) & 1;
    if (m + 1 < m_tiles) {
      load_q_tile(m + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int mq0 = m * kBlockM;
    const uint32_t s_q = s_base + C::kOffQ + stage * C::kQBytes;
    const uint32_t s_do = s_base + C::kOffDo + stage * C::kQBytes;

    // ---- Phase 1 and 2: this warp's kSKeys x kSRows block of P^T and dS^T. -------------------
    {
      const int key0 = n0 + s_key0, row0 = mq0 + s_row0;  // within the sequence
      // Nothing to add when the block's keys or queries are past the sequence, or (causal) every
      // key is after every query's view: the block then stores zeros.
      const bool skip =
          key0 >= len_k || row0 >= len_q || (a.causal && row0 + kSRows - 1 + diag < key0);
      float st[kSKT][2 * kSQT][4], dpt[kSKT][2 * kSQT][4];
#pragma unroll
      for (int kt = 0; kt < kSKT; ++kt)
#pragma unroll
        for (int j = 0; j < 2 * kSQT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) st[kt][j][e] = dpt[kt][j][e] = 0.f;
      if (!skip) {
#pragma unroll(kUnrollS)
        for (int kk = 0; kk < DT / 16; ++kk) {
          uint32_t ka[kSKT][4];  // every K fragment feeds the warp's kSQT query blocks
#pragma unroll
          for (int kt = 0; kt < kSKT; ++kt) load_a<DT>(ka[kt], s_k, s_key0 + kt * 16, kk, lane);
#pragma unroll
          for (int nb = 0; nb < kSQT; ++nb) {
            uint32_t b[4];  // every Q fragment feeds the warp's kSKT key tiles
            load_b_rows<DT>(b, s_q, s_row0 + nb * 16, kk, lane);
#pragma unroll
            for (int kt = 0; kt < kSKT; ++kt) {
              mma_bf16(st[kt][2 * nb], ka[kt], b[0], b[1]);
              mma_bf16(st[kt][2 * nb + 1], ka[kt], b[2], b[3]);
            }
          }
#pragma unroll
          for (int kt = 0; kt < kSKT; ++kt) load_a<DT>(ka[kt], s_v, s_key0 + kt * 16, kk, lane);
#pragma unroll
          for (int nb = 0; nb < kSQT; ++nb) {
            uint32_t b[4];
            load_b_rows<DT>(b, s_do, s_row0 + nb * 16, kk, lane);
#pragma unroll
            for (int kt = 0; kt < kSKT; ++kt) {
              mma_bf16(dpt[kt][2 * nb], ka[kt], b[0], b[1]);
              mma_bf16(dpt[kt][2 * nb + 1], ka[kt], b[2], b[3]);
            }
          }
        }
        const bool need_mask = row0 + kSRows > len_q || key0 + kSKeys > len_k ||
                               (a.causal && key0 + kSKeys - 1 > row0 + diag);
        // P^T = exp(scale S^T - LSE) and dS^T = P^T (dP^T - delta), in place. Accumulator element
        // e of tile (kt, j): key key0 + 16 kt + g + 8 (e / 2), query row0 + 8 j + 2 t + e % 2.
#pragma unroll
        for (int j = 0; j < 2 * kSQT; ++j) {
          // LSE and delta of queries s_row0 + 8 j + 2 t and + 1 (one 8-byte load each).
          const int qj = stage * kBlockM + s_row0 + j * 8 + 2 * t;
          const float2 lse_j = *reinterpret_cast<const float2*>(s_lse + qj);
          const float2 dlt_j = *reinterpret_cast<const float2*>(s_delta + qj);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int qi = s_row0 + j * 8 + 2 * t + (e & 1);  // query within the tile
            const float lse2 = (e & 1) ? lse_j.y : lse_j.x, dlt = (e & 1) ? dlt_j.y : dlt_j.x;
#pragma unroll
            for (int kt = 0; kt < kSKT; ++kt) {
              float p = fast_exp2(fmaf(st[kt][j][e], sl2, -lse2));
              if (need_mask) {
                const int key = key0 + kt * 16 + g + 8 * (e >> 1), query = mq0 + qi;
                if (query >= len_q || key >= len_k || (a.causal && key > query + diag)) p = 0.f;
              }
              st[kt][j][e] = p;
              dpt[kt][j][e] = p * (dpt[kt][j][e] - dlt);
            }
          }
        }
      }
      // bf16 P^T and dS^T to the [key][query] tiles: lane stores 2 queries of rows g and g + 8;
      // the 8 rows of one store hit 8 different 16-byte groups (swizzle), so no bank conflicts.
#pragma unroll
      for (int kt = 0; kt < kSKT; ++kt) {
#pragma unroll
        for (int j = 0; j < 2 * kSQT; ++j) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = s_key0 + kt * 16 + g + 8 * r, col = s_row0 + j * 8 + 2 * t;
            const uint32_t off = swz<kBlockM>(row, col >> 3) + (col & 7) * 2;
            *reinterpret_cast<uint32_t*>(smem + C::kOffP + off) =
                pack_bf16(st[kt][j][2 * r], st[kt][j][2 * r + 1]);
            *reinterpret_cast<uint32_t*>(smem + C::kOffDs + off) =
                pack_bf16(dpt[kt][j][2 * r], dpt[kt][j][2 * r + 1]);
          }
        }
      }
    }
    __syncthreads();  // the P^T and dS^T tiles are complete

    // ---- Phase 3: dV += P^T dO (warps 0-3) or dK += dS^T Q (warps 4-7), kKvKeys x kKvCols. ---
    if (kv_active) {
      const int key_lo = n0 + kv_key0;                // the block's first key (within the sequence)
      const uint32_t s_kv_b = kv_is_dk ? s_q : s_do;  // B tile: dO (dV) or Q (dK)
#pragma unroll
      for (int kq = 0; kq < kBlockM / 16; ++kq) {
        // Query blocks past the sequence, or (causal) before every key's first query, add zero.
        const int q_lo = mq0 + kq * 16;
        if (q_lo >= len_q) break;
        if (a.causal && q_lo + 15 + diag < key_lo) continue;
        uint32_t pa[kKvKT][4];  // every P^T (dS^T) fragment feeds the warp's kKvCT column blocks
#pragma unroll
        for (int kt = 0; kt < kKvKT; ++kt)
          load_a<kBlockM>(pa[kt], s_kv_a, kv_key0 + kt * 16, kq, lane);
#pragma unroll
        for (int nn = 0; nn < kKvCT; ++nn) {
          uint32_t b[4];  // every dO (Q) fragment feeds the warp's kKvKT key tiles
          load_b_cols<DT>(b, s_kv_b, kq * 16, kv_col0 / 16 + nn, lane);
#pragma unroll
          for (int kt = 0; kt < kKvKT; ++kt) {
            mma_bf16(dkv[kt][2 * nn], pa[kt], b[0], b[1]);
            mma_bf16(dkv[kt][2 * nn + 1], pa[kt], b[2], b[3]);
          }
        }
      }
    }

    // ---- Phase 4 (atomic mode): dQ += dS K over this warp's kDqRows x kDqCols block. ------------
    if constexpr (kAtomicDq) {
      const int q_lo = mq0 + dq_row0;  // the block's first query (within the sequence)
      if (q_lo < len_q) {
        float dq[kDqMT][2 * kDqCT][4];
#pragma unroll
        for (int i = 0; i < kDqMT; ++i)
#pragma unroll
          for (int j = 0; j < 2 * kDqCT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) dq[i][j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          // Key blocks past the sequence, or (causal) after every query's view, add zero.
          const int k_lo = n0 + kk * 16;
          if (k_lo >= len_k || (a.causal && k_lo > q_lo + kDqRows - 1 + diag)) break;
          // A fragments of dS (rows = queries, k = keys) from the [key][query] tile: transposed
          // loads, matrix i = keys k_lo + 8 (i / 2).., queries + 8 (i % 2)..
          uint32_t aa[kDqMT][4];
#pragma unroll
          for (int mt = 0; mt < kDqMT; ++mt) {
            const int srow = kk * 16 + (lane & 7) + ((lane >> 4) << 3);
            const int scol = dq_row0 + mt * 16 + (((lane >> 3) & 1) << 3);
            ldmatrix_x4_trans(aa[mt], s_ds + swz<kBlockM>(srow, scol >> 3));
          }
#pragma unroll
          for (int nn = 0; nn < kDqCT; ++nn) {
            uint32_t b[4];  // every K fragment feeds the warp's kDqMT query tiles
            load_b_cols<DT>(b, s_k, kk * 16, dq_col0 / 16 + nn, lane);
#pragma unroll
            for (int mt = 0; mt < kDqMT; ++mt) {
              mma_bf16(dq[mt][2 * nn], aa[mt], b[0], b[1]);
              mma_bf16(dq[mt][2 * nn + 1], aa[mt], b[2], b[3]);
            }
          }
        }
#pragma unroll
        for (int mt = 0; mt < kDqMT; ++mt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int query = q_lo + mt * 16 + g + 8 * r;
            if (query >= len_q) continue;
            float* dst = a.dq_accum + (q_row0 + query) * a.row_stride + hd + dq_col0 + 2 * t;
#pragma unroll
            for (int i = 0; i < 2 * kDqCT; ++i) {
              if (D < DT && dq_col0 + i * 8 >= D) continue;  // zero padding: not in dq_accum
#if __CUDA_ARCH__ >= 900
              atomicAdd(reinterpret_cast<float2*>(dst + i * 8),
                        make_float2(dq[mt][i][2 * r], dq[mt][i][2 * r + 1]));
#else
              atomicAdd(dst + i * 8, dq[mt][i][2 * r]);
              atomicAdd(dst + i * 8 + 1, dq[mt][i][2 * r + 1]);
#endif
            }
          }
        }
      }
    }
    __syncthreads();  // this stage and the P^T / dS^T tiles are free before the next refill
  }
  cp_async_wait<0>();  // nothing may stay in flight when the CTA exits (no query tile case)

  if (!kv_active) return;
  __nv_bfloat16* dst0 = kv_is_dk ? a.d_k : a.d_v;
  const float mul = kv_is_dk ? a.scale : 1.f;  // dK = scale dS^T Q
#pragma unroll
  for (int kt = 0; kt < kKvKT; ++kt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = n0 + kv_key0 + kt * 16 + g + 8 * r;
      if (key >= len_k) continue;
      __nv_bfloat16* dst = dst0 + (k_row0 + key) * a.row_stride + hd + kv_col0 + 2 * t;
#pragma unroll
      for (int i = 0; i < 2 * kKvCT; ++i) {
        if (D < DT && kv_col0 + i * 8 >= D) continue;  // zero padding columns are not stored
        *reinterpret_cast<uint32_t*>(dst + i * 8) =
            pack_bf16(dkv[kt][i][2 * r] * mul, dkv[kt][i][2 * r + 1] * mul);
      }
    }
  }
}

template <int D, class T>
void launch(const AttnArgs& a, const ThdAttentionLayout& b, int heads, AttentionBwdMode mode,
            cudaStream_t st) {
  using C = Tiled2dConfig<tile_dim<D>(), T>;
  const dim3 grid((b.max_seqlen_kv + C::kBlockN - 1) / C::kBlockN, heads, b.cu_seqlens_q.batch());
  if (grid.x == 0 || grid.z == 0) return;
  auto kernel = mode == AttentionBwdMode::kAtomic ? bwd_tiled2d_kernel<D, T, true>
                                                  : bwd_tiled2d_kernel<D, T, false>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  kernel<<<grid, C::kThreads, C::kSmem, st>>>(a);
  HELIX_LAUNCH_CHECK();
}

}  // namespace

namespace detail {

// Tilings: keys x query rows per CTA, then the warp block of S^T (keys x queries), of dV or dK
// (keys x columns) and of dQ (queries x columns), chosen from register and shared-memory counts
// (docs/perf/attention.md, v5):
//   D = 64:    128 x 128; S^T 32 x 64, dV/dK 32 x 64, dQ 32 x 32.
//   D = 128:    64 x 128; S^T 32 x 32, dV/dK 32 x 64, dQ 32 x 64.
//   D = 24/32: 128 x 64;  S^T 32 x 32, dV/dK 32 x 32, dQ 16 x 16.
//   D = 16:    128 x 128; S^T 32 x 64, dV/dK 32 x 16, dQ 16 x 16.
void launch_bwd_tiled2d(const attention_tiles::AttnArgs& a, const ThdAttentionLayout& layout,
                        int heads, int head_dim, AttentionBwdMode mode, const Stream& stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  switch (head_dim) {
    case 16:
      launch<16, Tiled2dTiling<128, 128, 4, 4, 8>>(a, layout, heads, mode, st);
      break;
    case 24:
      launch<24, Tiled2dTiling<128, 64, 4, 4, 4>>(a, layout, heads, mode, st);
      break;
    case 32:
      launch<32, Tiled2dTiling<128, 64, 4, 4, 4>>(a, layout, heads, mode, st);
      break;
    case 64:
      launch<64, Tiled2dTiling<128, 128, 4, 4, 4>>(a, layout, heads, mode, st);
      break;
    case 128:
      launch<128, Tiled2dTiling<64, 128, 2, 2, 4>>(a, layout, heads, mode, st);
      break;
    default:
      HELIX_CHECK(false,
                  "tiled-2D attention backward: expected head dim 16, 24, 32, 64 or 128, "
                  "got {}",
                  head_dim);
  }
}

}  // namespace detail
}  // namespace helix
