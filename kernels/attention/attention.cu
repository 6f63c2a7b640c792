// CUDA forward of packed-THD attention (FlashAttention-2 style): one CTA per (query tile, head,
// sequence) over a grid sized by max_seqlen_q, CTAs past their sequence's end exit at once. Each
// warp owns 16 or 32 query rows; head dims 16, 24 (in zero-padded tiles of 32), 32, 64, 128; K/V
// tiles of 64 (or 32) keys stream through a two-stage cp.async pipeline; S = Q K^T and O += P V
// run on mma.sync bf16 tensor cores with fp32 accumulators and an fp32 online softmax. Also the
// gap kernel that zeroes rows belonging to no sequence (padding), shared with the backward.
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

constexpr int kFwdMTilesD64 = 2;     // m16 tiles per warp in the D = 64 forward
constexpr int kFwdMTilesSmallD = 2;  // ... at D = 16, 24, 32
// Resident CTAs per SM asked of the compiler (the register cap) at D = 16 and D = 24, 32: 4 CTAs
// (128 registers) spill 100-180 bytes at D = 32, none at D = 16.
constexpr int kFwdMinBlocksD16 = 4, kFwdMinBlocksD32 = 3;

// DT: the head dim of the shared-memory tiles (tile_dim<D>()).
template <int DT, int kWarps, int kMTiles, int kBlockN_ = 64>
struct FwdConfig {
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = 16 * kMTiles;      // query rows per warp (kMTiles m16 tiles)
  static constexpr int kBlockM = kWarpRows * kWarps;  // query rows per CTA
  static constexpr int kBlockN = kBlockN_;            // keys per K/V tile
  static constexpr int kQBytes = kBlockM * DT * 2;
  static constexpr int kKVBytes = kBlockN * DT * 2;
  static constexpr int kSmem = kQBytes + 4 * kKVBytes;  // Q + two stages of K and V
};

