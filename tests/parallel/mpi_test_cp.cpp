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
#include "layers/zero_optimizer.h"
#include "layers/zero_sync.h"
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
        if (row >= 0)
          diff = std::max(diff, std::abs(double(g[i * tl + j]) - double(w[i * tg + row])));
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
  int pad_to = 1;  // > 1: every sequence's slot in the global batch padded to a multiple of this
};

// `b` with every sequence's slot padded to a multiple of `m` (<pad> rows, no label).
ThdBatch pad_slots(const ThdBatch& b, int m) {
  const std::vector<int32_t> tok = b.tokens.to_vector<int32_t>(),
                             lab = b.labels.to_vector<int32_t>();
  const std::vector<int32_t> cu = b.cu_seqlens.to_vector<int32_t>();
  std::vector<int32_t> t2, l2, cup{0};
  for (size_t i = 0; i + 1 < cu.size(); ++i) {
    const int32_t len = cu[i + 1] - cu[i], slot = (len + m - 1) / m * m;
    for (int32_t j = 0; j < slot; ++j) {
      t2.push_back(j < len ? tok[static_cast<size_t>(cu[i] + j)] : 1);
      l2.push_back(j < len ? lab[static_cast<size_t>(cu[i] + j)] : -100);
    }
    cup.push_back(cup.back() + slot);
  }
  ThdBatch o = b;
  o.tokens = Tensor::from_vector(t2, {static_cast<int64_t>(t2.size())});
  o.labels = Tensor::from_vector(l2, {static_cast<int64_t>(l2.size())});
  o.cu_seqlens_padded = Tensor::from_vector(cup, {static_cast<int64_t>(cup.size())});
  return o;
}

