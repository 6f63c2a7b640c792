// Embedding with ESM-2 token dropout: Hugging Face's numbers on a hand-made batch, the CPU
// reference against plain double loops (forward, backward with accumulation), backward as the
// adjoint of forward, CUDA against the CPU (forward bit-exact) on odd, large-vocabulary and large
// shapes, out-of-range ids on CUDA, bitwise determinism of the CUDA backward, and validation
// messages.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/embedding/embedding.h"

namespace helix {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::close_within;
using testing::doubles;
using testing::fresh_seed;
using testing::host;
using testing::near_doubles;
using testing::on;
using testing::on_misaligned;
using testing::poisoned;
using testing::random_cu_seqlens;
using testing::random_tensor;
using testing::tolerance_for;

constexpr int32_t kMask = 32;  // ESM-2's <mask>

TEST(EmbeddingCpu, TokenDropoutFollowsHuggingFace) {
  // Two sequences: [5, mask, 7, 9] (1 of 4 masked) and [5, 7] (none), then one padding token.
  Tensor table = Tensor::zeros({33, 2}, DType::kF32);
  for (int v = 0; v < 33; ++v) {
    table.data<float>()[v * 2] = 1.f + v;
    table.data<float>()[v * 2 + 1] = -0.5f * v;
  }
  EmbeddingFwdParams p;
  p.ids = Tensor::from_vector<int32_t>({5, kMask, 7, 9, 5, 7, 1}, {7});
  p.table = table;
  p.out = Tensor::zeros({7, 2}, DType::kF32);
  p.token_dropout = {true, kMask, Tensor::from_vector<int32_t>({0, 4, 6}, {3})};
  embedding_fwd(p, Stream());
  const std::vector<float> y = p.out.to_floats();
  // HF: (emb * (1 - 0.15 * 0.8)) / (1 - masked / length), fp32.
  const float keep = static_cast<float>(1.0 - 0.15 * 0.8);
  const float d1 = 1.f - 1.f / 4.f, d2 = 1.f, d3 = 1.f;
  auto hf = [&](int v, int c, float d) { return (table.data<float>()[v * 2 + c] * keep) / d; };
  const std::vector<float> expected = {hf(5, 0, d1), hf(5, 1, d1), 0.f,          0.f,
                                       hf(7, 0, d1), hf(7, 1, d1), hf(9, 0, d1), hf(9, 1, d1),
                                       hf(5, 0, d2), hf(5, 1, d2), hf(7, 0, d2), hf(7, 1, d2),
                                       hf(1, 0, d3), hf(1, 1, d3)};
  EXPECT_EQ(y, expected);
  EXPECT_NEAR(y[0], 6.0 * 0.88 / 0.75, 1e-5);
}

struct Case {
  int64_t T, V, C;
  DType table, out;  // out is also dout's dtype in the backward
  bool dropout;
};
std::string name(const Case& c) {
  return fmt::format("T={} V={} C={} table {} out {}{}", c.T, c.V, c.C, dtype_name(c.table),
                     dtype_name(c.out), c.dropout ? " +token dropout" : "");
}

struct Inputs {
  Tensor ids, table, dout, dtable0;
  EmbeddingTokenDropout td;
  std::vector<int32_t> cu;
};
Inputs make_inputs(const Case& c, uint64_t seed) {
  Inputs in;
  std::mt19937_64 rng(seed);
  const int32_t mask = static_cast<int32_t>(c.V - 1 < kMask ? c.V - 1 : kMask);
  std::vector<int32_t> ids(static_cast<size_t>(c.T));
  for (int32_t& id : ids) {
    const bool masked = c.dropout && std::uniform_real_distribution<double>(0, 1)(rng) < 0.12;
    id = masked ? mask
                : static_cast<int32_t>(std::uniform_int_distribution<int64_t>(0, c.V - 1)(rng));
  }
  in.ids = Tensor::from_vector<int32_t>(ids, {c.T});
  in.table = random_tensor({c.V, c.C}, c.table, seed, 0, -1.f, 1.f);
  in.dout = random_tensor({c.T, c.C}, c.out, seed, 1, -1.f, 1.f);
  in.dtable0 = random_tensor({c.V, c.C}, DType::kF32, seed, 2, -1.f, 1.f);
  if (c.dropout) {
    in.cu = random_cu_seqlens(c.T, seed, nullptr, 300);
    in.td = {true, mask, Tensor::from_vector<int32_t>(in.cu, {static_cast<int64_t>(in.cu.size())})};
  }
  return in;
}

// Plain double loops: per token, its row and the token-dropout factor of its segment.
struct Ref {
  std::vector<double> out, dtable, dtable_bound;
};
Ref reference(const Case& c, const Inputs& in, bool with_out = true) {
  const std::vector<int32_t> ids = in.ids.to_vector<int32_t>();
  const std::vector<float> table = in.table.to_floats(), dout = in.dout.to_floats();
  const std::vector<double> dt0 = doubles(in.dtable0);
  std::vector<double> scale(static_cast<size_t>(c.T), 1.0);
  std::vector<bool> masked(static_cast<size_t>(c.T), false);
  if (c.dropout) {
    std::vector<int32_t> cu = in.cu;
    cu.push_back(static_cast<int32_t>(c.T));  // the padding tail is a segment too
    for (size_t s = 0; s + 1 < cu.size(); ++s) {
      int64_t m = 0;
      for (int64_t t = cu[s]; t < cu[s + 1]; ++t) m += ids[t] == in.td.mask_token_id;
      for (int64_t t = cu[s]; t < cu[s + 1]; ++t) {
        scale[t] = (1.0 - 0.15 * 0.8) / (1.0 - double(m) / double(cu[s + 1] - cu[s]));
        masked[t] = ids[t] == in.td.mask_token_id;
      }
    }
  }
  Ref r;
  if (with_out) r.out.resize(static_cast<size_t>(c.T * c.C));
  r.dtable = dt0;
  r.dtable_bound.resize(dt0.size());
  for (size_t i = 0; i < dt0.size(); ++i) r.dtable_bound[i] = std::abs(dt0[i]);
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t k = 0; k < c.C; ++k) {
      if (with_out) r.out[t * c.C + k] = masked[t] ? 0.0 : table[ids[t] * c.C + k] * scale[t];
      if (masked[t]) continue;
      r.dtable[ids[t] * c.C + k] += dout[t * c.C + k] * scale[t];
      r.dtable_bound[ids[t] * c.C + k] += std::abs(dout[t * c.C + k] * scale[t]);
    }
  return r;
}

