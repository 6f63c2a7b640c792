#pragma once
// Packed-THD attention: softmax(scale * Q K^T) V over a batch of sequences packed back to back
// (q [Tq, H, D], k/v [Tk, H, D], bf16), forward (O and the log-sum-exp), backward, and the LSE
// merge that context parallelism's ring uses to combine partial outputs. Design: FlashAttention-2
// on the GPU (tiles of Q against tiles of K/V with an online softmax, mma.sync bf16 tensor cores),
// a double-accumulation CPU reference with identical semantics, and host-side validation of every
// cu_seqlens through the host copy that CuSeqlens carries beside the device tensor (no device
// sync).
//
// Semantics shared by every function here:
//  * sequence i has queries at rows [q_off[i], q_off[i] + len_q[i]) and keys at
//    [kv_off[i], kv_off[i] + len_kv[i]), where len_q[i] = cu_seqlens_q[i+1] - cu_seqlens_q[i] and
//    q_off = cu_seqlens_q_padded (or cu_seqlens_q when no padded variant is given); same for kv.
//  * rows of q (k/v) in no sequence (padding, or past the last sequence) are ignored; their O and
//    dQ (dK, dV) are written as zero and their LSE as -inf.
//  * causal masks align at the bottom right (FlashAttention-2's convention): query i of a sequence
//    sees key j iff j <= i + len_kv - len_q. With len_q == len_kv that is j <= i.
//  * a query that sees no key at all gets O = 0 and LSE = -inf (the merge treats it as empty).
//  * LSE is natural-log: lse = log(sum_j exp(scale * q.k_j)).
#include <cstdint>
#include <utility>
#include <vector>

#include "core/device.h"
#include "core/tensor.h"

namespace helix {

// Cumulative offsets of one side (queries or keys) of a packed batch. `host` is what the data
// loader (or the CP sharding) computed; `device` holds the same values on the device of the
// attention operands, where the kernels read them. Built together by make(), so the two copies
// agree; the launchers validate the host copy (monotonic, in range, max_seqlen) without touching
// the device.
struct CuSeqlens {
  std::vector<int32_t> host;  // [b+1], host[0] == 0, non-decreasing
  Tensor device;              // i32 [b+1] on the operands' device, equal to `host`