void run_attention(const AttnCase& c) {
  ParallelContext ctx = testing::make_context(ParallelSizes{.cp = c.cp});
  const int rank = ctx.coords().cp;
  const int64_t H = 3, D = 8;
  ThdBatch global = testing::synthetic_esm2_batch(c.lens, 99, 20, Device::cpu());
  if (c.pad_to > 1) global = pad_slots(global, c.pad_to);
  const int64_t tg = global.total_tokens();
  // The same random operands on every rank (one seed per tensor).
  const auto rnd = [](Shape s, uint64_t sub) {
    Tensor t = Tensor::empty(s, DType::kF32);
    fill_normal(t, 2024, sub, 0.f, 1.f);
    return t;
  };
  const Tensor q = rnd({tg, H, D}, 1), k = rnd({tg, H, D}, 2), v = rnd({tg, H, D}, 3),
               d_o = rnd({tg, H, D}, 4);
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

  const CpBatch cb =
      cp_split_batch(global, c.cp, rank, CpShardOptions{.split_min_len = c.split_min_len});
  const CpLayout& L = cb.layouts[static_cast<size_t>(rank)];
  const auto plan = make_cp_attention_plan(cb.layouts, rank, c.comm, Device::cpu());
  if (c.split_min_len > 0 && c.split_min_len <= 130) {
    EXPECT_LT(plan->num_split, static_cast<int>(c.lens.size()))
        << "placement kept short sequences whole";
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
  const std::string what = std::string(cp_comm_name(c.comm)) + " cp " + std::to_string(c.cp) +
                           " split_min_len " + std::to_string(c.split_min_len) + " rank " +
                           std::to_string(rank);
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
      for (int64_t e = 0; e < H * D; ++e)
        ASSERT_EQ(dk[j * H * D + e], 0.f) << "padding row " << j << ", " << what;
}

TEST(CpAttention, RingEqualsFullAttention) {
  for (int cp : {2, 4})  // cp 4 on 4 ranks only (cp 2 on 4 ranks: two cp groups)
    if (testing::world_size() % cp == 0)
      for (int32_t l : {0, 40})
        run_attention({.cp = cp, .comm = CpComm::kRing, .split_min_len = l});
}

TEST(CpAttention, AllGatherEqualsFullAttention) {
  for (int cp : {2, 4})
    if (testing::world_size() % cp == 0)
      for (int32_t l : {0, 40})
        run_attention({.cp = cp, .comm = CpComm::kAllGather, .split_min_len = l});
}

TEST(CpAttention, ShortSequencesOnlyStayLocal) {  // nothing split: no communication at all
  for (CpComm m : {CpComm::kRing, CpComm::kAllGather})
    run_attention({.cp = 2, .comm = m, .split_min_len = 1000, .lens = {37, 5, 13, 12, 3, 61, 9}});
}

TEST(CpAttention, PaddedGlobalSlots) {  // the global batch has padding rows of its own
  for (CpComm m : {CpComm::kRing, CpComm::kAllGather})
    for (int32_t l : {0, 40}) run_attention({.cp = 2, .comm = m, .split_min_len = l, .pad_to = 8});
}

TEST(CpAttention, BytesPerRankFollowTheBlock) {
  // Two split sequences of 130 and 61 tokens: padded to 132 and 64 (cp 2), R = 66 + 32 rows.
  const ThdBatch g =
      testing::synthetic_esm2_batch({37, 5, 130, 12, 3, 61, 9}, 5, 20, Device::cpu());
  const CpBatch cb = cp_split_batch(g, 2, 0, CpShardOptions{.split_min_len = 40});
  const auto plan = make_cp_attention_plan(cb.layouts, 0, CpComm::kRing, Device::cpu());
  EXPECT_EQ(plan->num_split, 2);
  EXPECT_EQ(plan->block_rows, 98);
  const CpAttentionBytes bytes = cp_attention_bytes(*plan, 20, 64, 2);
  EXPECT_EQ(bytes.fwd, 2 * 98 * 20 * 64 * 2);
  EXPECT_EQ(bytes.bwd, 2 * bytes.fwd);
}

// ---- ESM-2 under CP (x TP, x DP) against one rank ----------------------------------------------
ModelConfig tiny_config() { return testing::tiny_esm2_config(); }

// Short and long proteins mixed, lengths not multiples of 2*cp; `shard` picks the dp shard.
ThdBatch esm2_batch(int step, int shard, Device device) {
  return testing::synthetic_esm2_batch(
      {37 + shard, 9, 70 - step, 14, 5 + 2 * shard, 23},
      0xA24BAED4963EE407ull * static_cast<uint64_t>(5 + 13 * step + shard), 25, device);
}

struct CpSetup {
  int cp = 2;
  int tp = 1;
  bool sp = false;
  CpComm comm = CpComm::kRing;
  int32_t split_min_len = 0;
  RecomputePolicy recompute = RecomputePolicy::kNone;
  Device device = Device::cpu();
  DType compute = DType::kF32;
  ModelConfig config = tiny_config();
  double loss_tol = 1e-5;  // relative
  double grad_tol = 1e-4;  // max difference relative to the tensor's largest element (step 0)
  double grad_tol_later = 1e-3;
  double norm_tol = 1e-4;  // relative, the gradient norm
  CommBackend backend = CommBackend::kMpi;
};

double max_rel(const Tensor& got, const Tensor& want) {
  const std::vector<float> g = got.to_floats(), w = want.to_floats();
  double diff = 0, scale = 1e-6;
  for (size_t i = 0; i < g.size(); ++i) {
    diff = std::max(diff, std::abs(double(g[i]) - double(w[i])));
    scale = std::max(scale, std::abs(double(w[i])));
  }
  return diff / scale;
}

void run_esm2_cp(const CpSetup& s) {
  ParallelContext ctx =
      testing::make_context(ParallelSizes{.tp = s.tp, .cp = s.cp}, s.backend, s.device);
  const int dp = ctx.sizes().dp, my_dp = ctx.coords().dp, my_cp = ctx.coords().cp;
  const Stream stream = s.device.is_cuda() ? Stream::cuda_default(s.device.index) : Stream();
  const uint64_t seed = 5;
  Esm2Options ro{.device = s.device, .compute = s.compute};
  ro.recompute = s.recompute;
  Esm2Model ref(s.config, ro);
  ref.init_random(seed);
  Esm2Options po = ro;
  po.parallel = &ctx;
  po.sequence_parallel = s.sp;
  po.cp = CpOptions{.comm = s.comm, .split_min_len = s.split_min_len};
  Esm2Model par(s.config, po);
  par.init_random(seed);
  const AdamWConfig acfg{.weight_decay = 0.01, .clip_norm = 0.05};
  AdamW ref_opt(ref.params(), acfg);
  AdamW par_opt(par.params(), acfg);
  GradSync sync(par.params(), &ctx, size_t{16} << 10);
  TapeOptions to;
  to.stream = stream;
  to.recompute = s.recompute;
  const std::string what = std::string(cp_comm_name(s.comm)) + " cp " + std::to_string(s.cp) +
                           " tp " + std::to_string(s.tp) + (s.sp ? " sp" : "") + " split_min_len " +
                           std::to_string(s.split_min_len);
  for (int step = 0; step < 2; ++step) {
    const std::string at = what + " at step " + std::to_string(step);
    int64_t labels = 0;
    for (int d = 0; d < dp; ++d) labels += esm2_batch(step, d, Device::cpu()).num_labels;
    const float scale = 1.0f / static_cast<float>(labels);
    ref.params().zero_grads(stream);
    double ref_loss = 0;
    for (int d = 0; d < dp; ++d) {
      const ThdBatch b = esm2_batch(step, d, s.device);
      Tape tape(to);
      Var loss = ref.loss(tape, ref.forward(tape, b), b, scale);
      tape.backward(loss);
      ref_loss += loss.data().to_floats()[0];
    }
    // This rank: its cp shard of its dp shard's global batch.
    const CpBatch cb = cp_split_batch(esm2_batch(step, my_dp, Device::cpu()), s.cp, my_cp,
                                      CpShardOptions{.split_min_len = s.split_min_len,
                                                     .pad_id = s.config.pad_token_id})
                           .to(s.device);
    sync.zero_grads(stream);
    TapeOptions o = to;
    o.on_grad_ready = sync.ready_hook(stream);
    Tape tape(o);
    Var loss = par.loss(tape, par.forward(tape, cb.local, &cb), cb.local, scale);
    tape.backward(loss);
    sync.reduce(stream);
    Tensor loss_t = Tensor::from_vector<double>({double(loss.data().to_floats()[0])}, Shape{1});
    ctx.dp_cp().all_reduce(loss_t, ReduceOp::kSum, Stream());
    EXPECT_NEAR(loss_t.to_vector<double>()[0], ref_loss, s.loss_tol * std::abs(ref_loss))
        << "loss, " << at;
    for (size_t i = 0; i < par.params().all().size(); ++i) {
      const Parameter& p = par.params().all()[i];
      const Tensor want = ref.params().all()[i].grad();
      ASSERT_TRUE(want.defined()) << p.name;
      EXPECT_LE(max_rel(par.full_grad(p), want), step == 0 ? s.grad_tol : s.grad_tol_later)
          << "gradient of " << p.name << ", " << at;
    }
    const OptimizerStepResult rr = ref_opt.step(1e-3, true, stream);
    const OptimizerStepResult pr = par_opt.step(1e-3, true, stream, sync.norm_reduce());
    ASSERT_TRUE(rr.applied && pr.applied);
    EXPECT_NEAR(pr.grad_norm, rr.grad_norm, s.norm_tol * rr.grad_norm) << "gradient norm, " << at;
  }
}

TEST(Esm2Cp, ContextParallelEqualsOneRank) {  // CP = world (2 or 4), both modes, +- placement
  for (CpComm m : {CpComm::kRing, CpComm::kAllGather})
    for (int32_t l : {0, 30})
      run_esm2_cp({.cp = testing::world_size(), .comm = m, .split_min_len = l});
}

TEST(Esm2Cp, ContextParallelTimesDataParallel) {  // CP=2 x DP=2 on 4 ranks (CP=2 on 2)
  run_esm2_cp({.cp = 2, .comm = CpComm::kRing, .split_min_len = 30});
}

TEST(Esm2Cp, ContextParallelTimesTensorParallel) {  // CP=2 x TP=2 on 4 ranks
  if (testing::world_size() != 4) GTEST_SKIP() << "needs 4 ranks";
  run_esm2_cp({.cp = 2,
               .tp = 2,
               .comm = CpComm::kRing,
               .split_min_len = 30,
               .recompute = RecomputePolicy::kFull});
  run_esm2_cp({.cp = 2, .tp = 2, .sp = true, .comm = CpComm::kAllGather, .split_min_len = 0});
}

// ZeRO under CP: state and gradients sharded over dp x cp (ZeroOptions::shard_comm = dp_cp), the
// loss summed over the same group; CP = world (2 or 4), stages 1 and 3, against one rank.
void run_esm2_cp_zero(int stage, CpComm comm) {
  const int cp = testing::world_size();
  ParallelContext ctx = testing::make_context(ParallelSizes{.cp = cp});
  const Stream stream;
  Esm2Model ref(tiny_config(), Esm2Options{.device = Device::cpu(), .compute = DType::kF32});
  ref.init_random(5);
  Esm2Options po{.device = Device::cpu(), .compute = DType::kF32};
  po.parallel = &ctx;
  po.cp = CpOptions{.comm = comm, .split_min_len = 30};
  Esm2Model par(tiny_config(), po);
  par.init_random(5);
  ZeroOptions zo;
  zo.stage = stage;
  zo.shard_comm = &ctx.dp_cp();
  zo.regather_in_backward = false;
  ZeroSync zero(par, ctx, zo);
  const AdamWConfig acfg{.weight_decay = 0.01, .clip_norm = 0.05};
  AdamW ref_opt(ref.params(), acfg);
  ZeroAdamW par_opt(zero, acfg);
  for (int step = 0; step < 2; ++step) {
    const std::string at = "zero " + std::to_string(stage) + " " + std::string(cp_comm_name(comm)) +
                           " step " + std::to_string(step);
    const ThdBatch g = esm2_batch(step, 0, Device::cpu());
    const float scale = 1.0f / static_cast<float>(g.num_labels);
    ref.params().zero_grads(stream);
    Tape rt;
    Var rl = ref.loss(rt, ref.forward(rt, g), g, scale);
    rt.backward(rl);
    const CpBatch cb = cp_split_batch(g, cp, ctx.coords().cp, CpShardOptions{.split_min_len = 30});
    zero.zero_grads(stream);
    zero.begin_micro_batch(true);
    Tape tape;
    Var loss = par.loss(tape, par.forward(tape, cb.local, &cb), cb.local, scale);
    tape.backward(loss);
    Tensor loss_sum = loss.data().clone();
    zero.sum_over_dp(loss_sum, stream);
    zero.reduce(stream);
    EXPECT_NEAR(loss_sum.to_floats()[0], rl.data().to_floats()[0],
                1e-5 * std::abs(rl.data().to_floats()[0]))
        << "loss, " << at;
    for (size_t i = 0; i < par.params().all().size(); ++i) {
      const Parameter& p = par.params().all()[i];
      EXPECT_LE(max_rel(zero.local_grad(i), par.shard_of(p, ref.params().all()[i].grad())),
                step == 0 ? 1e-4 : 1e-3)
          << "gradient of " << p.name << ", " << at;
    }
    const OptimizerStepResult rr = ref_opt.step(1e-3, true, stream);
    const OptimizerStepResult pr = par_opt.step(1e-3, true, stream);
    ASSERT_TRUE(rr.applied && pr.applied);
    EXPECT_NEAR(pr.grad_norm, rr.grad_norm, 1e-4 * rr.grad_norm) << "gradient norm, " << at;
  }
}

TEST(Esm2Cp, ZeroOverDpCpEqualsOneRank) {
  run_esm2_cp_zero(1, CpComm::kRing);
  run_esm2_cp_zero(3, CpComm::kAllGather);
}

// ---- CUDA: CP=2 equals CP=1 on the GPU (ranks share it through the host-staged MPI backend) ---
TEST(Esm2CpCuda, ContextParallelEqualsOneRank) {
  HELIX_REQUIRE_CUDA();
  ModelConfig c = tiny_config();
  c.hidden = 128;  // head dim 32, a CUDA attention head dim
  c.ffn = 256;
  const double r = testing::tolerance_for(DType::kBF16).rtol;
  for (CpComm m : {CpComm::kRing, CpComm::kAllGather})
    run_esm2_cp({.cp = 2,
                 .comm = m,
                 .split_min_len = 30,
                 .device = testing::rank_gpu(),
                 .compute = DType::kBF16,
                 .config = c,
                 .loss_tol = r / 2,
                 .grad_tol = 4 * r,
                 .grad_tol_later = 4 * r,
                 .norm_tol = 2 * r});
}

// One GPU per rank through NCCL: the transfers run on the plan's comm stream, overlapped with
// compute (ring and all-gather), so this checks the stream ordering too.
TEST(Esm2CpCuda, ContextParallelOverNcclEqualsOneRank) {
  HELIX_REQUIRE_CUDA();
  HELIX_REQUIRE_GPU_PER_RANK();
#if !HELIX_WITH_NCCL
  GTEST_SKIP() << "built without NCCL";
#endif
  ModelConfig c = tiny_config();
  c.hidden = 128;
  c.ffn = 256;
  const double r = testing::tolerance_for(DType::kBF16).rtol;
  for (CpComm m : {CpComm::kRing, CpComm::kAllGather})
    run_esm2_cp({.cp = testing::world_size(),
                 .comm = m,
                 .split_min_len = 30,
                 .device = testing::rank_gpu(),
                 .compute = DType::kBF16,
                 .config = c,
                 .loss_tol = r / 2,
                 .grad_tol = 4 * r,
                 .grad_tol_later = 4 * r,
                 .norm_tol = 2 * r,
                 .backend = CommBackend::kNccl});
}

}  // namespace
}  // namespace helix
