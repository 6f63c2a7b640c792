// Hopper (sm_90a) packed-THD attention on warpgroup MMAs (wgmma): the forward and the dK/dV (+
// bulk-reduced dQ) backward at head dims 64 and 128 (AttentionFwdTiling::kWgmma,
// AttentionBwdTiling::kWgmma). Same semantics, masks, gap handling and error bounds as the
// mma.sync kernels in attention.cu / attention_bwd.cu; what changes is the tensor-core
// instruction: one warpgroup (the whole 128-thread CTA) issues 64 x N x 16 products straight from
// 128-byte-swizzled shared-memory tiles (attention_wgmma.cuh), instead of each warp feeding
// 16 x 8 x 16 products from ldmatrix fragments. Several independent CTAs per SM (forward: 4 at
// D = 64, 2 at D = 128) let one CTA's softmax run while another's MMAs do.
//
// Loads: full 64-row tiles (K/V in the forward, Q/dO in the backward) by TMA bulk tensor copies
// that one thread issues and the warps await on an mbarrier per slot; a sequence's partial last
// tile, the backward's K/V and LSE/delta, and the forward's Q by cp.async (zero-filling rows past
// the sequence end).
// Forward: CTA = 64 query rows of one (sequence, head); K/V tiles of 64 keys, K and V each in two
// slots. Per tile: S = Q K^T (wgmma, both operands K-major), mask and online softmax in
// registers as in attention.cu, O += P V (wgmma, P from the score registers, V MN-major). Software
// pipelined within the warpgroup: S_n is issued, then O += P_{n-1} V_{n-1}, and tile n's softmax
// runs while the second product is on the tensor cores.
// Backward: CTA = 64 keys of one (sequence, head) at D = 64 (bwd_wgmma_kernel, 3 CTAs per SM), 128
// keys in two warpgroups at D = 128 (bwd_wgmma2_kernel, 1 CTA per SM); walks the 64-row query
// tiles that see them (two-stage cp.async pipeline for Q, dO, LSE, delta). Per tile and
// warpgroup: S^T = K Q^T and dP^T = V dO^T (wgmma, K-major; P^T is computed while dP^T is still
// on the tensor cores), dS^T in registers, dV += P^T dO and dK += dS^T Q (wgmma, A from
// registers, dO / Q MN-major). In atomic mode dS^T goes to shared memory, dQ_tile = dS K
// (wgmma, dS^T and K both MN-major) is staged in shared memory as fp32 and added into the
// accumulator by bulk reduce-add (cp.reduce.async.bulk: the L2 adds whole lines; float2 atomics
// from registers made this the limit at D = 64, docs/perf/attention.md v7). The accumulator is
// then head-major [H, Tq, D] with 16-byte chunks swizzled by row (launch_bwd_wgmma returns true
// and the caller converts that layout). In deterministic mode the caller runs the mma.sync dQ
// pass.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cuda.h>
#include <cudaTypedefs.h>

#include <cmath>

#include "core/cuda_check.h"
#include "core/error.h"
#include "kernels/attention/attention.h"
#include "kernels/attention/attention_cuda.h"
#include "kernels/attention/attention_tiles.cuh"
#include "kernels/attention/attention_wgmma.cuh"

