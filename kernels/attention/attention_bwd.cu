// CUDA backward of packed-THD attention (FlashAttention-2 style). Three steps on one stream:
//  1. delta = rowsum(dO * O) - dLSE per (query, head);
//  2. one CTA per (key tile of 64, head, sequence) walks the query tiles that see its keys,
//     recomputes P^T = exp(scale K Q^T - LSE) and dP^T = V dO^T, and accumulates dV += P^T dO and
//     dK += dS^T Q in registers (written once: deterministic). In atomic mode it also adds
//     dQ += dS K into an fp32 buffer with atomics, converted to bf16 afterwards;
//  3. deterministic mode instead runs a dQ pass: one CTA per (query tile, head, sequence) over the
//     key tiles, recomputing S and dP, dQ += dS K in registers, written once.
// Head dims 16, 24, 32, 64, 128; 24 runs in tiles of 32 whose extra columns are zero (not stored).
// AttentionBwdTiling::kTiled2D runs step 2 in attention_bwd_2d.cu (8 warps, 2-D warp partitions).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "core/cuda_check.h"
#include "core/error.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/attention_cuda.h"
#include "kernels/attention/attention_tiles.cuh"

namespace helix {
namespace {

using namespace attention_tiles;

constexpr int kBwdMinBlocksSmallD = 4;  // D <= 32: 128 registers a thread

// grid (ceil(Tq * H / 32)), block 256: 8 threads per (query, head) row, 16-byte loads of dO and O.
template <int D>
__global__ void bwd_delta_kernel(const __nv_bfloat16* o, const __nv_bfloat16* d_o,
                                 const float* d_lse, float* delta, int64_t tq, int heads) {
  const int64_t row = int64_t{blockIdx.x} * 32 + threadIdx.x / 8;  // (token, head) row
  const int sub = threadIdx.x % 8;
  const bool valid = row < tq * heads;
  float sum = 0.f;
  if (valid) {
#pragma unroll
    for (int c = sub; c < D / 8; c += 8) {
      const uint4 ov = reinterpret_cast<const uint4*>(o + row * D)[c];
      const uint4 gv = reinterpret_cast<const uint4*>(d_o + row * D)[c];
      const __nv_bfloat162* op = reinterpret_cast<const __nv_bfloat162*>(&ov);
      const __nv_bfloat162* gp = reinterpret_cast<const __nv_bfloat162*>(&gv);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 of = __bfloat1622float2(op[i]), gf = __bfloat1622float2(gp[i]);
        sum = fmaf(of.x, gf.x, fmaf(of.y, gf.y, sum));
      }
    }
  }
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  if (valid && sub == 0) {
    const int64_t token = row / heads, head = row % heads;
    const int64_t li = head * tq + token;
    delta[li] = sum - (d_lse ? d_lse[li] : 0.f);
  }
}

// Resident CTAs per SM asked of the compiler (the register cap) by the dQ kernel and the 64-key
// dK/dV kernels.
template <int D>
constexpr int bwd_min_blocks() {
  return D == 128 ? 2 : D == 64 ? 3 : kBwdMinBlocksSmallD;
}

// The dK/dV kernel's tiling: kBlockM query rows per pipeline step; kWarps warps, each owning
// kKeyTiles m16 tiles of keys (16 kKeyTiles keys), so kBlockN = 16 kKeyTiles kWarps keys per CTA;
// kMinBlocks resident CTAs asked of the compiler. kKeyTiles = 2 lets every Q / dO fragment read
// from shared memory feed two key tiles (half the ldmatrix traffic per MMA of kKeyTiles = 1);
// 128-key CTAs halve the dQ atomics and the Q / dO / LSE / delta loads per key.
template <int kBlockM_, int kWarps_, int kKeyTiles_, int kMinBlocks_>
struct DkdvTiling {
  static constexpr int kBlockM = kBlockM_, kWarps = kWarps_, kKeyTiles = kKeyTiles_;
  static constexpr int kMinBlocks = kMinBlocks_;
};

// DT: the head dim of the shared-memory tiles (tile_dim<D>()); T: a DkdvTiling.
template <int DT, class T, bool kAtomicDq>
struct DkdvConfig {
  static constexpr int kBlockM = T::kBlockM, kWarps = T::kWarps, kKeyTiles = T::kKeyTiles;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpKeys = 16 * kKeyTiles;     // keys per warp
  static constexpr int kBlockN = kWarpKeys * kWarps;  // keys per CTA
  static constexpr int kDsStride =
      kBlockM + 8;  // bf16 per row of the dS^T tile (padded: no conflicts)
  static constexpr int kKVBytes = kBlockN * DT * 2;
  static constexpr int kQBytes = kBlockM * DT * 2;
  static constexpr int kRowBytes = kBlockM * 4;  // one stage of LSE or delta
  static constexpr int kOffV = kKVBytes;
  static constexpr int kOffQ = 2 * kKVBytes;                 // + stage * kQBytes
  static constexpr int kOffDo = kOffQ + 2 * kQBytes;         // + stage * kQBytes
  static constexpr int kOffLse = kOffDo + 2 * kQBytes;       // + stage * kRowBytes
  static constexpr int kOffDelta = kOffLse + 2 * kRowBytes;  // + stage * kRowBytes
  static constexpr int kOffDs = kOffDelta + 2 * kRowBytes;
  static constexpr int kSmem = kOffDs + (kAtomicDq ? kBlockN * kDsStride * 2 : 0);
};

// grid (ceil(max_seqlen_kv / kBlockN), H, b), block kWarps * 32. Warp w owns keys
// [n0 + w kWarpKeys, n0 + (w + 1) kWarpKeys) (kKeyTiles m16 tiles) and their dK, dV rows; the CTA
// walks query tiles of kBlockM rows through a two-stage cp.async pipeline. D is the head dim of
// the tensors, DT = tile_dim<D>() that of the tiles and fragments.
template <int D, class T, bool kAtomicDq>
__global__ void __launch_bounds__(T::kWarps * 32, T::kMinBlocks)
    bwd_dkdv_kernel(const AttnArgs a) {
  constexpr int DT = tile_dim<D>();
  using C = DkdvConfig<DT, T, kAtomicDq>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kThreads = C::kThreads;
  constexpr int kKT = C::kKeyTiles, kWarpKeys = C::kWarpKeys;
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
  const int wkey0 = n0 + warp * kWarpKeys;  // first key of this warp, within the sequence
  const bool warp_active = wkey0 < len_k;
  const float sl2 = a.scale_log2;

  const uint32_t s_base = smem_addr(smem);
  const uint32_t s_k = s_base, s_v = s_base + C::kOffV;
  float* s_lse = reinterpret_cast<float*>(smem + C::kOffLse);
  float* s_delta = reinterpret_cast<float*>(smem + C::kOffDelta);
  __nv_bfloat16* s_ds = reinterpret_cast<__nv_bfloat16*>(smem + C::kOffDs);

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

  float dk[kKT][DT / 8][4], dv[kKT][DT / 8][4];
#pragma unroll
  for (int kt = 0; kt < kKT; ++kt)
#pragma unroll
    for (int i = 0; i < DT / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[kt][i][e] = dv[kt][i][e] = 0.f;

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
    // A warp adds nothing when its keys are past the sequence or (causal) after every query's view.
    const bool skip = !warp_active || (a.causal && mq0 + kBlockM - 1 + diag < wkey0);
    // S^T and dP^T of this warp: rows = its keys (tile kt: keys wkey0 + 16 kt ..), columns = the
    // tile's kBlockM queries.
    float st[kKT][kBlockM / 8][4], dpt[kKT][kBlockM / 8][4];
#pragma unroll
    for (int kt = 0; kt < kKT; ++kt)
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[kt][j][e] = dpt[kt][j][e] = 0.f;
    if (!skip) {
#pragma unroll
      for (int kk = 0; kk < DT / 16; ++kk) {
        uint32_t ka[kKT][4], va[kKT][4];
#pragma unroll
        for (int kt = 0; kt < kKT; ++kt) {
          load_a<DT>(ka[kt], s_k, warp * kWarpKeys + kt * 16, kk, lane);
          load_a<DT>(va[kt], s_v, warp * kWarpKeys + kt * 16, kk, lane);
        }
#pragma unroll
        for (int nb = 0; nb < kBlockM / 16; ++nb) {
          uint32_t b[4];  // one Q (then dO) fragment load feeds every key tile of the warp
          load_b_rows<DT>(b, s_q, nb * 16, kk, lane);
#pragma unroll
          for (int kt = 0; kt < kKT; ++kt) {
            mma_bf16(st[kt][2 * nb], ka[kt], b[0], b[1]);
            mma_bf16(st[kt][2 * nb + 1], ka[kt], b[2], b[3]);
          }
          load_b_rows<DT>(b, s_do, nb * 16, kk, lane);
#pragma unroll
          for (int kt = 0; kt < kKT; ++kt) {
            mma_bf16(dpt[kt][2 * nb], va[kt], b[0], b[1]);
            mma_bf16(dpt[kt][2 * nb + 1], va[kt], b[2], b[3]);
          }
        }
      }
      const bool need_mask = mq0 + kBlockM > len_q || wkey0 + kWarpKeys > len_k ||
                             (a.causal && wkey0 + kWarpKeys - 1 > mq0 + diag);
      // P^T = exp(scale S^T - LSE) and dS^T = P^T (dP^T - delta), in place.
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + 2 * t + (e & 1);  // query within the tile
          const float lse2 = s_lse[stage * kBlockM + qi], dlt = s_delta[stage * kBlockM + qi];
#pragma unroll
          for (int kt = 0; kt < kKT; ++kt) {
            float p = fast_exp2(fmaf(st[kt][j][e], sl2, -lse2));
            if (need_mask) {
              const int key = wkey0 + kt * 16 + g + 8 * (e >> 1), query = mq0 + qi;
              if (query >= len_q || key >= len_k || (a.causal && key > query + diag)) p = 0.f;
            }
            st[kt][j][e] = p;
            dpt[kt][j][e] = p * (dpt[kt][j][e] - dlt);
          }
        }
      }
      // dV += P^T dO and dK += dS^T Q (scale applied at the end); A fragments from the
      // accumulators, each dO / Q fragment shared by the warp's key tiles.
#pragma unroll
      for (int kq = 0; kq < kBlockM / 16; ++kq) {
        uint32_t pa[kKT][4], da[kKT][4];
#pragma unroll
        for (int kt = 0; kt < kKT; ++kt) {
          pa[kt][0] = pack_bf16(st[kt][2 * kq][0], st[kt][2 * kq][1]);
          pa[kt][1] = pack_bf16(st[kt][2 * kq][2], st[kt][2 * kq][3]);
          pa[kt][2] = pack_bf16(st[kt][2 * kq + 1][0], st[kt][2 * kq + 1][1]);
          pa[kt][3] = pack_bf16(st[kt][2 * kq + 1][2], st[kt][2 * kq + 1][3]);
          da[kt][0] = pack_bf16(dpt[kt][2 * kq][0], dpt[kt][2 * kq][1]);
          da[kt][1] = pack_bf16(dpt[kt][2 * kq][2], dpt[kt][2 * kq][3]);
          da[kt][2] = pack_bf16(dpt[kt][2 * kq + 1][0], dpt[kt][2 * kq + 1][1]);
          da[kt][3] = pack_bf16(dpt[kt][2 * kq + 1][2], dpt[kt][2 * kq + 1][3]);
        }
#pragma unroll
        for (int nn = 0; nn < DT / 16; ++nn) {
          uint32_t b[4];
          load_b_cols<DT>(b, s_do, kq * 16, nn, lane);
#pragma unroll
          for (int kt = 0; kt < kKT; ++kt) {
            mma_bf16(dv[kt][2 * nn], pa[kt], b[0], b[1]);
            mma_bf16(dv[kt][2 * nn + 1], pa[kt], b[2], b[3]);
          }
          load_b_cols<DT>(b, s_q, kq * 16, nn, lane);
#pragma unroll
          for (int kt = 0; kt < kKT; ++kt) {
            mma_bf16(dk[kt][2 * nn], da[kt], b[0], b[1]);
            mma_bf16(dk[kt][2 * nn + 1], da[kt], b[2], b[3]);
          }
        }
      }
    }
    if constexpr (kAtomicDq) {
      // dS^T (bf16, zeros for skipped warps) to shared memory, then dQ_tile += dS K: warp w takes
      // query rows [16 (w % kMBlocks), +16) and a kNPerWarp-wide slice of the head dim.
#pragma unroll
      for (int kt = 0; kt < kKT; ++kt) {
#pragma unroll
        for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = warp * kWarpKeys + kt * 16 + g + 8 * r;
            *reinterpret_cast<uint32_t*>(s_ds + row * C::kDsStride + j * 8 + 2 * t) =
                pack_bf16(dpt[kt][j][2 * r], dpt[kt][j][2 * r + 1]);
          }
        }
      }
      __syncthreads();
      constexpr int kMBlocks = kBlockM / 16;
      constexpr int kWarpsPerM = C::kWarps / kMBlocks;
      constexpr int kNPerWarp = DT / 8 / kWarpsPerM;  // n-blocks of 8 head-dim columns
      static_assert(kMBlocks * kWarpsPerM == C::kWarps && kNPerWarp % 2 == 0, "dQ work split");
      const int mb = warp % kMBlocks, nb0 = (warp / kMBlocks) * kNPerWarp;
      float dq[kNPerWarp][4];