Tensor run_fwd(const Case& c, const Inputs& in, Device dev, bool misaligned = false) {
  EmbeddingFwdParams p;
  p.ids = on(in.ids, dev);
  p.table = misaligned ? on_misaligned(in.table, dev) : on(in.table, dev);
  p.out = poisoned({c.T, c.C}, c.out, dev);
  p.token_dropout = {in.td.enabled, in.td.mask_token_id, on(in.td.cu_seqlens, dev)};
  const Stream stream = dev.is_cuda() ? Stream::create(dev) : Stream();
  embedding_fwd(p, stream);
  stream.synchronize();
  return host(p.out);
}
Tensor run_bwd(const Case& c, const Inputs& in, Device dev, bool misaligned = false) {
  EmbeddingBwdParams p;
  p.ids = on(in.ids, dev);
  p.dout = misaligned ? on_misaligned(in.dout, dev) : on(in.dout, dev);
  p.dtable = on(in.dtable0, dev);
  p.token_dropout = {in.td.enabled, in.td.mask_token_id, on(in.td.cu_seqlens, dev)};
  const Stream stream = dev.is_cuda() ? Stream::create(dev) : Stream();
  embedding_bwd(p, stream);
  stream.synchronize();
  return host(p.dtable);
}

TEST(EmbeddingCpu, ForwardAndBackwardMatchDoubleLoops) {
  for (Case c : {Case{71, 33, 229, DType::kF32, DType::kF32, true},
                 Case{71, 33, 229, DType::kBF16, DType::kBF16, true},
                 Case{29, 7, 541, DType::kF32, DType::kBF16, false},
                 Case{1, 1, 1, DType::kBF16, DType::kF32, false},
                 Case{300, 33, 64, DType::kF32, DType::kF32, true},
                 Case{300, 33, 64, DType::kBF16, DType::kF32, true}}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(fmt::format("{} seed={}", name(c), seed));
    const Inputs in = make_inputs(c, seed);
    const Ref r = reference(c, in);
    // A bf16 table rounds x * 0.88 to bf16 before the division (as HF does in the model dtype).
    const testing::Tolerance tol = tolerance_for(
        c.table == DType::kBF16 || c.out == DType::kBF16 ? DType::kBF16 : DType::kF32);
    EXPECT_TRUE(near_doubles(run_fwd(c, in, Device::cpu()), r.out, tol));
    EXPECT_TRUE(close_within(run_bwd(c, in, Device::cpu()), r.dtable, r.dtable_bound,
                             tolerance_for(DType::kF32)));
  }
}