namespace helix {
namespace {

using attention_tiles::AttnArgs;
using attention_tiles::cp_async_4;
using attention_tiles::cp_async_commit;
using attention_tiles::cp_async_wait;
using attention_tiles::fast_exp2;
using attention_tiles::kLog2e;
using attention_tiles::pack_bf16;
using attention_tiles::quad_max;
using attention_tiles::quad_sum;
using attention_tiles::smem_addr;
using namespace attention_wgmma;

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HELIX_WGMMA_DEVICE 1
#else
#define HELIX_WGMMA_DEVICE 0
#endif

template <int D, int kBlockN_, int kKSlots_>
struct WgFwdConfig {
  static constexpr int kThreads = 128;  // one warpgroup
  static constexpr int kBlockM = 64;    // query rows per CTA (16 a warp)
  static constexpr int kBlockN = kBlockN_;  // keys per K/V tile
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kKVBytes = kBlockN * D * 2;
  static constexpr int kKSlots = kKSlots_;  // K tiles in flight (V: two slots)
  // Q + the K and V slots, + 1024 bytes to align the tiles to the swizzle's 1024-byte period, +
  // one mbarrier per slot.
  static constexpr int kSmem = kQBytes + (kKSlots + 2) * kKVBytes + 1024 + 64;
};

// grid (ceil(max_seqlen_q / 64), H, b), block 128. blockIdx.x runs over query tiles in reverse (the
// causal mask's heaviest tiles first). Warp w owns query rows m0 + 16 w + {g, g + 8}.
template <int D, int kKeys, int kMinBlocks, int kKSlots>
__global__ void __launch_bounds__(128, kMinBlocks)
    fwd_wgmma_kernel(const AttnArgs a, const __grid_constant__ CUtensorMap tmap_k,
                     const __grid_constant__ CUtensorMap tmap_v) {
#if HELIX_WGMMA_DEVICE
  using C = WgFwdConfig<D, kKeys, kKSlots>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kThreads = C::kThreads;
  extern __shared__ unsigned char smem_raw[];

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
  const int wrow0 = m0 + warp * 16;  // this warp's first query row, within the sequence
  const float sl2 = a.scale_log2;

  const uint32_t s_q = (smem_addr(smem_raw) + 1023u) & ~1023u;
  // Slots: K tile j at s_k0 + (j % kKSlots) * kKVBytes, V tile j at s_v0 + (j & 1) * kKVBytes.
  const uint32_t s_k0 = s_q + C::kQBytes, s_v0 = s_k0 + kKSlots * C::kKVBytes;
  const __nv_bfloat16* k_base = a.k + k_row0 * a.row_stride + hd;
  const __nv_bfloat16* v_base = a.v + k_row0 * a.row_stride + hd;
  // Full K/V tiles come by bulk tensor copy (TMA), issued by thread 0 and awaited on the slot's
  // mbarrier (K tile n is the (n / kKSlots)-th load into its slot: phase parity (n / kKSlots) % 2;
  // V likewise with two slots). A partial tile (only the last one can be) takes the cp.async
  // path, which zero-fills the rows past the sequence (TMA fills zeros only outside the whole
  // tensor; the rows after a sequence belong to the next one or to a padding gap).
  const uint32_t bar0 = s_v0 + 2 * C::kKVBytes;  // K slot i: bar0 + 8 i; V slot i: bar0 + 32 + 8 i
  auto full_tile = [&](int n) { return (n + 1) * kBlockN <= len_k; };
  auto load_k_or_v = [&](bool is_v, int n) {
    const int slot = is_v ? (n & 1) : (n % kKSlots);
    const uint32_t dst = (is_v ? s_v0 : s_k0) + slot * C::kKVBytes;
    if (full_tile(n)) {
      if (tid == 0) {
        const uint32_t bar = bar0 + (is_v ? 32 : 0) + slot * 8;
        mbar_expect_tx(bar, C::kKVBytes);
#pragma unroll
        for (int cb = 0; cb < D / 64; ++cb)
          tma_load_2d(dst + cb * (kBlockN * 128), is_v ? &tmap_v : &tmap_k, head * D + cb * 64,
                      static_cast<int>(k_row0) + n * kBlockN, bar);
      }
      return;
    }
    const int rows = min(kBlockN, len_k - n * kBlockN);
    const __nv_bfloat16* src = (is_v ? v_base : k_base) + int64_t{n} * kBlockN * a.row_stride;
    load_tile<kBlockN, D, kThreads>(dst, src, a.row_stride, rows, tid);
  };
  auto await_k = [&](int n) {
    if (full_tile(n)) mbar_wait(bar0 + (n % kKSlots) * 8, (n / kKSlots) & 1);
  };
  auto await_v = [&](int n) {
    if (full_tile(n)) mbar_wait(bar0 + 32 + (n & 1) * 8, (n >> 1) & 1);
  };

  float o_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o_acc[i][0] = o_acc[i][1] = o_acc[i][2] = o_acc[i][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float s[kBlockN / 8][4];      // scores of the current tile
  uint32_t pa[kBlockN / 16][4];  // P of the previous tile (bf16 A fragments)

  // S = Q K_n^T into s (issued, not awaited).
  auto issue_s = [&](int n) {
    const uint32_t s_k = s_k0 + (n % kKSlots) * C::kKVBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss<kBlockN, 0, 0>(s, desc_kmajor<kBlockM>(s_q, kk), desc_kmajor<kBlockN>(s_k, kk),
                              kk > 0);
    wgmma_commit();
  };
  // O += P_n V_n with P_n in pa (issued, not awaited).
  auto issue_pv = [&](int n) {
    const uint32_t s_v = s_v0 + (n & 1) * C::kKVBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk)
      wgmma_rs<D, 1>(o_acc, pa[kk], desc_mnmajor<kBlockN>(s_v, kk), 1);
    wgmma_commit();
  };
  // Mask tile n's scores, update the running max and sum; corr[r] gets the factor that rescales
  // what O holds (exp(m_old - m_new)); s becomes P (unnormalised, fp32).
  auto softmax = [&](int n, float (&corr)[2]) {
    const int n0 = n * kBlockN;
    if (n0 + kBlockN > len_k || (a.causal && n0 + kBlockN - 1 > wrow0 + diag)) {
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = n0 + j * 8 + 2 * t + (e & 1);
          const int row = wrow0 + g + 8 * (e >> 1);
          if (col >= len_k || (a.causal && col > row + diag)) s[j][e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      const float m_new = fmaxf(m_run[r], quad_max(mx));
      const float base = m_new == -INFINITY ? 0.f : m_new * sl2;  // no key yet: no NaN
      corr[r] = fast_exp2(m_run[r] * sl2 - base);
      m_run[r] = m_new;
      l_run[r] *= corr[r];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        s[j][2 * r] = fast_exp2(fmaf(s[j][2 * r], sl2, -base));
        s[j][2 * r + 1] = fast_exp2(fmaf(s[j][2 * r + 1], sl2, -base));
        l_run[r] += s[j][2 * r] + s[j][2 * r + 1];
      }
    }
  };
  auto pack_p = [&] {
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      pa[kk][0] = pack_bf16(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = pack_bf16(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
  };

  if (n_tiles > 0) {
    // Software pipeline (one warpgroup): while the tensor cores run O += P_{n-1} V_{n-1}, the
    // warps compute tile n's softmax; S_n = Q K_n^T is issued first. Loads run one tile ahead:
    // during step n, V_n and K_{n+1} (their slots were last read by PV_{n-2} and S_{n-1}, both
    // complete on every warp at step n's barrier).
    if (tid == 0) {
#pragma unroll
      for (int i = 0; i < kKSlots; ++i) mbar_init(bar0 + 8 * i, 1);
      mbar_init(bar0 + 32, 1);
      mbar_init(bar0 + 40, 1);
      fence_mbar_init();
    }
    __syncwarp();  // as in the backward: init before lane 0's first arrive
    load_tile<kBlockM, D, kThreads>(s_q, a.q + (q_row0 + m0) * a.row_stride + hd, a.row_stride,
                                    min(kBlockM, len_q - m0), tid);
    for (int j = 0; j < kKSlots - 1 && j < n_tiles; ++j) load_k_or_v(false, j);
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();  // this thread's cp.async writes, visible to wgmma after the barrier
    __syncthreads();
    await_k(0);
    issue_s(0);
    load_k_or_v(true, 0);
    if (kKSlots - 1 < n_tiles) load_k_or_v(false, kKSlots - 1);
    cp_async_commit();
    wgmma_wait<0>();
    fence_regs(s);
    float corr[2];
    softmax(0, corr);  // O is still zero: no rescale
    pack_p();
    for (int n = 1; n < n_tiles; ++n) {
      cp_async_wait<0>();  // V_{n-1} and K_n (cp.async: partial tiles only)
      fence_proxy_async();
      __syncthreads();
      await_k(n);
      issue_s(n);
      await_v(n - 1);
      issue_pv(n - 1);
      load_k_or_v(true, n);
      if (n + kKSlots - 1 < n_tiles) load_k_or_v(false, n + kKSlots - 1);
      cp_async_commit();
      wgmma_wait<1>();  // S_n done; PV_{n-1} may still run
      fence_regs(s);
      softmax(n, corr);
      wgmma_wait<0>();  // PV_{n-1} done: O and pa are free
      fence_regs(o_acc);
      fence_regs(pa);
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          o_acc[i][2 * r] *= corr[r];
          o_acc[i][2 * r + 1] *= corr[r];
        }
      pack_p();
    }
    cp_async_wait<0>();  // V of the last tile
    fence_proxy_async();
    __syncthreads();
    await_v(n_tiles - 1);
    issue_pv(n_tiles - 1);
    wgmma_wait<0>();
    fence_regs(o_acc);
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_run[r]);
    const int row = wrow0 + g + 8 * r;
    if (row >= len_q) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    __nv_bfloat16* out_row = a.out + (q_row0 + row) * a.row_stride + hd;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(out_row + i * 8 + 2 * t) =
          pack_bf16(o_acc[i][2 * r] * inv, o_acc[i][2 * r + 1] * inv);
    if (t == 0)
      a.lse[head * a.tq + q_row0 + row] = l > 0.f ? m_run[r] * a.scale + logf(l) : -INFINITY;
  }
#else
  __trap();  // launched only on sm_90 devices (wgmma_supported)
#endif
}

// Backward: the Q and dO rows mq0 .. mq0 + rows - 1 of one (sequence, head) into the 64-row tiles
// at s_qt / s_dot. A full tile: TMA by thread 0, completing on `bar`; the sequence's last, partial
// tile: cp.async by all kThreads threads, zero-filling the rows past its end (the caller waits for
// those with cp.async.wait_group and a barrier).
template <int D, int kThreads>
__device__ __forceinline__ void load_q_do_tiles(const AttnArgs& a, const CUtensorMap& tmap_q,
                                                const CUtensorMap& tmap_do, uint32_t s_qt,
                                                uint32_t s_dot, uint32_t bar, int head,
                                                int64_t q_row0, int mq0, int rows, int tid) {
  constexpr int kRows = 64, kTileBytes = kRows * D * 2;
  if (rows == kRows) {
    if (tid == 0) {
      mbar_expect_tx(bar, 2 * kTileBytes);
#pragma unroll
      for (int cb = 0; cb < D / 64; ++cb) {
        tma_load_2d(s_qt + cb * kRows * 128, &tmap_q, head * D + cb * 64,
                    static_cast<int>(q_row0) + mq0, bar);
        tma_load_2d(s_dot + cb * kRows * 128, &tmap_do, head * D + cb * 64,
                    static_cast<int>(q_row0) + mq0, bar);
      }
    }
  } else {
    const int64_t off = (q_row0 + mq0) * a.row_stride + int64_t{head} * D;
    load_tile<kRows, D, kThreads>(s_qt, a.q + off, a.row_stride, rows, tid);
    load_tile<kRows, D, kThreads>(s_dot, a.d_o + off, a.row_stride, rows, tid);
  }
}

template <int D>
struct WgBwdConfig {
  static constexpr int kThreads = 128;
  static constexpr int kBlockN = 64;  // keys per CTA (16 a warp)
  static constexpr int kBlockM = 64;  // query rows per step
  static constexpr int kTileBytes = 64 * D * 2;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kTileBytes;
  static constexpr int kOffQ = 2 * kTileBytes;       // two stages
  static constexpr int kOffDo = 4 * kTileBytes;      // two stages
  static constexpr int kOffDs = 6 * kTileBytes;      // dS^T [64 keys][64 queries] bf16
  static constexpr int kOffLse = kOffDs + 64 * 128;  // two stages of 64 floats
  static constexpr int kOffDelta = kOffLse + 2 * kBlockM * 4;
  static constexpr int kOffBar = kOffDelta + 2 * kBlockM * 4;  // two mbarriers (Q/dO stages)
  static constexpr int kOffDq = kOffBar + 128;                 // fp32 [64][D] (bulk dQ only)
  static constexpr int kSmem = kOffBar + 16 + 1024;            // + alignment slack
  static constexpr int kSmemBulk = kOffDq + kBlockM * D * 4 + 1024;
};

// grid (ceil(max_seqlen_kv / 64), H, b), block 128: warp w owns keys n0 + 16 w + {g, g + 8} and
// their dK, dV rows (written once: deterministic).
template <int D, bool kAtomicDq, int kMinBlocks>
__global__ void __launch_bounds__(128, kMinBlocks)
    bwd_wgmma_kernel(const AttnArgs a, const __grid_constant__ CUtensorMap tmap_q,
                     const __grid_constant__ CUtensorMap tmap_do) {
#if HELIX_WGMMA_DEVICE
  using C = WgBwdConfig<D>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kThreads = C::kThreads;
  extern __shared__ unsigned char smem_raw[];

  const int seq = blockIdx.z, head = blockIdx.y;
  const int n0 = blockIdx.x * kBlockN;
  const int len_k = a.cu_kv[seq + 1] - a.cu_kv[seq];
  if (n0 >= len_k) return;
  const int len_q = a.cu_q[seq + 1] - a.cu_q[seq];
  const int64_t q_row0 = a.off_q[seq], k_row0 = a.off_kv[seq];
  const int diag = len_k - len_q;  // query i sees key j iff j <= i + diag (causal)
  const int m_first = a.causal ? max(0, n0 - diag) / kBlockM : 0;
  const int m_tiles = (len_q + kBlockM - 1) / kBlockM;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t hd = int64_t{head} * D;
  const int wkey0 = n0 + warp * 16;  // first key of this warp, within the sequence
  const float sl2 = a.scale_log2;

  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - smem_addr(smem_raw));
  const uint32_t s_k = base + C::kOffK, s_v = base + C::kOffV, s_ds = base + C::kOffDs;
  float* s_lse = reinterpret_cast<float*>(smem + C::kOffLse);
  float* s_delta = reinterpret_cast<float*>(smem + C::kOffDelta);