#pragma unroll
      for (int i = 0; i < kNPerWarp; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
      const uint32_t s_ds_addr = smem_addr(s_ds);
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        // A fragment of dS (rows = queries, k = keys) from the [key][query] tile: transposed load.
        uint32_t aa[4];
        const int srow = kk * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int scol = mb * 16 + (((lane >> 3) & 1) << 3);
        ldmatrix_x4_trans(aa, s_ds_addr + (srow * C::kDsStride + scol) * 2);
#pragma unroll
        for (int i = 0; i < kNPerWarp / 2; ++i) {
          uint32_t b[4];
          load_b_cols<DT>(b, s_k, kk * 16, nb0 / 2 + i, lane);
          mma_bf16(dq[2 * i], aa, b[0], b[1]);
          mma_bf16(dq[2 * i + 1], aa, b[2], b[3]);
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int query = mq0 + mb * 16 + g + 8 * r;
        if (query >= len_q) continue;
        float* dst = a.dq_accum + (q_row0 + query) * a.row_stride + hd + nb0 * 8 + 2 * t;
#pragma unroll
        for (int i = 0; i < kNPerWarp; ++i) {
          if (D < DT && (nb0 + i) * 8 >= D) continue;  // zero padding columns: not in dq_accum
#if __CUDA_ARCH__ >= 900
          atomicAdd(reinterpret_cast<float2*>(dst + i * 8),
                    make_float2(dq[i][2 * r], dq[i][2 * r + 1]));
#else
          atomicAdd(dst + i * 8, dq[i][2 * r]);
          atomicAdd(dst + i * 8 + 1, dq[i][2 * r + 1]);
#endif
        }
      }
    }
    __syncthreads();  // this stage (and the dS tile) is free before the next iteration refills it
  }
  cp_async_wait<0>();  // nothing may stay in flight when the CTA exits (no query tile case)

  if (!warp_active) return;