  // Copies `values` to `device` (a host-to-device copy: do it where the batch is built).
  static CuSeqlens make(const std::vector<int32_t>& values, Device device);
  // Cumulative offsets of `lengths`, each rounded up to a multiple of `multiple` (padded layouts).
  static CuSeqlens from_lengths(const std::vector<int32_t>& lengths, Device device,
                                int multiple = 1);
  // Wraps an existing device tensor and its CPU copy (i32 [b+1] both; no copy, no sync).
  static CuSeqlens wrap(const Tensor& device, const Tensor& host_copy);
  bool defined() const { return !host.empty(); }
  int batch() const { return static_cast<int>(host.size()) - 1; }
};

// Which rows of q and k/v belong to which sequence: true lengths, optional padded offsets, and the
// longest lengths (from the host). Layers build it from the packed batch (core ThdBatch, when
// present) and, under context parallelism, from the per-rank shard.
struct ThdAttentionLayout {
  CuSeqlens cu_seqlens_q;         // [b+1] cumulative true query lengths
  CuSeqlens cu_seqlens_kv;        // [b+1] cumulative true key/value lengths
  CuSeqlens cu_seqlens_q_padded;  // [b+1] query row offsets incl. padding; empty: cu_seqlens_q
  CuSeqlens
      cu_seqlens_kv_padded;  // [b+1] key/value row offsets incl. padding; empty: cu_seqlens_kv
  int max_seqlen_q = 0;      // >= every true query length (sizes the grid; no device sync)
  int max_seqlen_kv = 0;     // >= every true key/value length
};

enum class AttentionMask : uint8_t { kBidirectional, kCausal };

// Which CUDA forward kernel runs: a speed choice, same semantics and error bounds (the CPU ignores
// it). kRows16 / kRows32: the mma.sync kernel (any GPU) with 16 or 32 query rows a warp at D = 128
// (D <= 64 always runs 32). kRows16: one m16 tile a warp, Q fragments held in registers, K/V tiles
// of 64 keys. kRows32: two m16 tiles sharing every K/V fragment, Q fragments re-read from shared
// memory, K/V tiles of 32 keys. kWgmma (head dims 64 and 128 on compute capability 9.0): Hopper
// warpgroup MMAs from 128-byte-swizzled shared-memory tiles, one warpgroup per 64 query rows
// (attention_sm90.cu); asking for it elsewhere is an error. kDefault: kWgmma where it exists, else
// kRows32 at D = 128 (measured, docs/perf/attention.md v4 and v6).
enum class AttentionFwdTiling : uint8_t { kDefault, kRows16, kRows32, kWgmma };

// How the backward accumulates dQ. dK and dV are always owned by one CTA per key tile and written
// once, so they are deterministic in both modes. kAtomic adds each key tile's dQ contribution into
// an fp32 buffer with atomics (FlashAttention-2, fastest, summation order varies from run to run);
// kDeterministic computes dQ in a second pass that owns each query tile: bitwise reproducible.
enum class AttentionBwdMode : uint8_t { kAtomic, kDeterministic };

// Key tile of the CUDA backward's dK/dV kernel: a speed choice, same semantics and error bounds
// (the CPU ignores it). kKeys64: 64-key CTAs, 16 keys a warp. kKeys128: 128-key CTAs (32 keys a
// warp at D <= 64, 8 warps at D = 128): half the dQ atomics and Q/dO reloads, and at D <= 64 each
// Q/dO fragment feeds two key tiles. kTiled2D: FlashAttention-2's sm80 structure, 8-warp CTAs
// (128 keys x 128 query rows at D = 64 and 16, 64 x 128 at D = 128, 128 x 64 at D = 24/32) with
// 2-D warp partitions for S^T/dP^T, dK/dV and dQ, P^T and dS^T through shared memory; every head
// dim has it (no fallback). kWgmma (head dims 64 and 128 on sm_90 GPUs): Hopper warpgroup MMAs,
// one warpgroup per 64 keys, dQ from dS^T staged in shared memory (attention_sm90.cu); asking for
// it elsewhere is an error. kDefault: kWgmma where it exists, else kKeys128 when max_seqlen_kv >
// 2048 and kKeys64 below (measured, see docs/perf/attention.md v4 and v6; kTiled2D measured 5-17%
// slower than the better of kKeys64 and kKeys128, v5).
enum class AttentionBwdTiling : uint8_t { kDefault, kKeys64, kKeys128, kTiled2D, kWgmma };

struct ThdAttentionFwdParams {
  Tensor q;  // [Tq, H, D] bf16, contiguous, 16-byte aligned; D in {16, 24, 32, 64, 128} on CUDA
             // (24 runs in tiles of 32), 1..256 on the CPU (which also takes f32)
  Tensor k;  // [Tk, H, D] bf16
  Tensor v;  // [Tk, H, D] bf16
  ThdAttentionLayout layout;
  float softmax_scale = 0.f;  // > 0, usually 1/sqrt(D)
  AttentionMask mask = AttentionMask::kBidirectional;
  AttentionFwdTiling tiling = AttentionFwdTiling::kDefault;
  Tensor o;    // [Tq, H, D] bf16, written
  Tensor lse;  // [H, Tq] f32, written
};

struct ThdAttentionBwdParams {
  Tensor q;      // [Tq, H, D] bf16
  Tensor k;      // [Tk, H, D] bf16
  Tensor v;      // [Tk, H, D] bf16
  Tensor o;      // [Tq, H, D] bf16, the forward's output
  Tensor d_o;    // [Tq, H, D] bf16, gradient of the loss w.r.t. o
  Tensor lse;    // [H, Tq] f32, the forward's log-sum-exp
  Tensor d_lse;  // [H, Tq] f32 gradient w.r.t. lse (from lse_merge_bwd); undefined: zero
  ThdAttentionLayout layout;
  float softmax_scale = 0.f;
  AttentionMask mask = AttentionMask::kBidirectional;
  AttentionBwdMode mode = AttentionBwdMode::kAtomic;
  AttentionBwdTiling tiling = AttentionBwdTiling::kDefault;
  Tensor d_q;  // [Tq, H, D] bf16, written
  Tensor d_k;  // [Tk, H, D] bf16, written
  Tensor d_v;  // [Tk, H, D] bf16, written
};

// O = softmax(scale * Q K^T + mask) V per sequence and head; LSE per query and head.
void thd_attention_fwd(const ThdAttentionFwdParams& p, const Stream& stream);
// dQ, dK, dV from O, dO and LSE (and dLSE when given: the gradient that reaches a partial output's
// LSE through lse_merge). Recomputes the probabilities from LSE, as FlashAttention-2 does.
void thd_attention_bwd(const ThdAttentionBwdParams& p, const Stream& stream);

// ---- LSE merge: partial attention outputs over disjoint key blocks -> attention over their union
// -- lse = log(sum_i exp(lse_i)), out = sum_i exp(lse_i - lse) * out_i. Rows where every lse_i is
// -inf give out = 0, lse = -inf. Up to kMaxLseMergeParts partials per call (a ring merges step by
// step).
inline constexpr int kMaxLseMergeParts = 8;

struct LseMergeFwdParams {
  std::vector<Tensor> outs;  // n x [T, H, D] bf16 or f32 (all the same dtype)
  std::vector<Tensor> lses;  // n x [H, T] f32
  Tensor out;                // [T, H, D] bf16 or f32, written
  Tensor lse;                // [H, T] f32, written
};

struct LseMergeBwdParams {
  Tensor d_out;                // [T, H, D] bf16 or f32, gradient w.r.t. the merged out
  Tensor d_lse;                // [H, T] f32 gradient w.r.t. the merged lse; undefined: zero
  std::vector<Tensor> outs;    // n x [T, H, D], the forward's partial outputs
  std::vector<Tensor> lses;    // n x [H, T] f32, the forward's partial LSEs
  std::vector<Tensor> d_outs;  // n x [T, H, D], dtype of outs, written: exp(lse_i - lse) * d_out
  std::vector<Tensor> d_lses;  // n x [H, T] f32, written: w_i * (d_out . (out_i - out) + d_lse)
};

void lse_merge_fwd(const LseMergeFwdParams& p, const Stream& stream);
void lse_merge_bwd(const LseMergeBwdParams& p, const Stream& stream);

// Attention FLOPs of a forward pass (4 * H * D * sum_i len_q[i] * len_kv[i]; halved for causal
// when len_q == len_kv, the count the benchmarks report). The backward does 2.5x that.
double thd_attention_fwd_flops(const ThdAttentionLayout& layout, int heads, int head_dim,
                               AttentionMask mask);

namespace detail {
// The device-specific implementations behind the public functions (parameters already validated).
void thd_attention_fwd_cpu(const ThdAttentionFwdParams& p);
void thd_attention_bwd_cpu(const ThdAttentionBwdParams& p);
void lse_merge_fwd_cpu(const LseMergeFwdParams& p);
void lse_merge_bwd_cpu(const LseMergeBwdParams& p);
#if HELIX_WITH_CUDA
void thd_attention_fwd_cuda(const ThdAttentionFwdParams& p, const Stream& stream);
void thd_attention_bwd_cuda(const ThdAttentionBwdParams& p, const Stream& stream);
void lse_merge_fwd_cuda(const LseMergeFwdParams& p, const Stream& stream);
void lse_merge_bwd_cuda(const LseMergeBwdParams& p, const Stream& stream);
#endif

// Row ranges of one side that belong to no sequence: [begin, end) pairs, from the host offsets.
std::vector<std::pair<int64_t, int64_t>> thd_gap_rows(const CuSeqlens& cu, const CuSeqlens& padded,
                                                      int64_t total_rows);
}  // namespace detail

}  // namespace helix