  auto load_q_tile = [&](int m, int stage) {
    const int mq0 = m * kBlockM;
    const int rows = min(kBlockM, len_q - mq0);
    static_assert(kBlockM == 64, "load_q_do_tiles moves 64-row tiles");
    load_q_do_tiles<D, kThreads>(a, tmap_q, tmap_do, base + C::kOffQ + stage * C::kTileBytes,
                                 base + C::kOffDo + stage * C::kTileBytes,
                                 base + C::kOffBar + 8 * stage, head, q_row0, mq0, rows, tid);
    // LSE and delta rows by cp.async too (a plain load would stall the warp until it returns);
    // rows past the sequence are zero-filled (masked at use).
    static_assert(2 * kBlockM <= kThreads, "one LSE or delta entry a thread");
    if (tid < 2 * kBlockM) {
      const int i = tid % kBlockM;
      const float* src = (tid < kBlockM ? a.lse : a.delta) + head * a.tq + q_row0 + mq0;
      const uint32_t dst = smem_addr((tid < kBlockM ? s_lse : s_delta) + stage * kBlockM + i);
      cp_async_4(dst, i < rows ? src + i : src, i < rows);
    }
  };

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  {
    const int rows = min(kBlockN, len_k - n0);
    const int64_t off = (k_row0 + n0) * a.row_stride + hd;
    load_tile<kBlockN, D, kThreads>(s_k, a.k + off, a.row_stride, rows, tid);
    load_tile<kBlockN, D, kThreads>(s_v, a.v + off, a.row_stride, rows, tid);
  }
  if (tid == 0) {
    mbar_init(base + C::kOffBar, 1);
    mbar_init(base + C::kOffBar + 8, 1);
    fence_mbar_init();
  }
  __syncwarp();  // the init is issued for the warp; order it before lane 0's first arrive
  if (m_first < m_tiles) load_q_tile(m_first, 0);
  cp_async_commit();