#pragma unroll
  for (int kt = 0; kt < kKT; ++kt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = wkey0 + kt * 16 + g + 8 * r;
      if (key >= len_k) continue;
      const int64_t off = (k_row0 + key) * a.row_stride + hd + 2 * t;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {  // the zero padding columns (D < DT) are not stored
        *reinterpret_cast<uint32_t*>(a.d_k + off + i * 8) =
            pack_bf16(dk[kt][i][2 * r] * a.scale, dk[kt][i][2 * r + 1] * a.scale);
        *reinterpret_cast<uint32_t*>(a.d_v + off + i * 8) =
            pack_bf16(dv[kt][i][2 * r], dv[kt][i][2 * r + 1]);
      }
    }
  }
}

template <int DT>
struct DqConfig {
  static constexpr int kWarps = 4, kThreads = kWarps * 32;
  static constexpr int kBlockM = 64, kBlockN = 64;
  static constexpr int kQBytes = kBlockM * DT * 2;
  static constexpr int kKVBytes = kBlockN * DT * 2;
  static constexpr int kOffDo = kQBytes;
  static constexpr int kOffKV = 2 * kQBytes;  // K stage s at + s * kKVBytes, V at + (2 + s) * ...
  static constexpr int kSmem = kOffKV + 4 * kKVBytes;
};

