// CPU tests of packed-THD attention: the CPU reference against an exact dense fp64 attention per
// sequence (padding, both masks, both head dims, cu_seqlens_q != cu_seqlens_kv), the LSE merge
// against attention over the concatenated keys (forward, and backward composed with the attention
// backward through dLSE), and the launcher's refusal of every invalid input the issue lists.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

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

// Forward then backward (from the forward's own O and LSE) on the problem's device.
Outputs run(const Problem& p, AttentionBwdMode mode, const Stream& s = Stream()) {
  const Device dev = p.q.device();
  Outputs r;
  r.o = Tensor::empty(p.q.shape(), DType::kBF16, dev, s);
  r.lse = Tensor::empty({p.heads, p.tq}, DType::kF32, dev, s);
  r.o.fill(kNaN, s);
  r.lse.fill(kNaN, s);
  thd_attention_fwd(attn_test::fwd_params(p, r.o, r.lse), s);
  r.dq = Tensor::empty(p.q.shape(), DType::kBF16, dev, s);
  r.dk = Tensor::empty(p.k.shape(), DType::kBF16, dev, s);
  r.dv = Tensor::empty(p.k.shape(), DType::kBF16, dev, s);
  r.dq.fill(kNaN, s);
  r.dk.fill(kNaN, s);
  r.dv.fill(kNaN, s);
  thd_attention_bwd(attn_test::bwd_params(p, r.o, r.lse, mode, r.dq, r.dk, r.dv), s);
  return r;
}

double max_abs(const std::vector<double>& x, const std::vector<char>& valid, int64_t row_elems) {
  return attn_test::max_err(std::vector<float>(x.size(), 0.f), x, valid, row_elems);
}

// The CPU reference (bf16 outputs, fp32 LSE) against the exact dense fp64 attention.
void check_cpu_against_dense(const Problem& p) {
  const Outputs out = run(p, AttentionBwdMode::kDeterministic);
  const Ref ref = attn_test::reference(p, /*naive_bf16=*/false);
  const int64_t row = int64_t{p.heads} * p.dim;
  const std::vector<float> o = out.o.to_floats(), lse = out.lse.to_floats();
  // O is the exact value rounded once to bf16 (relative 2^-9), LSE once to fp32.
  for (int64_t r = 0; r < p.tq; ++r) {
    for (int64_t i = 0; i < row; ++i) {
      const double want = ref.o[r * row + i];
      ASSERT_LE(std::abs(o[r * row + i] - want), 4e-3 * std::abs(want) + 1e-6)
          << "o row " << r << " elem " << i << " (valid " << int(p.q_valid[r]) << ")";
    }
    for (int hh = 0; hh < p.heads; ++hh) {
      const double want = ref.lse[hh * p.tq + r];
      const float got = lse[hh * p.tq + r];
      if (std::isinf(want))
        ASSERT_TRUE(std::isinf(got) && got < 0) << "lse row " << r << ": " << got;
      else
        ASSERT_NEAR(got, want, 1e-5 * std::abs(want) + 1e-5) << "lse row " << r;
    }
  }
  // Gradients: bf16 outputs and the backward's D = dO . O uses the bf16 O, so compare against the
  // largest magnitude (elementwise relative checks break down where dS cancels).
  struct G {
    const char* name;
    const Tensor& got;
    const std::vector<double>& want;
    const std::vector<char>& valid;
  };
  for (const G& g : {G{"dq", out.dq, ref.dq, p.q_valid}, G{"dk", out.dk, ref.dk, p.kv_valid},
                     G{"dv", out.dv, ref.dv, p.kv_valid}}) {
    const std::vector<float> got = g.got.to_floats();
    const double scale = max_abs(g.want, g.valid, row);
    EXPECT_LE(attn_test::max_err(got, g.want, g.valid, row), 1e-2 * scale + 1e-6) << g.name;
    EXPECT_TRUE(attn_test::gap_rows_zero(got, g.valid, row)) << g.name << ": gap rows not zero";
  }
  EXPECT_TRUE(attn_test::gap_rows_zero(o, p.q_valid, row)) << "o: gap rows not zero";
}