  for (int m = m_first; m < m_tiles; ++m) {
    const int stage = (m - m_first) & 1;
    cp_async_wait<0>();  // tile m (issued one step ahead)
    fence_proxy_async();
    __syncthreads();  // tile m visible; every warp is done with step m - 1 (its stage, dS tile)
    if (m + 1 < m_tiles) {
      load_q_tile(m + 1, stage ^ 1);
      cp_async_commit();
    }
    const int mq0 = m * kBlockM;
    // Tile m's TMA (a full tile is the ((m - m_first) / 2)-th load into its stage).
    if (mq0 + kBlockM <= len_q) mbar_wait(base + C::kOffBar + 8 * stage, ((m - m_first) >> 1) & 1);
    const uint32_t s_q = base + C::kOffQ + stage * C::kTileBytes;
    const uint32_t s_do = base + C::kOffDo + stage * C::kTileBytes;

    // S^T = K Q^T and dP^T = V dO^T: rows = this CTA's 64 keys, columns = the tile's 64 queries.
    float st[kBlockM / 8][4], dpt[kBlockM / 8][4];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss<kBlockM, 0, 0>(st, desc_kmajor<kBlockN>(s_k, kk), desc_kmajor<kBlockM>(s_q, kk),
                              kk > 0);
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss<kBlockM, 0, 0>(dpt, desc_kmajor<kBlockN>(s_v, kk), desc_kmajor<kBlockM>(s_do, kk),
                              kk > 0);
    wgmma_commit();
    wgmma_wait<1>();
    fence_regs(st);

    const bool need_mask = mq0 + kBlockM > len_q || wkey0 + 16 > len_k ||
                           (a.causal && wkey0 + 15 > mq0 + diag);
    // P^T = exp(scale S^T - LSE) and dS^T = P^T (dP^T - delta), in place.
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qi = j * 8 + 2 * t + (e & 1);  // query within the tile
        // exp2(S * scale_log2 - lse * log2e); an empty row (lse = -inf) must give P = 0, not inf.
        const float l = s_lse[stage * kBlockM + qi];
        const float lse2 = l == -INFINITY ? INFINITY : l * kLog2e;
        float p = fast_exp2(fmaf(st[j][e], sl2, -lse2));
        if (need_mask) {
          const int key = wkey0 + g + 8 * (e >> 1), query = mq0 + qi;
          if (query >= len_q || key >= len_k || (a.causal && key > query + diag)) p = 0.f;
        }
        st[j][e] = p;
      }
    }
    wgmma_wait<0>();
    fence_regs(dpt);
#pragma unroll
    for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        dpt[j][e] = st[j][e] * (dpt[j][e] - s_delta[stage * kBlockM + j * 8 + 2 * t + (e & 1)]);
    // dV += P^T dO and dK += dS^T Q (scale applied at the end): A from registers, dO / Q MN-major.
    uint32_t pa[kBlockM / 16][4], da[kBlockM / 16][4];
#pragma unroll
    for (int kq = 0; kq < kBlockM / 16; ++kq) {
      pa[kq][0] = pack_bf16(st[2 * kq][0], st[2 * kq][1]);
      pa[kq][1] = pack_bf16(st[2 * kq][2], st[2 * kq][3]);
      pa[kq][2] = pack_bf16(st[2 * kq + 1][0], st[2 * kq + 1][1]);
      pa[kq][3] = pack_bf16(st[2 * kq + 1][2], st[2 * kq + 1][3]);
      da[kq][0] = pack_bf16(dpt[2 * kq][0], dpt[2 * kq][1]);
      da[kq][1] = pack_bf16(dpt[2 * kq][2], dpt[2 * kq][3]);
      da[kq][2] = pack_bf16(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]);
      da[kq][3] = pack_bf16(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3]);
    }
    wgmma_fence();
#pragma unroll
    for (int kq = 0; kq < kBlockM / 16; ++kq)
      wgmma_rs<D, 1>(dv, pa[kq], desc_mnmajor<kBlockM>(s_do, kq), 1);