TEST(EmbeddingCpu, BackwardIsTheAdjointOfForward) {
  // out = A table is linear: <A table, w> == <table, A^T w> (f32, token dropout on).
  const Case c{97, 33, 48, DType::kF32, DType::kF32, true};
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  Inputs in = make_inputs(c, seed);
  const std::vector<double> y = doubles(run_fwd(c, in, Device::cpu()));
  in.dtable0 = Tensor::zeros({c.V, c.C}, DType::kF32);
  const std::vector<double> g = doubles(run_bwd(c, in, Device::cpu()));
  const std::vector<double> w = doubles(in.dout), table = doubles(in.table);
  double lhs = 0, rhs = 0, mag = 0;
  for (size_t i = 0; i < y.size(); ++i) {
    lhs += y[i] * w[i];
    mag += std::abs(y[i] * w[i]);
  }
  for (size_t i = 0; i < g.size(); ++i) rhs += table[i] * g[i];
  EXPECT_NEAR(lhs, rhs, 1e-5 * mag);
}

TEST(EmbeddingCpu, RejectsBadInputs) {
  EmbeddingFwdParams p;
  p.ids = Tensor::from_vector<int32_t>({0, 1, 40}, {3});
  p.table = Tensor::zeros({33, 8}, DType::kBF16);
  p.out = Tensor::zeros({3, 8}, DType::kBF16);
  try {
    embedding_fwd(p, Stream());
    FAIL() << "expected a throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expected ids in [0, 33), got 40 at token 2"),
              std::string::npos)
        << e.what();
  }
  p.ids = Tensor::from_vector<int32_t>({0, 1, 2}, {3});
  p.out = Tensor::zeros({3, 7}, DType::kBF16);
  EXPECT_THROW(embedding_fwd(p, Stream()), Error);  // out's C differs from the table's
  p.out = Tensor::zeros({3, 8}, DType::kBF16);
  p.token_dropout.enabled = true;  // no mask id, no cu_seqlens
  EXPECT_THROW(embedding_fwd(p, Stream()), Error);
  EmbeddingBwdParams b;
  b.ids = p.ids;
  b.dout = Tensor::zeros({3, 8}, DType::kBF16);
  b.dtable = Tensor::zeros({33, 8}, DType::kBF16);
  EXPECT_THROW(embedding_bwd(b, Stream()), Error);  // dtable must be f32
}

// ---- CUDA against the CPU reference ------------------------------------------------------------
void expect_cuda_matches(const Case& c, bool misaligned = false) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(fmt::format("{}{} seed={}", name(c), misaligned ? " misaligned" : "", seed));
  const Inputs in = make_inputs(c, seed);
  const Tensor out_ref = run_fwd(c, in, Device::cpu());
  const Tensor out_got = run_fwd(c, in, Device::cuda(), misaligned);
  EXPECT_TRUE(all_close(out_got, out_ref, tolerance_for(c.out)));
  EXPECT_TRUE(bitwise_equal(out_got, out_ref)) << "the forward is specified to be bit-exact";
  const Ref r = reference(c, in, false);  // for the sum-of-magnitudes bound
  const Tensor dt_ref = run_bwd(c, in, Device::cpu());
  const Tensor dt_got = run_bwd(c, in, Device::cuda(), misaligned);
  EXPECT_TRUE(close_within(dt_got, doubles(dt_ref), r.dtable_bound, tolerance_for(DType::kF32)));
}