TEST(AttentionCpu, MatchesDenseFp64PerSequence) {
  const std::vector<int32_t> lens = {1, 7, 0, 33, 64, 65, 130};
  const std::vector<int32_t> lens_kv = {5, 3, 9, 33, 100, 0, 129};
  uint64_t seed = 11;
  for (int dim : {64, 128}) {
    for (AttentionMask mask : {AttentionMask::kBidirectional, AttentionMask::kCausal}) {
      for (bool padded : {false, true}) {
        for (bool same_kv : {true, false}) {
          SCOPED_TRACE(::testing::Message()
                       << "D=" << dim << " causal=" << (mask == AttentionMask::kCausal)
                       << " padded=" << padded << " same_kv=" << same_kv);
          check_cpu_against_dense(attn_test::make_problem(lens, same_kv ? lens : lens_kv, 2, dim,
                                                          mask, padded, seed++, Device::cpu()));
        }
      }
    }
  }
}

TEST(AttentionCpu, CausalAlignsBottomRight) {
  // len_q = 2, len_kv = 4: query 0 sees keys 0..2, query 1 sees keys 0..3 (FlashAttention-2).
  Problem p =
      attn_test::make_problem({2}, {4}, 1, 64, AttentionMask::kCausal, false, 5, Device::cpu());
  Outputs out = run(p, AttentionBwdMode::kDeterministic);
  const std::vector<float> lse = out.lse.to_floats();
  for (int r = 0; r < 2; ++r) {
    double m = -1e300;
    std::vector<double> sc;
    for (int j = 0; j <= r + 2; ++j) {
      double dot = 0;
      for (int c = 0; c < 64; ++c) dot += double(p.hq[r * 64 + c]) * p.hk[j * 64 + c];
      sc.push_back(dot * p.scale);
      m = std::max(m, sc.back());
    }
    double sum = 0;
    for (double x : sc) sum += std::exp(x - m);
    EXPECT_NEAR(lse[r], m + std::log(sum), 1e-5) << "query " << r;
  }
}