#pragma unroll
    for (int kq = 0; kq < kBlockM / 16; ++kq)
      wgmma_rs<D, 1>(dk, da[kq], desc_mnmajor<kBlockM>(s_q, kq), 1);
    wgmma_commit();

    if constexpr (kAtomicDq) {
      // dS^T to shared memory as a [key][query] tile (128-byte rows, swizzled): row = key, so
      // for dQ = dS K it is an MN-major A operand (M = queries contiguous, k = keys down the rows).
#pragma unroll
      for (int kq = 0; kq < kBlockM / 16; ++kq) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = warp * 16 + g + 8 * r;
#pragma unroll
          for (int h = 0; h < 2; ++h) {  // 8-query chunk 2 kq + h: da[kq][r + 2 h]
            const uint32_t addr = s_ds + sw128<kBlockN>(row, 2 * kq + h) + 4 * t;
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(da[kq][r + 2 * h])
                         : "memory");
          }
        }
      }
      fence_proxy_async();
      // The warp's dQ staging rows: its previous bulk reduction has read them.
      if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
      __syncthreads();
      // dV / dK done before dQ starts: frees the P^T / dS^T fragments (the register budget of 2-3
      // CTAs per SM holds dK, dV and dQ, not the fragments as well).
      wgmma_wait<0>();
      fence_regs(dk);
      fence_regs(dv);
      fence_regs(pa);
      fence_regs(da);
      float dq[D / 8][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        wgmma_ss<D, 1, 1>(dq, desc_mnmajor<kBlockN>(s_ds, kk), desc_mnmajor<kBlockN>(s_k, kk),
                          kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(dq);
      // The warp's 16 rows to its staging rows (fp32, the head-major swizzled layout of
      // dq_accum: 16-byte chunk c of global row q at c ^ (q % 8)), then one bulk reduce-add of
      // those rows into dq_accum by lane 0 (asynchronous: the L2 adds whole lines).
      const uint32_t s_dq = base + C::kOffDq;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int lr = warp * 16 + g + 8 * r;
        const int q7 = static_cast<int>((q_row0 + mq0 + lr) & 7);
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          const uint32_t addr =
              s_dq + lr * (D * 4) + (((2 * i + (t >> 1)) ^ q7) << 4) + (t & 1) * 8;
          asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(dq[i][2 * r]),
                       "f"(dq[i][2 * r + 1])
                       : "memory");
        }
      }
      fence_proxy_async();
      __syncwarp();
      const int rows = min(16, len_q - (mq0 + warp * 16));
      if (lane == 0 && rows > 0) {
        float* dst = a.dq_accum + (int64_t{head} * a.tq + q_row0 + mq0 + warp * 16) * D;
        asm volatile(
            "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
            "cp.async.bulk.commit_group;\n" ::"l"(dst),
            "r"(s_dq + warp * 16 * (D * 4)), "r"(rows * D * 4)
            : "memory");
      }
    } else {
      wgmma_wait<0>();
      fence_regs(dk);
      fence_regs(dv);
      fence_regs(pa);
      fence_regs(da);
    }
  }
  cp_async_wait<0>();  // nothing may stay in flight when the CTA exits (no query tile case)
  if constexpr (kAtomicDq)  // the last bulk reduction has completed
    if (lane == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = wkey0 + g + 8 * r;
    if (key >= len_k) continue;
    const int64_t off = (k_row0 + key) * a.row_stride + hd + 2 * t;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<uint32_t*>(a.d_k + off + i * 8) =
          pack_bf16(dk[i][2 * r] * a.scale, dk[i][2 * r + 1] * a.scale);
      *reinterpret_cast<uint32_t*>(a.d_v + off + i * 8) = pack_bf16(dv[i][2 * r], dv[i][2 * r + 1]);
    }
  }
#else
  __trap();  // launched only on sm_90 devices (wgmma_supported)
#endif
}

// Backward with 128-key CTAs of two warpgroups: warpgroup w owns keys n0 + 64 w .. + 63 (S^T,
// dP^T, dV, dK as in bwd_wgmma_kernel) and both share each step's Q / dO / LSE / delta tiles; dS^T
// of all 128 keys goes to one [key][query] tile and dQ_tile = dS K is split by columns (warpgroup
// w: columns w D / 2 .. + D / 2 - 1, over all 128 keys). Against two 64-key CTAs this halves the
// dQ reduce-adds and the Q / dO tile loads per key (the L2 traffic that bounds the backward on long
// sequences).
template <int D>
struct WgBwd2Config {
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kBlockN = 128;   // keys per CTA (64 a warpgroup, 16 a warp)
  static constexpr int kBlockM = 64;    // query rows per step
  static constexpr int kKvBytes = kBlockN * D * 2;
  static constexpr int kQBytes = kBlockM * D * 2;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kKvBytes;
  static constexpr int kOffQ = 2 * kKvBytes;                 // two stages
  static constexpr int kOffDo = kOffQ + 2 * kQBytes;         // two stages
  static constexpr int kOffDs = kOffDo + 2 * kQBytes;        // dS^T [128 keys][64 queries] bf16
  static constexpr int kOffLse = kOffDs + kBlockN * 128;     // two stages of 64 floats
  static constexpr int kOffDelta = kOffLse + 2 * kBlockM * 4;
  static constexpr int kOffBar = kOffDelta + 2 * kBlockM * 4;  // two mbarriers (Q/dO stages)
  static constexpr int kOffDq = kOffBar + 128;                 // fp32 [64][D] (bulk dQ only)
  static constexpr int kSmem = kOffBar + 16 + 1024;            // + alignment slack
  static constexpr int kSmemBulk = kOffDq + kBlockM * D * 4 + 1024;
};