// grid (ceil(max_seqlen_q / kBlockM), H, b), block kWarps * 32 threads. blockIdx.x runs over query
// tiles in reverse (under a causal mask the last tiles carry the most work and start first). Warp w
// owns query rows [m0 + w kWarpRows, m0 + (w + 1) kWarpRows) of its sequence, as kMTiles m16 tiles
// that share every K and V fragment loaded from shared memory. D is the head dim of q/k/v; the
// tiles and fragments run at DT = tile_dim<D>() (D = 24: 32, zero columns 24..31 add nothing).
// kQSmem: the Q fragments are re-read from shared memory at every k-step instead of being held in
// registers for the whole K/V loop (frees kMTiles * D / 2 registers: what lets D = 128 run 32
// rows a warp).
template <int D, int kWarps, int kMTiles, int kMinBlocks, bool kQSmem, int kKeys>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks) fwd_kernel(const AttnArgs a) {
  constexpr int DT = tile_dim<D>();
  using C = FwdConfig<DT, kWarps, kMTiles, kKeys>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kThreads = C::kThreads;
  constexpr int kWarpRows = C::kWarpRows;
  extern __shared__ __align__(128) unsigned char smem[];

  const int seq = blockIdx.z, head = blockIdx.y;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int len_q = a.cu_q[seq + 1] - a.cu_q[seq];
  if (m0 >= len_q) return;
  const int len_k = a.cu_kv[seq + 1] - a.cu_kv[seq];
  const int64_t q_row0 = a.off_q[seq], k_row0 = a.off_kv[seq];
  const int diag = len_k - len_q;  // query i sees key j iff j <= i + diag (causal)
  const int n_end = a.causal ? max(0, min(len_k, m0 + kBlockM + diag)) : len_k;
  const int n_tiles = (n_end + kBlockN - 1) / kBlockN;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t hd = int64_t{head} * D;
  const int wrow0 = m0 + warp * kWarpRows;  // first query row of this warp, within the sequence
  const bool warp_active = wrow0 < len_q;
  const float sl2 = a.scale_log2;

  const uint32_t s_q = smem_addr(smem);
  const uint32_t s_kv = s_q + C::kQBytes;  // K stage s at s_kv + s*kKVBytes, V at s_kv + (2+s)*...
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

  float o_acc[kMTiles][DT / 8][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int i = 0; i < DT / 8; ++i)
      o_acc[mt][i][0] = o_acc[mt][i][1] = o_acc[mt][i][2] = o_acc[mt][i][3] = 0.f;
  float m_run[kMTiles][2], l_run[kMTiles][2];  // running max of the raw scores of rows g, g + 8;
#pragma unroll                                 // this lane's part of the softmax denominators
  for (int mt = 0; mt < kMTiles; ++mt) {
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  if (n_tiles > 0) {
    load_tile<kBlockM, DT, kThreads, D>(s_q, a.q + (q_row0 + m0) * a.row_stride + hd, a.row_stride,
                                        min(kBlockM, len_q - m0), tid);
    load_kv(0, 0);
    cp_async_commit();
    uint32_t q_frag[kQSmem ? 1 : kMTiles][kQSmem ? 1 : DT / 16][4];
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
      if constexpr (!kQSmem) {
        if (n == 0) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int kk = 0; kk < DT / 16; ++kk)
              load_a<DT>(q_frag[mt][kk], s_q, warp * kWarpRows + mt * 16, kk, lane);
        }
      }
      const int n0 = n * kBlockN;
      // A warp with no valid row, or whose rows all precede the tile's keys (causal), adds nothing.
      const bool skip = !warp_active || (a.causal && n0 > wrow0 + kWarpRows - 1 + diag);
      if (!skip) {
        const uint32_t s_k = s_kv + stage * C::kKVBytes;
        const uint32_t s_v = s_kv + (2 + stage) * C::kKVBytes;
        float s[kMTiles][kBlockN / 8][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int j = 0; j < kBlockN / 8; ++j)
            s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DT / 16; ++kk) {
          uint32_t qa[kQSmem ? kMTiles : 1][4];  // kQSmem: this k-step's Q fragments
          if constexpr (kQSmem) {
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt)
              load_a<DT>(qa[mt], s_q, warp * kWarpRows + mt * 16, kk, lane);
          }
#pragma unroll
          for (int nb = 0; nb < kBlockN / 16; ++nb) {
            uint32_t b[4];
            load_b_rows<DT>(b, s_k, nb * 16, kk, lane);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              const uint32_t(&qf)[4] =
                  kQSmem ? qa[kQSmem ? mt : 0] : q_frag[kQSmem ? 0 : mt][kQSmem ? 0 : kk];
              mma_bf16(s[mt][2 * nb], qf, b[0], b[1]);
              mma_bf16(s[mt][2 * nb + 1], qf, b[2], b[3]);
            }
          }
        }
        if (n0 + kBlockN > len_k || (a.causal && n0 + kBlockN - 1 > wrow0 + diag)) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int col = n0 + j * 8 + 2 * t + (e & 1);
                const int row = wrow0 + mt * 16 + g + 8 * (e >> 1);
                if (col >= len_k || (a.causal && col > row + diag)) s[mt][j][e] = -INFINITY;
              }
            }
          }
        }
        // Online softmax: rescale what was accumulated by exp(m_old - m_new), add this tile.
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j)
              mx = fmaxf(mx, fmaxf(s[mt][j][2 * r], s[mt][j][2 * r + 1]));
            const float m_new = fmaxf(m_run[mt][r], quad_max(mx));
            const float base = m_new == -INFINITY ? 0.f : m_new * sl2;  // no key yet: no NaN
            const float corr = fast_exp2(m_run[mt][r] * sl2 - base);
            m_run[mt][r] = m_new;
            l_run[mt][r] *= corr;
#pragma unroll
            for (int i = 0; i < DT / 8; ++i) {
              o_acc[mt][i][2 * r] *= corr;
              o_acc[mt][i][2 * r + 1] *= corr;
            }