// Splits every sequence's keys into `chunks` pieces (cut points vary, some pieces empty), runs the
// attention per piece, merges, and compares with the attention over all keys.
void check_merge_equals_full(Device dev, const Stream& s) {
  const std::vector<int32_t> lens_q = {3, 64, 1, 77};
  const std::vector<int32_t> lens_kv = {10, 64, 1, 129};
  const int heads = 2, dim = 64, chunks = 3;
  Problem full = attn_test::make_problem(lens_q, lens_kv, heads, dim, AttentionMask::kBidirectional,
                                         true, 21, dev);
  const Outputs ref = run(full, AttentionBwdMode::kDeterministic, s);
  const int64_t row = int64_t{heads} * dim;

  std::vector<Problem> parts;
  std::vector<std::vector<int32_t>> key_begin;  // per part, per sequence: first key of the piece
  for (int c = 0; c < chunks; ++c) {
    Problem part = full;
    std::vector<int32_t> lk(lens_kv.size()), begins(lens_kv.size());
    for (size_t i = 0; i < lens_kv.size(); ++i) {
      // cut points: piece c of sequence i is [L c / chunks + i, L (c + 1) / chunks + i) clamped.
      auto cut = [&](int k) {
        return std::clamp<int32_t>(lens_kv[i] * k / chunks + int32_t(i) * (k % chunks != 0), 0,
                                   lens_kv[i]);
      };
      begins[i] = cut(c);
      lk[i] = cut(c + 1) - cut(c);
    }
    std::vector<int32_t> cu(lk.size() + 1, 0);
    for (size_t i = 0; i < lk.size(); ++i) cu[i + 1] = cu[i] + lk[i];
    part.len_kv = lk;
    part.tk = cu.back();
    part.layout.cu_seqlens_kv = CuSeqlens::make(cu, dev);
    part.layout.cu_seqlens_kv_padded = CuSeqlens();
    part.layout.max_seqlen_kv = *std::max_element(lk.begin(), lk.end());
    // Gather the piece's rows of k, v into packed tensors.
    Tensor hk = full.k.to(Device::cpu()), hv = full.v.to(Device::cpu());
    Tensor pk = Tensor::empty({std::max<int64_t>(part.tk, 1), heads, dim}, DType::kBF16);
    Tensor pv = Tensor::empty({std::max<int64_t>(part.tk, 1), heads, dim}, DType::kBF16);
    for (size_t i = 0; i < lk.size(); ++i)
      for (int32_t j = 0; j < lk[i]; ++j)
        for (int64_t e = 0; e < row; ++e) {
          const int64_t src = (int64_t{full.off_kv[i]} + begins[i] + j) * row + e;
          pk.data<bf16_t>()[(cu[i] + j) * row + e] = hk.data<bf16_t>()[src];
          pv.data<bf16_t>()[(cu[i] + j) * row + e] = hv.data<bf16_t>()[src];
        }
    part.k = pk.slice(0, part.tk).to(dev);
    part.v = pv.slice(0, part.tk).to(dev);
    part.off_kv.assign(cu.begin(), cu.end() - 1);
    parts.push_back(std::move(part));
    key_begin.push_back(begins);
  }

  // Forward: merge of the pieces equals the full attention.
  std::vector<Outputs> po;
  LseMergeFwdParams mf;
  for (const Problem& part : parts) {
    po.push_back(run(part, AttentionBwdMode::kDeterministic, s));
    mf.outs.push_back(po.back().o);
    mf.lses.push_back(po.back().lse);
  }
  mf.out = Tensor::empty(full.q.shape(), DType::kF32, dev, s);
  mf.lse = Tensor::empty({heads, full.tq}, DType::kF32, dev, s);
  mf.out.fill(kNaN, s);
  lse_merge_fwd(mf, s);
  const std::vector<float> merged = mf.out.to_floats(), want = ref.o.to_floats();
  const std::vector<float> mlse = mf.lse.to_floats(), wlse = ref.lse.to_floats();
  for (int64_t r = 0; r < full.tq; ++r) {
    for (int64_t e = 0; e < row; ++e)
      ASSERT_NEAR(merged[r * row + e], want[r * row + e], 1e-2 * std::abs(want[r * row + e]) + 4e-3)
          << "merged o row " << r << " elem " << e;
    for (int hh = 0; hh < heads; ++hh) {
      const float a = mlse[hh * full.tq + r], b = wlse[hh * full.tq + r];
      if (std::isinf(b))
        ASSERT_TRUE(std::isinf(a) && a < 0) << "merged lse row " << r;
      else
        ASSERT_NEAR(a, b, 1e-4 * std::abs(b) + 1e-4) << "merged lse row " << r;
    }
  }

  // Backward: merge backward, then each piece's attention backward with its dO_i and dLSE_i, sums
  // to the full backward (dQ summed over pieces, dK and dV scattered back to their rows).
  LseMergeBwdParams mb;
  mb.d_out = full.d_o;
  mb.outs = mf.outs;
  mb.lses = mf.lses;
  for (size_t c = 0; c < parts.size(); ++c) {
    mb.d_outs.push_back(Tensor::empty(full.q.shape(), DType::kBF16, dev, s));
    mb.d_lses.push_back(Tensor::empty({heads, full.tq}, DType::kF32, dev, s));
  }
  lse_merge_bwd(mb, s);
  std::vector<double> dq(full.tq * row, 0.0), dk(full.tk * row, 0.0), dv(full.tk * row, 0.0);
  for (size_t c = 0; c < parts.size(); ++c) {
    const Problem& part = parts[c];
    ThdAttentionBwdParams b =
        attn_test::bwd_params(part, po[c].o, po[c].lse, AttentionBwdMode::kDeterministic,
                              Tensor::empty(full.q.shape(), DType::kBF16, dev, s),
                              Tensor::empty(part.k.shape(), DType::kBF16, dev, s),
                              Tensor::empty(part.k.shape(), DType::kBF16, dev, s));
    b.d_o = mb.d_outs[c];
    b.d_lse = mb.d_lses[c];
    thd_attention_bwd(b, s);
    const std::vector<float> pdq = b.d_q.to_floats(), pdk = b.d_k.to_floats(),
                             pdv = b.d_v.to_floats();
    for (int64_t i = 0; i < full.tq * row; ++i) dq[i] += pdq[i];
    for (size_t i = 0; i < lens_kv.size(); ++i)
      for (int32_t j = 0; j < part.len_kv[i]; ++j)
        for (int64_t e = 0; e < row; ++e) {
          const int64_t dst = (int64_t{full.off_kv[i]} + key_begin[c][i] + j) * row + e;
          const int64_t src = (int64_t{part.off_kv[i]} + j) * row + e;
          dk[dst] = pdk[src];
          dv[dst] = pdv[src];
        }
  }
  struct G {
    const char* name;
    const std::vector<double>& got;
    const Tensor& want;
    const std::vector<char>& valid;
  };
  for (const G& g : {G{"dq", dq, ref.dq, full.q_valid}, G{"dk", dk, ref.dk, full.kv_valid},
                     G{"dv", dv, ref.dv, full.kv_valid}}) {
    const std::vector<float> wf = g.want.to_floats();
    const std::vector<double> w(wf.begin(), wf.end());
    EXPECT_LE(attn_test::max_err(g.got, w, g.valid, row), 2e-2 * max_abs(w, g.valid, row) + 1e-4)
        << g.name;
  }
}