// grid (ceil(max_seqlen_kv / 128), H, b), block 256.
template <int D, bool kAtomicDq>
__global__ void __launch_bounds__(256, 1)
    bwd_wgmma2_kernel(const AttnArgs a, const __grid_constant__ CUtensorMap tmap_q,
                      const __grid_constant__ CUtensorMap tmap_do) {
#if HELIX_WGMMA_DEVICE
  // Built and tested at D = 128 only (its n32 dQ column split at D = 64 was never run).
  static_assert(D == 128, "bwd_wgmma2_kernel: head dim 128 only");
  using C = WgBwd2Config<D>;
  constexpr int kBlockM = C::kBlockM, kBlockN = C::kBlockN, kThreads = C::kThreads;
  constexpr int kDq = D / 2;  // dQ columns per warpgroup
  extern __shared__ unsigned char smem_raw[];

  const int seq = blockIdx.z, head = blockIdx.y;
  const int n0 = blockIdx.x * kBlockN;
  const int len_k = a.cu_kv[seq + 1] - a.cu_kv[seq];
  if (n0 >= len_k) return;
  const int len_q = a.cu_q[seq + 1] - a.cu_q[seq];
  const int64_t q_row0 = a.off_q[seq], k_row0 = a.off_kv[seq];
  const int diag = len_k - len_q;  // query i sees key j iff j <= i + diag (causal)
  const int m_first = a.causal ? max(0, n0 - diag) / kBlockM : 0;
  const int m_tiles = (len_q + kBlockM - 1) / kBlockM;

  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t hd = int64_t{head} * D;
  const int wg_key0 = n0 + wg * 64;    // first key of this warpgroup
  const int wkey0 = wg_key0 + warp * 16;  // first key of this warp
  // A warpgroup whose 64 keys all lie past the sequence skips its products and writes zeros as
  // its dS^T rows (once: nothing else writes them).
  const bool wg_active = wg_key0 < len_k;
  const float sl2 = a.scale_log2;

  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  unsigned char* smem = smem_raw + (base - smem_addr(smem_raw));
  const uint32_t s_k = base + C::kOffK, s_v = base + C::kOffV, s_ds = base + C::kOffDs;
  // This warpgroup's 64 key rows of the 128-row K / V tiles (each column block holds 128 rows).
  const uint32_t s_kw = s_k + wg * 64 * 128, s_vw = s_v + wg * 64 * 128;
  float* s_lse = reinterpret_cast<float*>(smem + C::kOffLse);
  float* s_delta = reinterpret_cast<float*>(smem + C::kOffDelta);

  auto load_q_tile = [&](int m, int stage) {
    const int mq0 = m * kBlockM;
    const int rows = min(kBlockM, len_q - mq0);
    static_assert(kBlockM == 64, "load_q_do_tiles moves 64-row tiles");
    load_q_do_tiles<D, kThreads>(a, tmap_q, tmap_do, base + C::kOffQ + stage * C::kQBytes,
                                 base + C::kOffDo + stage * C::kQBytes,
                                 base + C::kOffBar + 8 * stage, head, q_row0, mq0, rows, tid);
    if (tid < 2 * kBlockM) {
      const int i = tid % kBlockM;
      const float* src = (tid < kBlockM ? a.lse : a.delta) + head * a.tq + q_row0 + mq0;
      const uint32_t dst = smem_addr((tid < kBlockM ? s_lse : s_delta) + stage * kBlockM + i);
      cp_async_4(dst, i < rows ? src + i : src, i < rows);
    }
  };

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

  {
    const int rows = min(kBlockN, len_k - n0);
    const int64_t off = (k_row0 + n0) * a.row_stride + hd;
    load_tile<kBlockN, D, kThreads>(s_k, a.k + off, a.row_stride, rows, tid);
    load_tile<kBlockN, D, kThreads>(s_v, a.v + off, a.row_stride, rows, tid);
  }
  if (tid == 0) {
    mbar_init(base + C::kOffBar, 1);
    mbar_init(base + C::kOffBar + 8, 1);
    fence_mbar_init();
  }
  __syncwarp();  // the init is issued for the warp; order it before lane 0's first arrive
  if (m_first < m_tiles) load_q_tile(m_first, 0);
  cp_async_commit();
  if (kAtomicDq && !wg_active) {
    for (int i = tid - 128; i < 64 * 8; i += 128)  // 64 rows x 8 chunks of 16 bytes
      asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};\n" ::"r"(
                       s_ds + sw128<kBlockN>(64 + i / 8, i % 8)), "r"(0u)
                   : "memory");
    fence_proxy_async();
  }

  float dq[kDq / 8][4];  // this warpgroup's column half of the current query tile's dQ
  for (int m = m_first; m < m_tiles; ++m) {
    const int stage = (m - m_first) & 1;
    cp_async_wait<0>();  // tile m (issued one step ahead)
    fence_proxy_async();
    __syncthreads();  // tile m visible; both warpgroups are done with step m - 1
    if (m + 1 < m_tiles) {
      load_q_tile(m + 1, stage ^ 1);
      cp_async_commit();
    }
    const int mq0 = m * kBlockM;
    // Tile m's TMA (a full tile is the ((m - m_first) / 2)-th load into its stage).
    if (mq0 + kBlockM <= len_q) mbar_wait(base + C::kOffBar + 8 * stage, ((m - m_first) >> 1) & 1);
    const uint32_t s_q = base + C::kOffQ + stage * C::kQBytes;
    const uint32_t s_do = base + C::kOffDo + stage * C::kQBytes;

    if (wg_active) {
      // S^T = K Q^T and dP^T = V dO^T (rows: this warpgroup's 64 keys), two commit groups so
      // that P^T is computed while dP^T is still on the tensor cores.
      float st[kBlockM / 8][4], dpt[kBlockM / 8][4];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma_ss<kBlockM, 0, 0>(st, desc_kmajor<kBlockN>(s_kw, kk), desc_kmajor<kBlockM>(s_q, kk),
                                kk > 0);
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma_ss<kBlockM, 0, 0>(dpt, desc_kmajor<kBlockN>(s_vw, kk),
                                desc_kmajor<kBlockM>(s_do, kk), kk > 0);
      wgmma_commit();
      wgmma_wait<1>();
      fence_regs(st);

      const bool need_mask = mq0 + kBlockM > len_q || wkey0 + 16 > len_k ||
                             (a.causal && wkey0 + 15 > mq0 + diag);
      // P^T = exp(scale S^T - LSE); an empty row (lse = -inf) must give P = 0, not inf.
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + 2 * t + (e & 1);  // query within the tile
          const float l = s_lse[stage * kBlockM + qi];
          const float lse2 = l == -INFINITY ? INFINITY : l * kLog2e;
          float p = fast_exp2(fmaf(st[j][e], sl2, -lse2));
          if (need_mask) {
            const int key = wkey0 + g + 8 * (e >> 1), query = mq0 + qi;
            if (query >= len_q || key >= len_k || (a.causal && key > query + diag)) p = 0.f;
          }
          st[j][e] = p;
        }
      }
      wgmma_wait<0>();
      fence_regs(dpt);
      // dS^T = P^T (dP^T - delta), in place.