#pragma unroll
            for (int j = 0; j < kBlockN / 8; ++j) {
              s[mt][j][2 * r] = fast_exp2(fmaf(s[mt][j][2 * r], sl2, -base));
              s[mt][j][2 * r + 1] = fast_exp2(fmaf(s[mt][j][2 * r + 1], sl2, -base));
              l_run[mt][r] += s[mt][j][2 * r] + s[mt][j][2 * r + 1];
            }
          }
        }
        // O += P V, P's A fragments taken straight from the score accumulators.
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t pa[kMTiles][4];
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            pa[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            pa[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            pa[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            pa[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
          }
#pragma unroll
          for (int nn = 0; nn < DT / 16; ++nn) {
            uint32_t b[4];
            load_b_cols<DT>(b, s_v, kk * 16, nn, lane);
#pragma unroll
            for (int mt = 0; mt < kMTiles; ++mt) {
              mma_bf16(o_acc[mt][2 * nn], pa[mt], b[0], b[1]);
              mma_bf16(o_acc[mt][2 * nn + 1], pa[mt], b[2], b[3]);
            }
          }
        }
      }
      __syncthreads();  // every warp is done with this stage before the next load overwrites it
    }
  }

  if (!warp_active) return;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = quad_sum(l_run[mt][r]);
      const int row = wrow0 + mt * 16 + g + 8 * r;
      if (row >= len_q) continue;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      __nv_bfloat16* out_row = a.out + (q_row0 + row) * a.row_stride + hd;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {  // columns of the zero padding (D < DT) are not stored
        *reinterpret_cast<uint32_t*>(out_row + i * 8 + 2 * t) =
            pack_bf16(o_acc[mt][i][2 * r] * inv, o_acc[mt][i][2 * r + 1] * inv);
      }
      if (t == 0)
        a.lse[head * a.tq + q_row0 + row] = l > 0.f ? m_run[mt][r] * a.scale + logf(l) : -INFINITY;
    }
  }
}

// grid (b), block 256: block i writes zeros into the rows of sequence i's gap, [off[i] + len_i,
// off[i+1]) (the last sequence's gap runs to total_rows), of up to three [T, H*D] bf16 tensors, and
// -inf into the gap's LSE entries when lse is given.
__global__ void zero_gaps_kernel(const int32_t* cu, const int32_t* off, int batch,
                                 int64_t total_rows, int64_t row_elems, __nv_bfloat16* x0,
                                 __nv_bfloat16* x1, __nv_bfloat16* x2, float* lse, int heads) {
  const int i = blockIdx.x;
  const int64_t begin = int64_t{off[i]} + (cu[i + 1] - cu[i]);
  const int64_t end = i + 1 < batch ? int64_t{off[i + 1]} : total_rows;
  if (end <= begin) return;
  const int64_t chunks = (end - begin) * row_elems / 8;  // 16-byte chunks (row_elems % 8 == 0)
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    if (x0) reinterpret_cast<uint4*>(x0 + begin * row_elems)[c] = zero;
    if (x1) reinterpret_cast<uint4*>(x1 + begin * row_elems)[c] = zero;
    if (x2) reinterpret_cast<uint4*>(x2 + begin * row_elems)[c] = zero;
  }
  if (lse) {
    const int64_t rows = end - begin;
    for (int64_t e = threadIdx.x; e < rows * heads; e += blockDim.x)
      lse[(e / rows) * total_rows + begin + e % rows] = -INFINITY;
  }
}

template <int D, int kWarps, int kMTiles, int kMinBlocks, bool kQSmem = false, int kKeys = 64>
void launch_fwd(const AttnArgs& a, int max_seqlen_q, int heads, int batch, cudaStream_t st) {
  using C = FwdConfig<tile_dim<D>(), kWarps, kMTiles, kKeys>;
  const dim3 grid((max_seqlen_q + C::kBlockM - 1) / C::kBlockM, heads, batch);
  if (grid.x == 0) return;
  auto kernel = fwd_kernel<D, kWarps, kMTiles, kMinBlocks, kQSmem, kKeys>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  kernel<<<grid, C::kThreads, C::kSmem, st>>>(a);
  HELIX_LAUNCH_CHECK();
}

}  // namespace