TEST(AttentionCpu, LseMergeEqualsAttentionOverConcatenatedKeys) {
  check_merge_equals_full(Device::cpu(), Stream());
}

TEST(AttentionCpu, LseMergeRowsWithoutKeys) {
  // Two parts; row 0 empty in both (-inf), row 1 empty in part 0 only.
  Tensor o0 = Tensor::from_floats({1, 2, 3, 4}, {2, 1, 2}, DType::kF32);
  Tensor o1 = Tensor::from_floats({5, 6, 7, 8}, {2, 1, 2}, DType::kF32);
  const float inf = std::numeric_limits<float>::infinity();
  Tensor l0 = Tensor::from_floats({-inf, -inf}, {1, 2}, DType::kF32);
  Tensor l1 = Tensor::from_floats({-inf, 0.5f}, {1, 2}, DType::kF32);
  LseMergeFwdParams p{{o0, o1},
                      {l0, l1},
                      Tensor::empty({2, 1, 2}, DType::kBF16),
                      Tensor::empty({1, 2}, DType::kF32)};
  lse_merge_fwd(p, Stream());
  EXPECT_EQ(p.out.to_floats(), (std::vector<float>{0, 0, 7, 8}));
  const std::vector<float> l = p.lse.to_floats();
  EXPECT_TRUE(std::isinf(l[0]) && l[0] < 0);
  EXPECT_FLOAT_EQ(l[1], 0.5f);
}

// ---- validation: every invalid input the issue lists is refused with a message naming it ------

struct Bad {
  std::string what;  // expected substring of the message
  std::function<void(ThdAttentionFwdParams&)> spoil;
};

void expect_refused(const ThdAttentionFwdParams& good, const Bad& bad) {
  ThdAttentionFwdParams p = good;
  bad.spoil(p);
  try {
    thd_attention_fwd(p, Stream());
    ADD_FAILURE() << "not refused: " << bad.what;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(bad.what), std::string::npos) << e.what();
  }
}