#pragma unroll
      for (int j = 0; j < kBlockM / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          dpt[j][e] = st[j][e] * (dpt[j][e] - s_delta[stage * kBlockM + j * 8 + 2 * t + (e & 1)]);

      // dV += P^T dO and dK += dS^T Q (scale applied at the end): A from registers.
      uint32_t pa[kBlockM / 16][4], da[kBlockM / 16][4];
#pragma unroll
      for (int kq = 0; kq < kBlockM / 16; ++kq) {
        pa[kq][0] = pack_bf16(st[2 * kq][0], st[2 * kq][1]);
        pa[kq][1] = pack_bf16(st[2 * kq][2], st[2 * kq][3]);
        pa[kq][2] = pack_bf16(st[2 * kq + 1][0], st[2 * kq + 1][1]);
        pa[kq][3] = pack_bf16(st[2 * kq + 1][2], st[2 * kq + 1][3]);
        da[kq][0] = pack_bf16(dpt[2 * kq][0], dpt[2 * kq][1]);
        da[kq][1] = pack_bf16(dpt[2 * kq][2], dpt[2 * kq][3]);
        da[kq][2] = pack_bf16(dpt[2 * kq + 1][0], dpt[2 * kq + 1][1]);
        da[kq][3] = pack_bf16(dpt[2 * kq + 1][2], dpt[2 * kq + 1][3]);
      }
      wgmma_fence();
#pragma unroll
      for (int kq = 0; kq < kBlockM / 16; ++kq)
        wgmma_rs<D, 1>(dv, pa[kq], desc_mnmajor<kBlockM>(s_do, kq), 1);
#pragma unroll
      for (int kq = 0; kq < kBlockM / 16; ++kq)
        wgmma_rs<D, 1>(dk, da[kq], desc_mnmajor<kBlockM>(s_q, kq), 1);
      wgmma_commit();

      if constexpr (kAtomicDq) {
        // dS^T rows of this warpgroup's keys into the [key][query] tile (128-byte rows, swizzled).
#pragma unroll
        for (int kq = 0; kq < kBlockM / 16; ++kq) {
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = wg * 64 + warp * 16 + g + 8 * r;
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // 8-query chunk 2 kq + h: da[kq][r + 2 h]
              const uint32_t addr = s_ds + sw128<kBlockN>(row, 2 * kq + h) + 4 * t;
              asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(da[kq][r + 2 * h])
                           : "memory");
            }
          }
        }
        fence_proxy_async();
      }
      wgmma_wait<0>();
      fence_regs(dk);
      fence_regs(dv);
      fence_regs(pa);
      fence_regs(da);
    }
    if constexpr (kAtomicDq) {
      // The previous bulk reduction has read the staging rows.
      if (wg == 0 && lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
      __syncthreads();  // both warpgroups' dS^T rows written
      // dQ_tile[:, wg D/2 ..] = dS K: A = dS^T read MN-major (queries contiguous), B = this
      // warpgroup's column half of K, MN-major (d contiguous), k = keys down the rows.
      const uint32_t s_kc = s_k + (kDq == 64 ? wg * kBlockN * 128 : wg * kDq * 2);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        wgmma_ss<kDq, 1, 1>(dq, desc_mnmajor<kBlockN>(s_ds, kk), desc_mnmajor<kBlockN>(s_kc, kk),
                              kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(dq);
      {
        // Stage the warp's 16 rows x this warpgroup's D / 2 columns (fp32, dq_accum's head-major
        // swizzled layout, see bwd_wgmma_kernel); warp w of both warpgroups meet at named
        // barrier 1 + w, then lane 0 of warpgroup 0's warp reduces the 16 full rows at once.
        const uint32_t s_dq = base + C::kOffDq;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int lr = warp * 16 + g + 8 * r;
          const int q7 = static_cast<int>((q_row0 + mq0 + lr) & 7);
#pragma unroll
          for (int i = 0; i < kDq / 8; ++i) {
            const int chunk = wg * (kDq / 4) + 2 * i + (t >> 1);
            const uint32_t addr = s_dq + lr * (D * 4) + ((chunk ^ q7) << 4) + (t & 1) * 8;
            asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(dq[i][2 * r]),
                         "f"(dq[i][2 * r + 1])
                         : "memory");
          }
        }
        fence_proxy_async();
        asm volatile("bar.sync %0, 64;\n" ::"r"(1 + warp) : "memory");
        const int rows = min(16, len_q - (mq0 + warp * 16));
        if (wg == 0 && lane == 0 && rows > 0) {
          float* dst = a.dq_accum + (int64_t{head} * a.tq + q_row0 + mq0 + warp * 16) * D;
          asm volatile(
              "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
              "cp.async.bulk.commit_group;\n" ::"l"(dst),
              "r"(s_dq + warp * 16 * (D * 4)), "r"(rows * D * 4)
              : "memory");
        }
      }
    }
  }
  if constexpr (kAtomicDq)  // the last bulk reduction has completed
    if (wg == 0 && lane == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  cp_async_wait<0>();  // nothing may stay in flight when the CTA exits (no query tile case)

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = wkey0 + g + 8 * r;
    if (key >= len_k) continue;
    const int64_t off = (k_row0 + key) * a.row_stride + hd + 2 * t;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      *reinterpret_cast<uint32_t*>(a.d_k + off + i * 8) =
          pack_bf16(dk[i][2 * r] * a.scale, dk[i][2 * r + 1] * a.scale);
      *reinterpret_cast<uint32_t*>(a.d_v + off + i * 8) = pack_bf16(dv[i][2 * r], dv[i][2 * r + 1]);
    }
  }
#else
  __trap();  // launched only on sm_90 devices (wgmma_supported)
#endif
}

// cuTensorMapEncodeTiled through the runtime's driver entry point (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q{};
    CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                cudaEnableDefault, &q));
    HELIX_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr,
                "attention: the CUDA driver has no cuTensorMapEncodeTiled (TMA needs CUDA 12+)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// Tensor map over the `rows` tokens of a [rows, H * D] bf16 operand (row stride `row_stride`