namespace detail {

AttnArgs make_attn_args(const Tensor& q, const Tensor& k, const ThdAttentionLayout& b, float scale,
                        AttentionMask mask) {
  AttnArgs a{};
  a.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  a.k = reinterpret_cast<const __nv_bfloat16*>(k.data_ptr());
  a.cu_q = b.cu_seqlens_q.device.data<int32_t>();
  a.cu_kv = b.cu_seqlens_kv.device.data<int32_t>();
  a.off_q = (b.cu_seqlens_q_padded.defined() ? b.cu_seqlens_q_padded : b.cu_seqlens_q)
                .device.data<int32_t>();
  a.off_kv = (b.cu_seqlens_kv_padded.defined() ? b.cu_seqlens_kv_padded : b.cu_seqlens_kv)
                 .device.data<int32_t>();
  a.row_stride = q.dim(1) * q.dim(2);
  a.tq = q.dim(0);
  a.scale = scale;
  a.scale_log2 = scale * kLog2e;
  a.causal = mask == AttentionMask::kCausal ? 1 : 0;
  return a;
}

void zero_gap_rows_cuda(const CuSeqlens& cu, const CuSeqlens& padded, int64_t total_rows,
                        int64_t row_elems, const GapTargets& targets, int heads,
                        const Stream& stream) {
  if (thd_gap_rows(cu, padded, total_rows).empty()) return;
  const CuSeqlens& off = padded.defined() ? padded : cu;
  zero_gaps_kernel<<<cu.batch(), 256, 0, static_cast<cudaStream_t>(stream.handle())>>>(
      cu.device.data<int32_t>(), off.device.data<int32_t>(), cu.batch(), total_rows, row_elems,
      targets.x0, targets.x1, targets.x2, targets.lse, heads);
  HELIX_LAUNCH_CHECK();
}

void thd_attention_fwd_cuda(const ThdAttentionFwdParams& p, const Stream& stream) {
  const int64_t tq = p.q.dim(0);
  const int heads = static_cast<int>(p.q.dim(1)), dim = static_cast<int>(p.q.dim(2));
  AttnArgs a = make_attn_args(p.q, p.k, p.layout, p.softmax_scale, p.mask);
  a.v = reinterpret_cast<const __nv_bfloat16*>(p.v.data_ptr());
  a.out = reinterpret_cast<__nv_bfloat16*>(p.o.data_ptr());
  a.lse = p.lse.data<float>();
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const int batch = p.layout.cu_seqlens_q.batch();
  if (tq > 0 &&
      batch > 0) {  // a sequence without keys reads no K/V: its rows get O = 0, LSE = -inf
    // D = 64: 32 query rows per warp (K/V fragments shared by two m16 tiles); D = 128: 16 rows per
    // warp (two tiles with Q in registers would exceed the register file), or 32 with Q re-read
    // from shared memory (AttentionFwdTiling::kRows32). See docs/perf/attention.md. D <= 32 (ESM-2
    // 8M/35M/150M): 32 rows per warp as at 64, fewer registers, more resident CTAs.
    const int msq = p.layout.max_seqlen_q;
    // kDefault on an sm_90 GPU at D = 64 and 128: the wgmma kernel (measured faster at every
    // shape of the benchmark, docs/perf/attention.md v6).
    const bool wgmma = p.tiling == AttentionFwdTiling::kWgmma ||
                       (p.tiling == AttentionFwdTiling::kDefault && wgmma_supported(p.q.device(), dim));
    if (wgmma) {
      HELIX_CHECK(wgmma_supported(p.q.device(), dim),
                  "thd_attention_fwd: AttentionFwdTiling::kWgmma needs head dim 64 or 128 on a "
                  "compute capability 9.0 GPU, got head dim {} on {}",
                  dim, p.q.device().str());
      launch_fwd_wgmma(a, p.k.dim(0), msq, heads, dim, batch, st);
    } else {
      switch (dim) {
        case 16:
          launch_fwd<16, 4, kFwdMTilesSmallD, kFwdMinBlocksD16>(a, msq, heads, batch, st);
          break;
        case 24:
          launch_fwd<24, 4, kFwdMTilesSmallD, kFwdMinBlocksD32>(a, msq, heads, batch, st);
          break;
        case 32:
          launch_fwd<32, 4, kFwdMTilesSmallD, kFwdMinBlocksD32>(a, msq, heads, batch, st);
          break;
        case 64:
          launch_fwd<64, 4, kFwdMTilesD64, 2>(a, msq, heads, batch, st);
          break;
        default:
          // kRows32: K/V tiles of 32 keys (with 64, the scores of two m16 tiles spill 124 bytes).
          if (p.tiling != AttentionFwdTiling::kRows16)  // kDefault: rows32, measured faster at D = 128
            launch_fwd<128, 4, 2, 2, /*kQSmem=*/true, /*kKeys=*/32>(a, msq, heads, batch, st);
          else
            launch_fwd<128, 4, 1, 2>(a, msq, heads, batch, st);
          break;
      }
    }
  }
  GapTargets gaps;
  gaps.x0 = a.out;
  gaps.lse = a.lse;
  zero_gap_rows_cuda(p.layout.cu_seqlens_q, p.layout.cu_seqlens_q_padded, tq, a.row_stride, gaps,
                     heads, stream);
}

}  // namespace detail
}  // namespace helix