TEST(AttentionCpu, LauncherRefusesInvalidInput) {
  Problem p = attn_test::make_problem({5, 9}, {5, 9}, 2, 64, AttentionMask::kCausal, false, 3,
                                      Device::cpu());
  const ThdAttentionFwdParams good = attn_test::fwd_params(
      p, Tensor::empty(p.q.shape(), DType::kBF16), Tensor::empty({2, p.tq}, DType::kF32));
  EXPECT_NO_THROW(thd_attention_fwd(good, Stream()));
  const Device cpu = Device::cpu();
  const std::vector<Bad> cases = {
      {"cu_seqlens_q: expected non-decreasing offsets, got entry 2 = 3 after entry 1 = 5",
       [&](auto& f) {
         f.layout.cu_seqlens_q = CuSeqlens::make({0, 5, 3}, cpu);
       }},
      {"cu_seqlens_kv: expected offsets within k",
       [&](auto& f) {
         f.layout.cu_seqlens_kv = CuSeqlens::make({0, 5, 40}, cpu);
       }},
      {"cu_seqlens_q: expected entry 0 to be 0, got 1",
       [&](auto& f) {
         f.layout.cu_seqlens_q = CuSeqlens::make({1, 5, 14}, cpu);
       }},
      {"cu_seqlens_kv: expected 3 entries",
       [&](auto& f) {
         f.layout.cu_seqlens_kv = CuSeqlens::make({0, 14}, cpu);
       }},
      {"cu_seqlens_q: the device copy is undefined",
       [&](auto& f) { f.layout.cu_seqlens_q.device = Tensor(); }},
      {"cu_seqlens_q: expected the device copy of shape [3]",
       [&](auto& f) {
         f.layout.cu_seqlens_q.device = Tensor::from_vector<int32_t>({0, 5}, {2});
       }},
      {"cu_seqlens_q_padded: expected sequence 1 to span at least its true length 9",
       [&](auto& f) {
         f.layout.cu_seqlens_q_padded = CuSeqlens::make({0, 8, 14}, cpu);
       }},
      {"max_seqlen_q: expected at least the longest sequence (9 tokens, sequence 1), got 8",
       [&](auto& f) { f.layout.max_seqlen_q = 8; }},
      {"max_seqlen_kv: expected at least the longest sequence",
       [&](auto& f) { f.layout.max_seqlen_kv = 0; }},
      {"q: expected head dim 1 to 256, got 300",  // CPU; CUDA takes 16, 24, 32, 64, 128
       [&](auto& f) {
         f.q = Tensor::zeros({p.tq, 1, 300}, DType::kBF16);
       }},
      {"k: expected shape [",
       [&](auto& f) {
         f.k = Tensor::zeros({p.tk, 1, 64}, DType::kBF16);
       }},
      {"v: expected dtype bf16 (as q), got f32",
       [&](auto& f) {
         f.v = Tensor::zeros({p.tk, 2, 64}, DType::kF32);
       }},
      {"q: expected a 16-byte aligned data pointer",
       [&](auto& f) {
         f.q = Tensor::zeros({p.tq * 128 + 1}, DType::kBF16)
                   .slice(1, p.tq * 128 + 1)
                   .view({p.tq, 2, 64});
       }},
      {"lse: expected shape [2, 16] ([H, T]), got [16, 2]",
       [&](auto& f) {
         f.lse = Tensor::empty({p.tq, 2}, DType::kF32);
       }},
      {"o: expected dtype bf16", [&](auto& f) { f.o = Tensor::empty(p.q.shape(), DType::kF32); }},
      {"softmax_scale: expected a positive finite value, got 0",
       [&](auto& f) { f.softmax_scale = 0.f; }},
  };
  for (const Bad& b : cases) expect_refused(good, b);
}

TEST(AttentionCpu, MergeRefusesMismatchedParts) {
  Tensor o = Tensor::zeros({4, 2, 8}, DType::kF32), l = Tensor::zeros({2, 4}, DType::kF32);
  LseMergeFwdParams p{{o, Tensor::zeros({4, 2, 4}, DType::kF32)},
                      {l, l},
                      Tensor::zeros({4, 2, 8}, DType::kF32),
                      Tensor::zeros({2, 4}, DType::kF32)};
  EXPECT_THROW(lse_merge_fwd(p, Stream()), Error);
  LseMergeFwdParams q{std::vector<Tensor>(kMaxLseMergeParts + 1, o),
                      std::vector<Tensor>(kMaxLseMergeParts + 1, l), o, l};
  try {
    lse_merge_fwd(q, Stream());
    ADD_FAILURE() << "9 parts not refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected 1 to 8 partial outputs, got 9"),
              std::string::npos)
        << e.what();
  }
}

TEST(AttentionCpu, FlopCount) {
  ThdAttentionLayout b;
  b.cu_seqlens_q = CuSeqlens::make({0, 3, 10}, Device::cpu());
  b.cu_seqlens_kv = CuSeqlens::make({0, 4, 6}, Device::cpu());
  EXPECT_DOUBLE_EQ(thd_attention_fwd_flops(b, 2, 64, AttentionMask::kBidirectional),
                   4.0 * 2 * 64 * (12 + 14));
  EXPECT_DOUBLE_EQ(thd_attention_fwd_flops(b, 2, 64, AttentionMask::kCausal),
                   2.0 * 2 * 64 * (12 + 14));
}

}  // namespace
}  // namespace helix