// Deterministic dQ pass. grid (ceil(max_seqlen_q / 64), H, b), block 128: warp w owns query rows
// [m0 + 16w, m0 + 16w + 16); K/V tiles of 64 keys stream through a two-stage cp.async pipeline.
template <int D>
__global__ void __launch_bounds__(128, bwd_min_blocks<D>()) bwd_dq_kernel(const AttnArgs a) {
  constexpr int DT = tile_dim<D>();
  using C = DqConfig<DT>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kThreads = C::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];

  const int seq = blockIdx.z, head = blockIdx.y;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int len_q = a.cu_q[seq + 1] - a.cu_q[seq];
  if (m0 >= len_q) return;
  const int len_k = a.cu_kv[seq + 1] - a.cu_kv[seq];
  const int64_t q_row0 = a.off_q[seq], k_row0 = a.off_kv[seq];
  const int diag = len_k - len_q;
  const int n_end = a.causal ? max(0, min(len_k, m0 + kBlockM + diag)) : len_k;
  const int n_tiles = (n_end + kBlockN - 1) / kBlockN;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t hd = int64_t{head} * D;
  const int wrow0 = m0 + warp * 16;
  const bool warp_active = wrow0 < len_q;
  const float sl2 = a.scale_log2;

  const uint32_t s_q = smem_addr(smem), s_do = s_q + C::kOffDo, s_kv = s_q + C::kOffKV;
  const __nv_bfloat16* k_base = a.k + k_row0 * a.row_stride + hd;
  const __nv_bfloat16* v_base = a.v + k_row0 * a.row_stride + hd;
  auto load_kv = [&](int n, int stage) {
    const int rows = min(kBlockN, len_k - n * kBlockN);
    const int64_t off = int64_t{n} * kBlockN * a.row_stride;
    load_tile<kBlockN, DT, kThreads, D>(s_kv + stage * C::kKVBytes, k_base + off, a.row_stride,
                                        rows, tid);
    load_tile<kBlockN, DT, kThreads, D>(s_kv + (2 + stage) * C::kKVBytes, v_base + off,
                                        a.row_stride, rows, tid);
  };

  // Per-row LSE (scaled to base 2; +inf for rows that see nothing) and delta of rows g and g + 8.
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wrow0 + g + 8 * r;
    const int64_t li = head * a.tq + q_row0 + row;
    const float l = row < len_q ? a.lse[li] : -INFINITY;
    lse2[r] = l == -INFINITY ? INFINITY : l * kLog2e;
    dlt[r] = row < len_q ? a.delta[li] : 0.f;
  }
  float dq[DT / 8][4];
