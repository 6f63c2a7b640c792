// GPU tests of packed-THD attention (skipped without a GPU; one CPU test checks the harness). The
// flash-attention rule: for O, dQ, dK and dV the kernel's max error against an exact fp64 attention
// is at most twice the error of a naive bf16 attention against the same reference; lengths 1, 7,
// 63, 64, 65, 127, 1023, 1026, 4097 and many sequences per batch, padding between sequences,
// cu_seqlens_q != cu_seqlens_kv, both masks, head dims 64 and 128 (ESM-2 650M, 15B) and 16, 24, 32
// (8M, 35M, 150M; 24 runs in zero-padded tiles of 32), both D = 128 forward tilings (16 and 32
// query rows a warp), both backward modes with every dK/dV tiling (64-key and 128-key CTAs, and
// the tiled-2D kernel with P^T / dS^T through shared memory), and on sm_90 the wgmma forward and
// backward at head dims 64 and 128.
// Outputs are poisoned with NaN before every run and the inputs' gap rows hold NaN, so unwritten
// outputs and reads outside the sequences both show.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "kernels/attention/attention.h"
#include "test_attention_ref.h"
#include "test_util.h"

namespace helix {
namespace {

using attn_test::Problem;
using attn_test::Ref;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct Outputs {
  Tensor o, lse, dq, dk, dv;
};

Outputs run_fwd(const Problem& p, const Stream& s,
                AttentionFwdTiling tiling = AttentionFwdTiling::kDefault) {
  Outputs r;
  r.o = Tensor::empty(p.q.shape(), DType::kBF16, p.q.device(), s);
  r.lse = Tensor::empty({p.heads, p.tq}, DType::kF32, p.q.device(), s);
  r.o.fill(kNaN, s);
  r.lse.fill(kNaN, s);
  ThdAttentionFwdParams f = attn_test::fwd_params(p, r.o, r.lse);
  f.tiling = tiling;
  thd_attention_fwd(f, s);
  s.synchronize();  // host reads go through the legacy stream, which does not wait for `s`
  return r;
}

void run_bwd(const Problem& p, Outputs& r, AttentionBwdMode mode, AttentionBwdTiling tiling,
             const Stream& s) {
  r.dq = Tensor::empty(p.q.shape(), DType::kBF16, p.q.device(), s);
  r.dk = Tensor::empty(p.k.shape(), DType::kBF16, p.q.device(), s);
  r.dv = Tensor::empty(p.k.shape(), DType::kBF16, p.q.device(), s);
  r.dq.fill(kNaN, s);
  r.dk.fill(kNaN, s);
  r.dv.fill(kNaN, s);
  ThdAttentionBwdParams b = attn_test::bwd_params(p, r.o, r.lse, mode, r.dq, r.dk, r.dv);
  b.tiling = tiling;
  thd_attention_bwd(b, s);
  s.synchronize();
}

// LSEs equal within atol, -inf where the reference is -inf.
::testing::AssertionResult lse_close(const Tensor& got, const Tensor& want, double atol) {
  const std::vector<float> a = got.to_floats(), b = want.to_floats();
  for (size_t i = 0; i < a.size(); ++i) {
    const bool ok = std::isinf(b[i]) ? a[i] == b[i] : std::abs(double(a[i]) - b[i]) <= atol;
    if (!ok)
      return ::testing::AssertionFailure() << "lse entry " << i << ": " << a[i] << " vs " << b[i];
  }
  return ::testing::AssertionSuccess();
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  const Tensor ha = a.to(Device::cpu()), hb = b.to(Device::cpu());
  return ha.nbytes() == hb.nbytes() && std::memcmp(ha.data_ptr(), hb.data_ptr(), ha.nbytes()) == 0;
}

// The Hopper wgmma kernels run at head dims 64 and 128 on compute capability 9.0.
bool has_wgmma(int dim) {
  return (dim == 64 || dim == 128) && cuda_available() && cuda_compute_capability(0) == 90;
}

// Runs forward and both backward modes on the GPU and checks every output against the fp64 and
// naive-bf16 references computed on the host.
void check_flash_rule(const std::vector<int32_t>& lq, const std::vector<int32_t>& lk, int heads,
                      int dim, AttentionMask mask, bool padded, uint64_t seed,
                      Device device = Device::cuda()) {
  SCOPED_TRACE(::testing::Message()
               << "D=" << dim << " H=" << heads << " causal=" << (mask == AttentionMask::kCausal)
               << " padded=" << padded << " b=" << lq.size() << " seed=" << seed);
  const Problem p = attn_test::make_problem(lq, lk, heads, dim, mask, padded, seed, device);
  const Ref exact = attn_test::reference(p, /*naive_bf16=*/false);
  const Ref naive = attn_test::reference(p, /*naive_bf16=*/true);
  const int64_t row = int64_t{heads} * dim;
  const Stream s = Stream::create(device);

  Outputs out = run_fwd(p, s);
  const std::vector<float> o = out.o.to_floats(), lse = out.lse.to_floats();
  const double err_o = attn_test::max_err(o, exact.o, p.q_valid, row);
  const double naive_o = attn_test::max_err(naive.o, exact.o, p.q_valid, row);
  EXPECT_LE(err_o, 2 * naive_o + 1e-5) << "O: kernel error " << err_o << ", naive bf16 " << naive_o;
  EXPECT_TRUE(attn_test::gap_rows_zero(o, p.q_valid, row)) << "O: gap rows not zero";
  for (int64_t r = 0; r < p.tq; ++r) {
    for (int hh = 0; hh < heads; ++hh) {
      const double want = exact.lse[hh * p.tq + r];
      const float got = lse[hh * p.tq + r];
      if (std::isinf(want))
        ASSERT_TRUE(std::isinf(got) && got < 0) << "lse row " << r << " head " << hh << ": " << got;
      else
        ASSERT_NEAR(got, want, 1e-3) << "lse row " << r << " head " << hh;
    }
  }
  // Same semantics as the CPU reference (one bf16 rounding apart).
  Tensor cpu_o = Tensor::empty(p.q.shape(), DType::kBF16),
         cpu_lse = Tensor::empty({heads, p.tq}, DType::kF32);
  {
    Problem hp = p;
    hp.q = p.q.to(Device::cpu());
    hp.k = p.k.to(Device::cpu());
    hp.v = p.v.to(Device::cpu());
    hp.layout.cu_seqlens_q = CuSeqlens::make(p.layout.cu_seqlens_q.host, Device::cpu());
    hp.layout.cu_seqlens_kv = CuSeqlens::make(p.layout.cu_seqlens_kv.host, Device::cpu());
    if (padded) {
      hp.layout.cu_seqlens_q_padded =
          CuSeqlens::make(p.layout.cu_seqlens_q_padded.host, Device::cpu());
      hp.layout.cu_seqlens_kv_padded =
          CuSeqlens::make(p.layout.cu_seqlens_kv_padded.host, Device::cpu());
    }
    thd_attention_fwd(attn_test::fwd_params(hp, cpu_o, cpu_lse), Stream());
  }
  EXPECT_TRUE(
      testing::all_close(out.o.to(Device::cpu()), cpu_o, testing::tolerance_for(DType::kBF16)));
  // The other forward kernels of the GPU, same checks. kDefault ran the wgmma kernel where there
  // is one (D = 64, 128 on sm_90), so the mma.sync kernel runs through kRows32 there (32 query rows
  // a warp; at D = 128 also elsewhere, Q re-read from shared memory), and kRows16 at D = 128.
  std::vector<AttentionFwdTiling> fwd_tilings;
  if (device.is_cuda() && (dim == 128 || has_wgmma(dim)))
    fwd_tilings.push_back(AttentionFwdTiling::kRows32);
  if (device.is_cuda() && dim == 128 && has_wgmma(dim))
    fwd_tilings.push_back(AttentionFwdTiling::kRows16);
  for (AttentionFwdTiling tiling : fwd_tilings) {
    SCOPED_TRACE(tiling == AttentionFwdTiling::kRows32 ? "mma.sync forward, 32 query rows a warp"
                                                       : "mma.sync forward, 16 query rows a warp");
    const Outputs w = run_fwd(p, s, tiling);
    const std::vector<float> o32 = w.o.to_floats(), lse32 = w.lse.to_floats();
    const double err = attn_test::max_err(o32, exact.o, p.q_valid, row);
    EXPECT_LE(err, 2 * naive_o + 1e-5) << "O: kernel error " << err << ", naive bf16 " << naive_o;
    EXPECT_TRUE(attn_test::gap_rows_zero(o32, p.q_valid, row)) << "O: gap rows not zero";
    for (size_t i = 0; i < lse32.size(); ++i) {
      if (std::isinf(exact.lse[i]))
        ASSERT_TRUE(std::isinf(lse32[i]) && lse32[i] < 0) << "lse entry " << i << ": " << lse32[i];
      else
        ASSERT_NEAR(lse32[i], exact.lse[i], 1e-3) << "lse entry " << i;
    }
  }

  // Every backward mode with every dK/dV tiling of the GPU (64-key and 128-key CTAs, tiled 2-D;
  // the CPU reference has no tiling).
  std::vector<AttentionBwdTiling> tilings = {AttentionBwdTiling::kKeys64};
  if (device.is_cuda()) {
    tilings.push_back(AttentionBwdTiling::kKeys128);
    tilings.push_back(AttentionBwdTiling::kTiled2D);
    if (has_wgmma(dim)) tilings.push_back(AttentionBwdTiling::kWgmma);
  }
  for (AttentionBwdMode mode : {AttentionBwdMode::kAtomic, AttentionBwdMode::kDeterministic})
    for (AttentionBwdTiling tiling : tilings) {
      SCOPED_TRACE(mode == AttentionBwdMode::kAtomic ? "atomic dQ" : "deterministic");
      SCOPED_TRACE(tiling == AttentionBwdTiling::kKeys64    ? "64-key tiles"
                   : tiling == AttentionBwdTiling::kKeys128 ? "128-key tiles"
                   : tiling == AttentionBwdTiling::kTiled2D ? "tiled 2-D"
                                                            : "wgmma");
      run_bwd(p, out, mode, tiling, s);
      struct G {
        const char* name;
        const Tensor& got;
        const std::vector<double>& exact;
        const std::vector<double>& naive;
        const std::vector<char>& valid;
      };
      for (const G& g : {G{"dQ", out.dq, exact.dq, naive.dq, p.q_valid},
                         G{"dK", out.dk, exact.dk, naive.dk, p.kv_valid},
                         G{"dV", out.dv, exact.dv, naive.dv, p.kv_valid}}) {
        const std::vector<float> got = g.got.to_floats();
        const double err = attn_test::max_err(got, g.exact, g.valid, row);
        const double err_naive = attn_test::max_err(g.naive, g.exact, g.valid, row);
        EXPECT_LE(err, 2 * err_naive + 1e-5)
            << g.name << ": kernel error " << err << ", naive bf16 " << err_naive;
        EXPECT_TRUE(attn_test::gap_rows_zero(got, g.valid, row)) << g.name << ": gap rows not zero";
      }
      // dK and dV are owned by one CTA per key tile in both modes; the deterministic mode makes dQ
      // reproducible too.
      Outputs again = out;
      run_bwd(p, again, mode, tiling, s);
      EXPECT_TRUE(bitwise_equal(out.dk, again.dk)) << "dK differs between two runs";
      EXPECT_TRUE(bitwise_equal(out.dv, again.dv)) << "dV differs between two runs";
      if (mode == AttentionBwdMode::kDeterministic)
        EXPECT_TRUE(bitwise_equal(out.dq, again.dq)) << "dQ differs between two deterministic runs";
    }
}

const std::vector<int32_t> kIssueLengths = {1, 7, 63, 64, 65, 127, 1023, 1026};

// The harness itself, on the CPU reference (whose only error is the final bf16 rounding): the rule
// must hold there too, so a GPU failure points at the kernel, not at the references.
TEST(AttentionCpu, FlashRuleHoldsForCpuReference) {
  check_flash_rule({1, 7, 63, 64, 65, 127, 300}, {1, 7, 63, 64, 65, 127, 300}, 2, 64,
                   AttentionMask::kCausal, true, 1, Device::cpu());
  check_flash_rule({1, 7, 0, 63, 200, 9}, {5, 3, 9, 64, 130, 0}, 2, 128,
                   AttentionMask::kBidirectional, false, 2, Device::cpu());
  for (int dim : {16, 24})  // the small head dims of ESM-2 8M and 35M
    check_flash_rule({1, 63, 65, 300}, {1, 63, 70, 300}, 2, dim, AttentionMask::kCausal, true,
                     3 + dim, Device::cpu());
}

// Head dims of the ESM-2 models: 128 (15B), 64 (650M, 3B), 32 (150M), 24 (35M), 16 (8M).
const std::vector<int> kAllDims = {16, 24, 32, 64, 128};

// Small shapes through every path (both masks, all head dims, padding, cu_q != cu_kv, empty
// sequences); fast enough for compute-sanitizer (memcheck, racecheck, synccheck).
TEST(AttentionGpu, SmallShapesAllPaths) {
  HELIX_REQUIRE_CUDA();
  uint64_t seed = 50;
  for (int dim : kAllDims)
    for (AttentionMask mask : {AttentionMask::kBidirectional, AttentionMask::kCausal})
      check_flash_rule({1, 0, 7, 65, 130}, {5, 4, 0, 64, 129}, 2, dim, mask, /*padded=*/true,
                       seed++);
}

TEST(AttentionGpu, FlashRuleIssueLengthsPadded) {
  HELIX_REQUIRE_CUDA();
  uint64_t seed = 100;
  for (int dim : kAllDims)
    for (AttentionMask mask : {AttentionMask::kBidirectional, AttentionMask::kCausal})
      check_flash_rule(kIssueLengths, kIssueLengths, 2, dim, mask, /*padded=*/true, seed++);
}

TEST(AttentionGpu, FlashRuleDifferentQueryAndKeyLengths) {
  HELIX_REQUIRE_CUDA();
  // Includes empty sequences on either side and len_kv < len_q (causal rows that see no key).
  const std::vector<int32_t> lq = {1, 7, 0, 63, 64, 65, 127, 1023, 9};
  const std::vector<int32_t> lk = {5, 3, 9, 64, 100, 65, 1, 1026, 0};
  uint64_t seed = 200;
  for (int dim : kAllDims)
    for (AttentionMask mask : {AttentionMask::kBidirectional, AttentionMask::kCausal})
      for (bool padded : {false, true}) check_flash_rule(lq, lk, 3, dim, mask, padded, seed++);
}

TEST(AttentionGpu, FlashRuleLongSequence) {
  HELIX_REQUIRE_CUDA();
  uint64_t seed = 300;
  for (int dim : {64, 128})
    for (AttentionMask mask : {AttentionMask::kBidirectional, AttentionMask::kCausal})
      check_flash_rule({4097, 65}, {4097, 65}, 1, dim, mask, /*padded=*/false, seed++);
}

TEST(AttentionGpu, FlashRuleManySequences) {
  HELIX_REQUIRE_CUDA();
  std::mt19937 rng(7);
  std::vector<int32_t> lens(300);
  for (int32_t& l : lens) l = 1 + static_cast<int32_t>(rng() % 300);
  uint64_t seed = 400;
  for (int dim : {32, 64, 128})
    for (AttentionMask mask : {AttentionMask::kBidirectional, AttentionMask::kCausal})
      check_flash_rule(lens, lens, 2, dim, mask, /*padded=*/true, seed++);
}

TEST(AttentionGpu, LseMergeMatchesCpuAndConcatenatedKeys) {
  HELIX_REQUIRE_CUDA();
  const Stream s = Stream::create(Device::cuda());
  // Merge of two attentions over key halves equals the attention over all keys (GPU throughout).
  const std::vector<int32_t> lq = {5, 300, 64}, lk = {9, 700, 128}, half = {4, 350, 64};
  const Problem full = attn_test::make_problem(lq, lk, 2, 64, AttentionMask::kBidirectional, false,
                                               501, Device::cuda());
  const Outputs ref = run_fwd(full, s);
  std::vector<Outputs> parts;
  for (int c = 0; c < 2; ++c) {
    Problem part = full;
    std::vector<int32_t> len(lk.size()), cu(lk.size() + 1, 0), off(lk.size() + 1, 0);
    for (size_t i = 0; i < lk.size(); ++i) {
      len[i] = c == 0 ? half[i] : lk[i] - half[i];
      cu[i + 1] = cu[i] + len[i];
      off[i] = full.off_kv[i] + (c == 0 ? 0 : half[i]);
    }
    // Piece c of sequence i starts at row off[i] of the full k/v; offsets must start at 0, so the
    // tensors are sliced from the first piece's row and the offsets shifted by it.
    const int32_t shift = off[0];
    for (int32_t& x : off) x -= shift;
    part.k = full.k.slice(shift, full.tk);
    part.v = full.v.slice(shift, full.tk);
    part.tk = full.tk - shift;
    off.back() = static_cast<int32_t>(part.tk);
    part.layout.cu_seqlens_kv = CuSeqlens::make(cu, Device::cuda());
    part.layout.cu_seqlens_kv_padded = CuSeqlens::make(off, Device::cuda());
    part.layout.max_seqlen_kv = *std::max_element(len.begin(), len.end());
    part.len_kv = len;
    parts.push_back(run_fwd(part, s));
  }
  for (DType out_dtype : {DType::kF32, DType::kBF16}) {
    LseMergeFwdParams m;
    m.outs = {parts[0].o, parts[1].o};
    m.lses = {parts[0].lse, parts[1].lse};
    m.out = Tensor::empty(full.q.shape(), out_dtype, Device::cuda(), s);
    m.lse = Tensor::empty({2, full.tq}, DType::kF32, Device::cuda(), s);
    m.out.fill(kNaN, s);
    m.lse.fill(kNaN, s);
    lse_merge_fwd(m, s);
    s.synchronize();
    EXPECT_TRUE(testing::all_close(m.out.to(Device::cpu()).to(DType::kF32),
                                   ref.o.to(Device::cpu()).to(DType::kF32),
                                   testing::tolerance_for(DType::kBF16)));
    EXPECT_TRUE(lse_close(m.lse, ref.lse, 1e-4));
    // CPU merge of the same partials.
    LseMergeFwdParams h;
    h.outs = {parts[0].o.to(Device::cpu()), parts[1].o.to(Device::cpu())};
    h.lses = {parts[0].lse.to(Device::cpu()), parts[1].lse.to(Device::cpu())};
    h.out = Tensor::empty(full.q.shape(), out_dtype);
    h.lse = Tensor::empty({2, full.tq}, DType::kF32);
    lse_merge_fwd(h, Stream());
    EXPECT_TRUE(testing::all_close(
        m.out.to(Device::cpu()), h.out,
        testing::tolerance_for(out_dtype == DType::kF32 ? DType::kF32 : DType::kBF16)));
  }
  // Backward against the CPU merge backward, with and without a dLSE.
  Tensor d_lse = Tensor::empty({2, full.tq}, DType::kF32, Device::cuda(), s);
  fill_normal(d_lse, 9, 1, 0.f, 1.f, s);
  s.synchronize();
  for (bool with_dlse : {false, true}) {
    LseMergeBwdParams g, h;
    g.d_out = full.d_o;
    g.d_lse = with_dlse ? d_lse : Tensor();
    g.outs = {parts[0].o, parts[1].o};
    g.lses = {parts[0].lse, parts[1].lse};
    h.d_out = full.d_o.to(Device::cpu());
    h.d_lse = with_dlse ? d_lse.to(Device::cpu()) : Tensor();
    h.outs = {parts[0].o.to(Device::cpu()), parts[1].o.to(Device::cpu())};
    h.lses = {parts[0].lse.to(Device::cpu()), parts[1].lse.to(Device::cpu())};
    for (int c = 0; c < 2; ++c) {
      g.d_outs.push_back(Tensor::empty(full.q.shape(), DType::kBF16, Device::cuda(), s));
      g.d_lses.push_back(Tensor::empty({2, full.tq}, DType::kF32, Device::cuda(), s));
      g.d_outs.back().fill(kNaN, s);
      g.d_lses.back().fill(kNaN, s);
      h.d_outs.push_back(Tensor::empty(full.q.shape(), DType::kBF16));
      h.d_lses.push_back(Tensor::empty({2, full.tq}, DType::kF32));
    }
    lse_merge_bwd(g, s);
    s.synchronize();
    lse_merge_bwd(h, Stream());
    for (int c = 0; c < 2; ++c) {
      EXPECT_TRUE(testing::all_close(g.d_outs[c].to(Device::cpu()), h.d_outs[c],
                                     testing::tolerance_for(DType::kBF16)));
      EXPECT_TRUE(testing::all_close(g.d_lses[c].to(Device::cpu()), h.d_lses[c], {1e-4, 1e-4}));
    }
  }
}

TEST(AttentionGpu, LauncherRefusesMisalignedPointersAndHeadDims) {
  HELIX_REQUIRE_CUDA();
  Problem p = attn_test::make_problem({5, 9}, {5, 9}, 2, 64, AttentionMask::kBidirectional, false,
                                      3, Device::cuda());
  ThdAttentionFwdParams f =
      attn_test::fwd_params(p, Tensor::empty(p.q.shape(), DType::kBF16, Device::cuda()),
                            Tensor::empty({2, p.tq}, DType::kF32, Device::cuda()));
  f.k = Tensor::zeros({p.tk * 128 + 4}, DType::kBF16, Device::cuda())
            .slice(4, p.tk * 128 + 4)
            .view({p.tk, 2, 64});
  try {
    thd_attention_fwd(f, Stream());
    ADD_FAILURE() << "misaligned k not refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("k: expected a 16-byte aligned data pointer"),
              std::string::npos)
        << e.what();
  }
  // Head dims without a CUDA kernel are refused with the list of those that have one (the CPU
  // reference takes them).
  for (int dim : {8, 40, 48, 96}) {
    Problem bad = attn_test::make_problem({5, 9}, {5, 9}, 2, dim, AttentionMask::kBidirectional,
                                          false, 4, Device::cuda());
    try {
      thd_attention_fwd(
          attn_test::fwd_params(bad, Tensor::empty(bad.q.shape(), DType::kBF16, Device::cuda()),
                                Tensor::empty({2, bad.tq}, DType::kF32, Device::cuda())),
          Stream());
      ADD_FAILURE() << "head dim " << dim << " not refused";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(
                    fmt::format("q: expected head dim 16, 24, 32, 64 or 128 on CUDA, got {}", dim)),
                std::string::npos)
          << e.what();
    }
  }
  // The wgmma tiling is refused where it has no kernel (head dim 32, or a GPU other than sm_90),
  // with the reason, instead of running another kernel behind the caller's back.
  {
    Problem d32 = attn_test::make_problem({5, 9}, {5, 9}, 2, 32, AttentionMask::kBidirectional,
                                          false, 5, Device::cuda());
    ThdAttentionFwdParams w =
        attn_test::fwd_params(d32, Tensor::empty(d32.q.shape(), DType::kBF16, Device::cuda()),
                              Tensor::empty({2, d32.tq}, DType::kF32, Device::cuda()));
    w.tiling = AttentionFwdTiling::kWgmma;
    try {
      thd_attention_fwd(w, Stream());
      ADD_FAILURE() << "wgmma tiling at head dim 32 not refused";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("kWgmma needs head dim 64 or 128 on a compute "
                                           "capability 9.0 GPU, got head dim 32"),
                std::string::npos)
          << e.what();
    }
  }
  // Host-side cu_seqlens on the wrong device are refused too.
  f = attn_test::fwd_params(p, Tensor::empty(p.q.shape(), DType::kBF16, Device::cuda()),
                            Tensor::empty({2, p.tq}, DType::kF32, Device::cuda()));
  f.layout.cu_seqlens_q = CuSeqlens::make(p.layout.cu_seqlens_q.host, Device::cpu());
  EXPECT_THROW(thd_attention_fwd(f, Stream()), Error);
}

}  // namespace
}  // namespace helix