TEST(EmbeddingCuda, MatchesCpuOnOddShapes) {
  HELIX_REQUIRE_CUDA();
  for (bool dropout : {false, true}) {
    for (auto [wt, ot] : {std::pair<DType, DType>{DType::kBF16, DType::kBF16},
                          {DType::kF32, DType::kF32},
                          {DType::kF32, DType::kBF16},
                          {DType::kBF16, DType::kF32}}) {
      expect_cuda_matches({71, 33, 229, wt, ot, dropout});
      expect_cuda_matches({29, 33, 541, wt, ot, dropout});
      expect_cuda_matches({1, 33, 1, wt, ot, dropout});
      expect_cuda_matches({300, 33, 1280, wt, ot, dropout});
      expect_cuda_matches({1000, 2, 64, wt, ot, dropout});  // long runs: many pieces per id
    }
  }
}

TEST(EmbeddingCuda, MatchesCpuOnMisalignedLargeVocabularyAndLargeInputs) {
  HELIX_REQUIRE_CUDA();
  expect_cuda_matches({513, 33, 1280, DType::kBF16, DType::kBF16, true}, true);
  expect_cuda_matches({513, 33, 1280, DType::kF32, DType::kF32, false}, true);
  expect_cuda_matches({4096, 50000, 64, DType::kBF16, DType::kBF16, false});  // most ids unused
  expect_cuda_matches({65536, 33, 1280, DType::kBF16, DType::kBF16, true});
  expect_cuda_matches({16384, 33, 5120, DType::kF32, DType::kBF16, true});
}

TEST(EmbeddingCuda, BackwardIsBitwiseDeterministic) {
  HELIX_REQUIRE_CUDA();
  for (Case c : {Case{65536, 33, 1280, DType::kBF16, DType::kBF16, true},
                 Case{4099, 33, 229, DType::kF32, DType::kF32, false}}) {
    const uint64_t seed = fresh_seed();
    SCOPED_TRACE(fmt::format("{} seed={}", name(c), seed));
    const Inputs in = make_inputs(c, seed);
    EXPECT_TRUE(bitwise_equal(run_bwd(c, in, Device::cuda()), run_bwd(c, in, Device::cuda())));
  }
}

TEST(EmbeddingCuda, OutOfRangeIdsGiveNaNRowsAndNoGradient) {
  HELIX_REQUIRE_CUDA();
  const Case c{64, 33, 128, DType::kBF16, DType::kBF16, false};
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  Inputs in = make_inputs(c, seed);
  in.ids.data<int32_t>()[3] = -1;
  in.ids.data<int32_t>()[40] = 33;
  const std::vector<float> out = run_fwd(c, in, Device::cuda()).to_floats();
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t k = 0; k < c.C; ++k)
      EXPECT_EQ(std::isnan(out[t * c.C + k]), t == 3 || t == 40) << t << " " << k;
  const Tensor got = run_bwd(c, in, Device::cuda());
  // The CPU reference on the same batch with the bad tokens' gradients zeroed (and valid ids).
  for (int64_t t : {3, 40}) {
    in.ids.data<int32_t>()[t] = 0;
    for (int64_t k = 0; k < c.C; ++k) in.dout.data<bf16_t>()[t * c.C + k] = bf16_t::from_float(0.f);
  }
  const Ref r = reference(c, in);
  EXPECT_TRUE(close_within(got, doubles(run_bwd(c, in, Device::cpu())), r.dtable_bound,
                           tolerance_for(DType::kF32)));
}

}  // namespace
}  // namespace helix