#pragma unroll
  for (int i = 0; i < DT / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  if (n_tiles > 0) {
    const int rows = min(kBlockM, len_q - m0);
    const int64_t off = (q_row0 + m0) * a.row_stride + hd;
    load_tile<kBlockM, DT, kThreads, D>(s_q, a.q + off, a.row_stride, rows, tid);
    load_tile<kBlockM, DT, kThreads, D>(s_do, a.d_o + off, a.row_stride, rows, tid);
    load_kv(0, 0);
    cp_async_commit();
    for (int n = 0; n < n_tiles; ++n) {
      const int stage = n & 1;
      if (n + 1 < n_tiles) {
        load_kv(n + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const int n0 = n * kBlockN;
      const bool skip = !warp_active || (a.causal && n0 > wrow0 + 15 + diag);
      if (!skip) {
        const uint32_t s_k = s_kv + stage * C::kKVBytes;
        const uint32_t s_v = s_kv + (2 + stage) * C::kKVBytes;
        float s[kBlockN / 8][4], dp[kBlockN / 8][4];
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DT / 16; ++kk) {
          uint32_t qa[4], ga[4];
          load_a<DT>(qa, s_q, warp * 16, kk, lane);
          load_a<DT>(ga, s_do, warp * 16, kk, lane);
#pragma unroll
          for (int nb = 0; nb < kBlockN / 16; ++nb) {
            uint32_t b[4];
            load_b_rows<DT>(b, s_k, nb * 16, kk, lane);
            mma_bf16(s[2 * nb], qa, b[0], b[1]);
            mma_bf16(s[2 * nb + 1], qa, b[2], b[3]);
            load_b_rows<DT>(b, s_v, nb * 16, kk, lane);
            mma_bf16(dp[2 * nb], ga, b[0], b[1]);
            mma_bf16(dp[2 * nb + 1], ga, b[2], b[3]);
          }
        }
        const bool need_mask =
            n0 + kBlockN > len_k || (a.causal && n0 + kBlockN - 1 > wrow0 + diag);
#pragma unroll
        for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            float p = fast_exp2(fmaf(s[j][e], sl2, -lse2[r]));
            if (need_mask) {
              const int col = n0 + j * 8 + 2 * t + (e & 1), row = wrow0 + g + 8 * r;
              if (col >= len_k || (a.causal && col > row + diag)) p = 0.f;
            }
            s[j][e] = p * (dp[j][e] - dlt[r]);  // dS
          }
        }
        // dQ += dS K
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          const uint32_t da[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]),
                                  pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                  pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
          for (int nn = 0; nn < DT / 16; ++nn) {
            uint32_t b[4];
            load_b_cols<DT>(b, s_k, kk * 16, nn, lane);
            mma_bf16(dq[2 * nn], da, b[0], b[1]);
            mma_bf16(dq[2 * nn + 1], da, b[2], b[3]);
          }
        }
      }
      __syncthreads();
    }
  }

  if (!warp_active) return;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wrow0 + g + 8 * r;
    if (row >= len_q) continue;
    __nv_bfloat16* dst = a.out + (q_row0 + row) * a.row_stride + hd + 2 * t;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)  // the zero padding columns (D < DT) are not stored
      *reinterpret_cast<uint32_t*>(dst + i * 8) =
          pack_bf16(dq[i][2 * r] * a.scale, dq[i][2 * r + 1] * a.scale);
  }
}