// elements), boxes of 64 columns x `box_rows` rows, 128-byte swizzle (attention_wgmma.cuh's tile
// layout).
CUtensorMap make_tensor_map(const __nv_bfloat16* base, int64_t rows, int64_t row_stride,
                               int64_t cols, uint32_t box_rows) {
  CUtensorMap m{};
  if (rows == 0 || base == nullptr) return m;  // an empty operand: no kernel reads it
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_stride) * 2};
  const cuuint32_t box[2] = {64, box_rows}, elem[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<__nv_bfloat16*>(base), dims, strides, box,
      elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  HELIX_CHECK(r == CUDA_SUCCESS,
              "attention: cuTensorMapEncodeTiled failed ({}) for {} rows x {} columns",
              static_cast<int>(r), rows, cols);
  return m;
}

template <int D, int kKeys, int kMinBlocks, int kKSlots>
void launch_fwd_wg(const AttnArgs& a, int64_t tk, int max_seqlen_q, int heads, int batch,
                   cudaStream_t st) {
  using C = WgFwdConfig<D, kKeys, kKSlots>;
  const dim3 grid((max_seqlen_q + C::kBlockM - 1) / C::kBlockM, heads, batch);
  if (grid.x == 0) return;
  const CUtensorMap tk_map = make_tensor_map(a.k, tk, a.row_stride, int64_t{heads} * D, kKeys);
  const CUtensorMap tv_map = make_tensor_map(a.v, tk, a.row_stride, int64_t{heads} * D, kKeys);
  auto kernel = fwd_wgmma_kernel<D, kKeys, kMinBlocks, kKSlots>;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
  kernel<<<grid, C::kThreads, C::kSmem, st>>>(a, tk_map, tv_map);
  HELIX_LAUNCH_CHECK();
}

template <int D, bool kAtomicDq>
void launch_bwd_wg2(const AttnArgs& a, int max_seqlen_kv, int heads, int batch, cudaStream_t st) {
  using C = WgBwd2Config<D>;
  const dim3 grid((max_seqlen_kv + C::kBlockN - 1) / C::kBlockN, heads, batch);
  if (grid.x == 0) return;
  auto kernel = bwd_wgmma2_kernel<D, kAtomicDq>;
  const int smem = kAtomicDq ? C::kSmemBulk : C::kSmem;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const CUtensorMap q_map = make_tensor_map(a.q, a.tq, a.row_stride, int64_t{heads} * D, 64);
  const CUtensorMap do_map = make_tensor_map(a.d_o, a.tq, a.row_stride, int64_t{heads} * D, 64);
  kernel<<<grid, C::kThreads, smem, st>>>(a, q_map, do_map);
  HELIX_LAUNCH_CHECK();
}

template <int D, bool kAtomicDq, int kMinBlocks>
void launch_bwd_wg(const AttnArgs& a, int max_seqlen_kv, int heads, int batch, cudaStream_t st) {
  using C = WgBwdConfig<D>;
  const dim3 grid((max_seqlen_kv + C::kBlockN - 1) / C::kBlockN, heads, batch);
  if (grid.x == 0) return;
  auto kernel = bwd_wgmma_kernel<D, kAtomicDq, kMinBlocks>;
  const int smem = kAtomicDq ? C::kSmemBulk : C::kSmem;
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const CUtensorMap q_map = make_tensor_map(a.q, a.tq, a.row_stride, int64_t{heads} * D, 64);
  const CUtensorMap do_map = make_tensor_map(a.d_o, a.tq, a.row_stride, int64_t{heads} * D, 64);
  kernel<<<grid, C::kThreads, smem, st>>>(a, q_map, do_map);
  HELIX_LAUNCH_CHECK();
}

}  // namespace

namespace detail {

bool wgmma_supported(Device device, int head_dim) {
  if (head_dim != 64 && head_dim != 128) return false;
  static int cc[64] = {};  // per device ordinal: 0 = not queried yet
  const int ord = device.index;
  if (ord < 0 || ord >= 64) return false;
  if (cc[ord] == 0) cc[ord] = cuda_compute_capability(ord);
  return cc[ord] == 90;
}

void launch_fwd_wgmma(const attention_tiles::AttnArgs& a, int64_t tk, int max_seqlen_q, int heads,
                      int head_dim, int batch, cudaStream_t stream) {
  // D = 64: K/V tiles of 64 keys, 4 CTAs per SM (124 registers): +8% over 3 CTAs per SM on
  // protein lengths (250 vs 232 TFLOP/s, before TMA), equal on long sequences; 3 CTAs were faster
  // than 128-key tiles at 2 per SM on protein lengths (235 vs 206) and equal on long ones.
  // D = 128: 64-key tiles, 2 CTAs per SM (188 registers).
  // Two K slots (K_{n+1} loads during step n); three (K_{n+2}) measured equal within noise
  // (protein D = 128 forward +4%, long D = 128 -1 to -3%), docs/perf/attention.md v9.
  if (head_dim == 64)
    launch_fwd_wg<64, 64, 4, 2>(a, tk, max_seqlen_q, heads, batch, stream);
  else
    launch_fwd_wg<128, 64, 2, 2>(a, tk, max_seqlen_q, heads, batch, stream);
}

bool launch_bwd_wgmma(const attention_tiles::AttnArgs& a, int max_seqlen_kv, int heads,
                      int head_dim, int batch, bool atomic_dq, cudaStream_t stream) {
  // D = 64: 64-key CTAs of one warpgroup, 3 per SM (168 registers); dQ by bulk reduce-add.
  // D = 128: 128-key CTAs of two warpgroups, 1 per SM (half the dQ traffic and Q / dO loads of
  // 64-key CTAs); dQ by bulk reduce-add. Measurements: docs/perf/attention.md (v7).
  if (head_dim == 64) {
    if (atomic_dq)
      launch_bwd_wg<64, true, 3>(a, max_seqlen_kv, heads, batch, stream);
    else
      launch_bwd_wg<64, false, 3>(a, max_seqlen_kv, heads, batch, stream);
  } else {
    if (atomic_dq)
      launch_bwd_wg2<128, true>(a, max_seqlen_kv, heads, batch, stream);
    else
      launch_bwd_wg2<128, false>(a, max_seqlen_kv, heads, batch, stream);
  }
  return atomic_dq;  // the bulk kernels' dq_accum layout: head-major, swizzled
}

}  // namespace detail
}  // namespace helix