// grid-stride over Tq * H * D / 4, block 256: dQ = bf16(scale * dq_accum), four elements a thread.
__global__ void dq_convert_kernel(const float* acc, __nv_bfloat16* dq, int64_t n4, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float4 v = reinterpret_cast<const float4*>(acc)[i];
    uint2 out;
    out.x = pack_bf16(v.x * scale, v.y * scale);
    out.y = pack_bf16(v.z * scale, v.w * scale);
    reinterpret_cast<uint2*>(dq)[i] = out;
  }
}

// Same for the wgmma kernels' bulk-reduced accumulator: [H, Tq, D] fp32 with 16-byte chunk c of
// row q stored at chunk c ^ (q % 8) (conflict-free staging in shared memory), D a multiple of 32.
__global__ void dq_convert_head_major_kernel(const float* acc, __nv_bfloat16* dq, int64_t tq,
                                             int heads, int dim, float scale) {
  const int chunks = dim / 4;
  const int64_t n4 = tq * heads * chunks;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n4;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % chunks);
    const int64_t rh = i / chunks;
    const int h = static_cast<int>(rh % heads);
    const int64_t q = rh / heads;
    const float4 v = reinterpret_cast<const float4*>(
        acc + (int64_t{h} * tq + q) * dim)[c ^ static_cast<int>(q & 7)];
    uint2 out;
    out.x = pack_bf16(v.x * scale, v.y * scale);
    out.y = pack_bf16(v.z * scale, v.w * scale);
    reinterpret_cast<uint2*>(dq)[i] = out;
  }
}

template <int D, class T, bool kAtomicDq>
void launch_dkdv(const AttnArgs& a, int max_seqlen_kv, int heads, int batch, cudaStream_t st) {
  using C = DkdvConfig<tile_dim<D>(), T, kAtomicDq>;
  const dim3 grid((max_seqlen_kv + C::kBlockN - 1) / C::kBlockN, heads, batch);
  if (grid.x == 0) return;
  auto kernel = bwd_dkdv_kernel<D, T, kAtomicDq>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  kernel<<<grid, C::kThreads, C::kSmem, st>>>(a);
  HELIX_LAUNCH_CHECK();
}

template <int D>
void launch_dq(const AttnArgs& a, int max_seqlen_q, int heads, int batch, cudaStream_t st) {
  using C = DqConfig<tile_dim<D>()>;
  const dim3 grid((max_seqlen_q + C::kBlockM - 1) / C::kBlockM, heads, batch);
  if (grid.x == 0) return;
  CUDA_CHECK(cudaFuncSetAttribute(bwd_dq_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  C::kSmem));
  bwd_dq_kernel<D><<<grid, C::kThreads, C::kSmem, st>>>(a);
  HELIX_LAUNCH_CHECK();
}

template <int D, class T>
void launch_bwd(const AttnArgs& a, const ThdAttentionLayout& b, int heads, bool atomic_dq,
                cudaStream_t st) {
  const int batch = b.cu_seqlens_q.batch();
  if (atomic_dq) {
    launch_dkdv<D, T, true>(a, b.max_seqlen_kv, heads, batch, st);
  } else {
    launch_dkdv<D, T, false>(a, b.max_seqlen_kv, heads, batch, st);
    launch_dq<D>(a, b.max_seqlen_q, heads, batch, st);
  }
}

// The deterministic dQ pass for head dim `dim` (used by the tiled-2D dK/dV kernel).
void launch_dq_pass(const AttnArgs& a, const ThdAttentionLayout& b, int heads, int dim,
                    cudaStream_t st) {
  const int batch = b.cu_seqlens_q.batch();
  switch (dim) {
    case 16:
      launch_dq<16>(a, b.max_seqlen_q, heads, batch, st);
      break;
    case 24:
      launch_dq<24>(a, b.max_seqlen_q, heads, batch, st);
      break;
    case 32:
      launch_dq<32>(a, b.max_seqlen_q, heads, batch, st);
      break;
    case 64:
      launch_dq<64>(a, b.max_seqlen_q, heads, batch, st);
      break;
    default:
      launch_dq<128>(a, b.max_seqlen_q, heads, batch, st);
  }
}

// kDefault: 128-key CTAs when the longest key sequence is longer than 2048, 64-key CTAs below.
// Measured on the H100 (docs/perf/attention.md, v4): 128-key CTAs gain 1-4% fwd+bwd on 4k/16k
// sequences and lose 4-6% on protein lengths (median 300), where a 128-key tile wastes more keys
// at sequence ends.
bool use_keys128(AttentionBwdTiling tiling, int max_seqlen_kv) {
  if (tiling == AttentionBwdTiling::kDefault) return max_seqlen_kv > 2048;
  return tiling == AttentionBwdTiling::kKeys128;
}

}  // namespace

namespace detail {

void thd_attention_bwd_cuda(const ThdAttentionBwdParams& p, const Stream& stream) {
  const int64_t tq = p.q.dim(0), tk = p.k.dim(0);
  const int heads = static_cast<int>(p.q.dim(1)), dim = static_cast<int>(p.q.dim(2));
  const bool atomic_dq = p.mode == AttentionBwdMode::kAtomic;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const Device dev = p.q.device();

  attention_tiles::AttnArgs a = make_attn_args(p.q, p.k, p.layout, p.softmax_scale, p.mask);
  a.v = reinterpret_cast<const __nv_bfloat16*>(p.v.data_ptr());
  a.o = reinterpret_cast<const __nv_bfloat16*>(p.o.data_ptr());
  a.d_o = reinterpret_cast<const __nv_bfloat16*>(p.d_o.data_ptr());
  a.out = reinterpret_cast<__nv_bfloat16*>(p.d_q.data_ptr());
  a.d_k = reinterpret_cast<__nv_bfloat16*>(p.d_k.data_ptr());
  a.d_v = reinterpret_cast<__nv_bfloat16*>(p.d_v.data_ptr());
  a.lse = p.lse.data<float>();  // read only in the backward

  Tensor delta = Tensor::empty({heads, tq}, DType::kF32, dev, stream);
  Tensor dq_accum;
  if (atomic_dq) dq_accum = Tensor::zeros({tq, heads, dim}, DType::kF32, dev, stream);
  a.delta = delta.data<float>();
  a.dq_accum = atomic_dq ? dq_accum.data<float>() : nullptr;

  if (tq > 0) {
    const unsigned blocks = static_cast<unsigned>((tq * heads + 31) / 32);
    const float* d_lse = p.d_lse.defined() ? p.d_lse.data<float>() : nullptr;
    float* dl = delta.data<float>();
    switch (dim) {
      case 16:
        bwd_delta_kernel<16><<<blocks, 256, 0, st>>>(a.o, a.d_o, d_lse, dl, tq, heads);
        break;
      case 24:
        bwd_delta_kernel<24><<<blocks, 256, 0, st>>>(a.o, a.d_o, d_lse, dl, tq, heads);
        break;
      case 32:
        bwd_delta_kernel<32><<<blocks, 256, 0, st>>>(a.o, a.d_o, d_lse, dl, tq, heads);
        break;
      case 64:
        bwd_delta_kernel<64><<<blocks, 256, 0, st>>>(a.o, a.d_o, d_lse, dl, tq, heads);
        break;
      default:
        bwd_delta_kernel<128><<<blocks, 256, 0, st>>>(a.o, a.d_o, d_lse, dl, tq, heads);
    }
    HELIX_LAUNCH_CHECK();
  }
  bool dq_head_major = false;  // dq_accum as [H, Tq, D] with swizzled 16-byte chunks
  if (p.layout.cu_seqlens_q.batch() > 0 && (tq > 0 || tk > 0)) {
    // 64-key CTAs (4 warps of 16 keys): query tiles of 64 rows at D <= 64 (at D = 16 the
    // atomic-dQ split needs 64: every warp then owns 16 query rows and all D / 8 columns), 32 at
    // D = 128 (registers). 128-key CTAs: 4 warps of 32 keys at D <= 64 (query tiles of 32 rows,
    // 64 at D = 16 where a 32-row tile is fewer 16-byte chunks than threads), 8 warps of 16 keys
    // at D = 128 (32 keys a warp would exceed the register file). See docs/perf/attention.md.
    // kDefault on an sm_90 GPU at D = 64 and 128: the wgmma kernel (docs/perf/attention.md v6).
    const bool wgmma = p.tiling == AttentionBwdTiling::kWgmma ||
                       (p.tiling == AttentionBwdTiling::kDefault && wgmma_supported(dev, dim));
    if (wgmma) {  // attention_sm90.cu; dQ pass from here
      HELIX_CHECK(wgmma_supported(dev, dim),
                  "thd_attention_bwd: AttentionBwdTiling::kWgmma needs head dim 64 or 128 on a "
                  "compute capability 9.0 GPU, got head dim {} on {}",
                  dim, dev.str());
      dq_head_major = launch_bwd_wgmma(a, p.layout.max_seqlen_kv, heads, dim,
                                       p.layout.cu_seqlens_q.batch(), atomic_dq, st);
      if (!atomic_dq) launch_dq_pass(a, p.layout, heads, dim, st);
    } else if (p.tiling == AttentionBwdTiling::kTiled2D) {  // attention_bwd_2d.cu; dQ pass here
      launch_bwd_tiled2d(a, p.layout, heads, dim, p.mode, stream);
      if (!atomic_dq) launch_dq_pass(a, p.layout, heads, dim, st);
    } else if (use_keys128(p.tiling, p.layout.max_seqlen_kv)) {
      switch (dim) {
        case 16:
          launch_bwd<16, DkdvTiling<64, 4, 2, 3>>(a, p.layout, heads, atomic_dq, st);
          break;
        case 24:
          launch_bwd<24, DkdvTiling<32, 4, 2, 3>>(a, p.layout, heads, atomic_dq, st);
          break;
        case 32:
          launch_bwd<32, DkdvTiling<32, 4, 2, 3>>(a, p.layout, heads, atomic_dq, st);
          break;
        case 64:
          launch_bwd<64, DkdvTiling<32, 4, 2, 2>>(a, p.layout, heads, atomic_dq, st);
          break;
        default:
          launch_bwd<128, DkdvTiling<32, 8, 1, 1>>(a, p.layout, heads, atomic_dq, st);
          break;
      }
    } else {
      switch (dim) {
        case 16:
          launch_bwd<16, DkdvTiling<64, 4, 1, bwd_min_blocks<16>()>>(a, p.layout, heads, atomic_dq,
                                                                    st);
          break;
        case 24:
          launch_bwd<24, DkdvTiling<64, 4, 1, bwd_min_blocks<24>()>>(a, p.layout, heads, atomic_dq,
                                                                    st);
          break;
        case 32:
          launch_bwd<32, DkdvTiling<64, 4, 1, bwd_min_blocks<32>()>>(a, p.layout, heads, atomic_dq,
                                                                    st);
          break;
        case 64:
          launch_bwd<64, DkdvTiling<64, 4, 1, bwd_min_blocks<64>()>>(a, p.layout, heads, atomic_dq,
                                                                    st);
          break;
        default:
          launch_bwd<128, DkdvTiling<32, 4, 1, bwd_min_blocks<128>()>>(a, p.layout, heads,
                                                                      atomic_dq, st);
          break;
      }
    }
  }
  if (atomic_dq && tq > 0) {
    const int64_t n4 = tq * heads * dim / 4;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n4 + 255) / 256, 132 * 16));
    if (dq_head_major)
      dq_convert_head_major_kernel<<<blocks, 256, 0, st>>>(a.dq_accum, a.out, tq, heads, dim,
                                                           p.softmax_scale);
    else
      dq_convert_kernel<<<blocks, 256, 0, st>>>(a.dq_accum, a.out, n4, p.softmax_scale);
    HELIX_LAUNCH_CHECK();
  } else {
    GapTargets q_gaps;
    q_gaps.x0 = a.out;
    zero_gap_rows_cuda(p.layout.cu_seqlens_q, p.layout.cu_seqlens_q_padded, tq, a.row_stride,
                       q_gaps, heads, stream);
  }
  GapTargets kv_gaps;
  kv_gaps.x0 = a.d_k;
  kv_gaps.x1 = a.d_v;
  zero_gap_rows_cuda(p.layout.cu_seqlens_kv, p.layout.cu_seqlens_kv_padded, tk, a.row_stride,
                     kv_gaps, heads, stream);
}

}  // namespace detail
}  // namespace helix
