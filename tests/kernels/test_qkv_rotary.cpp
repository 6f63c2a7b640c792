// The rotary embedding fused into qkv_split / qkv_join_grad (QkvRotary): the fused split equals
// qkv_split then rotary_fwd and the fused join equals rotary_bwd then qkv_join_grad, bit for bit,
// on the CPU (f32, bf16; head dims 8, 64, 128 and more; positions from cu_seqlens with empty
// sequences and trailing padding, from a padded layout (cu_seqlens_padded != cu_seqlens), and
// explicit ones as context parallelism passes), and on CUDA (also against the CPU within the
// rotary tolerance, on vectorised, narrow-vector and misaligned paths); and the refusals.
#include <gtest/gtest.h>

#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernel_test_util.h"
#include "kernels/qkv/qkv.h"
#include "kernels/rotary/rotary.h"

namespace helix {
namespace {

using testing::all_close;
using testing::bitwise_equal;
using testing::fresh_seed;
using testing::host;
using testing::kNaN;
using testing::on;
using testing::on_misaligned;
using testing::random_cu_seqlens;
using testing::random_tensor;
using testing::Tolerance;
using testing::tolerance_for;

enum class PosKind { kCuSeqlens, kPaddedLayout, kExplicit };

const char* pos_name(PosKind k) {
  switch (k) {
    case PosKind::kCuSeqlens: return "cu_seqlens";
    case PosKind::kPaddedLayout: return "cu_seqlens_padded";
    default: return "positions";
  }
}

// CPU position source for T tokens.
RotaryPositions make_positions(PosKind kind, int64_t T, uint64_t seed) {
  RotaryPositions p;
  if (kind == PosKind::kCuSeqlens) {
    const std::vector<int32_t> cu = random_cu_seqlens(T, seed, nullptr);
    p.cu_seqlens = Tensor::from_vector<int32_t>(cu, {static_cast<int64_t>(cu.size())});
  } else if (kind == PosKind::kPaddedLayout) {
    // A THD layout padded to multiples of 8 per sequence: rotary takes cu_seqlens_padded, so the
    // padding tokens inside a sequence keep counting; tokens past the last sequence restart.
    std::mt19937_64 rng(seed);
    std::vector<int32_t> cu = {0}, cu_padded = {0};
    for (;;) {
      // The first sequence (5 tokens padded to 8) makes the layouts differ whenever it fits.
      const int32_t len = cu.size() == 1 ? 5 : std::uniform_int_distribution<int32_t>(1, 21)(rng);
      const int32_t padded = (len + 7) / 8 * 8;
      if (cu_padded.back() + padded > T - 3) break;
      cu.push_back(cu.back() + len);
      cu_padded.push_back(cu_padded.back() + padded);
    }
    if (cu.size() > 1) EXPECT_NE(cu, cu_padded);
    p.cu_seqlens = Tensor::from_vector<int32_t>(cu_padded, {static_cast<int64_t>(cu_padded.size())});
  } else {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> pos(static_cast<size_t>(T));
    for (int32_t& x : pos) x = std::uniform_int_distribution<int32_t>(0, 200000)(rng);
    p.positions = Tensor::from_vector<int32_t>(pos, {T});
  }
  return p;
}

RotaryPositions positions_on(const RotaryPositions& p, Device dev) {
  return {on(p.cu_seqlens, dev), on(p.positions, dev)};
}

struct Qkv {
  Tensor q, k, v;  // [T, H] each
};

Qkv poisoned_outputs(int64_t T, int64_t H, DType dt, Device dev, const Stream& s) {
  Qkv o{Tensor::empty({T, H}, dt, dev, s), Tensor::empty({T, H}, dt, dev, s),
        Tensor::empty({T, H}, dt, dev, s)};
  for (Tensor* t : {&o.q, &o.k, &o.v}) t->fill(kNaN, s);
  return o;
}

// qkv_split, then rotary_fwd on q and k viewed as [T, H/D, D].
Qkv split_then_rotary(const Tensor& qkv, const QkvRotary& r, const Stream& s) {
  const int64_t T = qkv.dim(0), H = qkv.dim(1) / 3, D = r.head_dim;
  Qkv o = poisoned_outputs(T, H, qkv.dtype(), qkv.device(), s);
  qkv_split({qkv, o.q, o.k, o.v}, s);
  rotary_fwd({o.q.view({T, H / D, D}), o.k.view({T, H / D, D}), r.pos, r.base}, s);
  return o;
}

Qkv fused_split(const Tensor& qkv, const QkvRotary& r, const Stream& s) {
  Qkv o = poisoned_outputs(qkv.dim(0), qkv.dim(1) / 3, qkv.dtype(), qkv.device(), s);
  qkv_split({.qkv = qkv, .q = o.q, .k = o.k, .v = o.v, .rotary = r}, s);
  return o;
}

// rotary_bwd on copies of dq and dk, then qkv_join_grad into a copy of dqkv.
Tensor rotary_then_join(const Qkv& g, const Tensor& dqkv, const QkvRotary& r, const Stream& s) {
  const int64_t T = dqkv.dim(0), H = dqkv.dim(1) / 3, D = r.head_dim;
  Tensor dq = g.q.clone(s), dk = g.k.clone(s), out = dqkv.clone(s);
  rotary_bwd({dq.view({T, H / D, D}), dk.view({T, H / D, D}), r.pos, r.base}, s);
  qkv_join_grad({dq, dk, g.v, out}, s);
  return out;
}

Tensor fused_join(const Qkv& g, const Tensor& dqkv, const QkvRotary& r, const Stream& s) {
  Tensor out = dqkv.clone(s);
  qkv_join_grad({.dq = g.q, .dk = g.k, .dv = g.v, .dqkv = out, .rotary = r}, s);
  return out;
}

struct Inputs {
  Tensor qkv;   // [T, 3H]
  Qkv grads;    // dq, dk, dv [T, H]
  Tensor dqkv;  // [T, 3H] the gradient accumulated into
};

Inputs random_inputs(int64_t T, int64_t H, DType dt, uint64_t seed) {
  return {random_tensor({T, 3 * H}, dt, seed, 10, -2.f, 2.f),
          {random_tensor({T, H}, dt, seed, 11, -2.f, 2.f), random_tensor({T, H}, dt, seed, 12, -2.f, 2.f),
           random_tensor({T, H}, dt, seed, 13, -2.f, 2.f)},
          random_tensor({T, 3 * H}, dt, seed, 14, -1.f, 1.f)};
}

TEST(QkvRotaryCpu, FusedEqualsCompositionBitwise) {
  for (DType dt : {DType::kBF16, DType::kF32})
    for (int64_t D : {8, 64, 128, 24, 2})
      for (PosKind kind : {PosKind::kCuSeqlens, PosKind::kPaddedLayout, PosKind::kExplicit}) {
        const uint64_t seed = fresh_seed();
        const int64_t T = 71, heads = D <= 8 ? 5 : 3, H = heads * D;
        SCOPED_TRACE(fmt::format("{} D={} {} seed={}", dtype_name(dt), D, pos_name(kind), seed));
        const Inputs in = random_inputs(T, H, dt, seed);
        const QkvRotary r{.head_dim = D, .pos = make_positions(kind, T, seed), .base = 10000.f};
        const Qkv want = split_then_rotary(in.qkv, r, Stream());
        const Qkv got = fused_split(in.qkv, r, Stream());
        EXPECT_TRUE(bitwise_equal(got.q, want.q));
        EXPECT_TRUE(bitwise_equal(got.k, want.k));
        EXPECT_TRUE(bitwise_equal(got.v, want.v));
        // Something did rotate: q is not the plain copy.
        Qkv plain = poisoned_outputs(T, H, dt, Device::cpu(), Stream());
        qkv_split({in.qkv, plain.q, plain.k, plain.v}, Stream());
        EXPECT_FALSE(bitwise_equal(got.q, plain.q));
        EXPECT_TRUE(bitwise_equal(got.v, plain.v));

        const Tensor dq0 = in.grads.q.clone(), dk0 = in.grads.k.clone();
        const Tensor want_d = rotary_then_join(in.grads, in.dqkv, r, Stream());
        const Tensor got_d = fused_join(in.grads, in.dqkv, r, Stream());
        EXPECT_TRUE(bitwise_equal(got_d, want_d));
        EXPECT_TRUE(bitwise_equal(in.grads.q, dq0));  // inputs untouched
        EXPECT_TRUE(bitwise_equal(in.grads.k, dk0));
        Tensor plain_d = in.dqkv.clone();
        qkv_join_grad({in.grads.q, in.grads.k, in.grads.v, plain_d}, Stream());
        EXPECT_FALSE(bitwise_equal(got_d, plain_d));
      }
}

TEST(QkvRotaryCpu, BaseIsPassedThrough) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(seed);
  const int64_t T = 19, D = 16, H = 2 * D;
  const Tensor qkv = random_tensor({T, 3 * H}, DType::kF32, seed, 0, -1.f, 1.f);
  const QkvRotary r{.head_dim = D, .pos = make_positions(PosKind::kExplicit, T, seed), .base = 500.f};
  const Qkv got = fused_split(qkv, r, Stream());
  EXPECT_TRUE(bitwise_equal(got.q, split_then_rotary(qkv, r, Stream()).q));
  QkvRotary r_default = r;
  r_default.base = 10000.f;
  EXPECT_FALSE(bitwise_equal(got.q, fused_split(qkv, r_default, Stream()).q));
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected a throw mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(QkvRotaryCpu, RefusesBadRotary) {
  const int64_t T = 4;
  const RotaryPositions pos = make_positions(PosKind::kExplicit, T, 1);
  auto split = [&](int64_t H, int64_t D, RotaryPositions p) {
    const Tensor qkv = Tensor::zeros({T, 3 * H}, DType::kBF16);
    Qkv o = poisoned_outputs(T, H, DType::kBF16, Device::cpu(), Stream());
    qkv_split({.qkv = qkv, .q = o.q, .k = o.k, .v = o.v, .rotary = {.head_dim = D, .pos = p}}, Stream());
  };
  auto join = [&](int64_t H, int64_t D, RotaryPositions p) {
    Qkv g = poisoned_outputs(T, H, DType::kF32, Device::cpu(), Stream());
    Tensor dqkv = Tensor::zeros({T, 3 * H}, DType::kF32);
    qkv_join_grad({.dq = g.q, .dk = g.k, .dv = g.v, .dqkv = dqkv, .rotary = {.head_dim = D, .pos = p}}, Stream());
  };
  expect_error([&] { split(96, 64, pos); }, "qkv_split: expected rotary head_dim > 0 dividing H = 96, got 64");
  expect_error([&] { join(96, 64, pos); }, "qkv_join_grad: expected rotary head_dim > 0 dividing H = 96, got 64");
  expect_error([&] { split(21, 7, pos); }, "expected an even head dim");
  expect_error([&] { split(1024, 512, pos); }, "expected an even head dim D <= 256");
  expect_error([&] { split(64, -8, pos); }, "dividing H");
  expect_error([&] { split(64, 64, RotaryPositions{}); }, "exactly one of cu_seqlens and positions");
  expect_error([&] { join(64, 64, {Tensor::from_vector<int32_t>({0, 3, 2}, {3}), Tensor()}); },
               "qkv_join_grad: expected non-decreasing cu_seqlens");
  expect_error([&] { split(64, 64, {Tensor(), Tensor::from_vector<int32_t>({0, 1, 2}, {3})}); },
               "positions");
  expect_error([&] { split(64, 64, {Tensor(), Tensor::from_vector<int32_t>({0, 1, -2, 3}, {4})}); },
               "expected positions in [0, 2^24)");
}

// ---- CUDA --------------------------------------------------------------------------------------
struct Case {
  int64_t T, heads, D;
  DType dt;
  PosKind kind;
  bool misaligned;
};

void expect_cuda_matches(const Case& c) {
  const uint64_t seed = fresh_seed();
  SCOPED_TRACE(fmt::format("T={} heads={} D={} {} {}{} seed={}", c.T, c.heads, c.D, dtype_name(c.dt),
                           pos_name(c.kind), c.misaligned ? " misaligned" : "", seed));
  const int64_t H = c.heads * c.D;
  const Inputs in = random_inputs(c.T, H, c.dt, seed);
  const QkvRotary r_cpu{.head_dim = c.D, .pos = make_positions(c.kind, c.T, seed)};
  const Device gpu = Device::cuda();
  const QkvRotary r_gpu{.head_dim = c.D, .pos = positions_on(r_cpu.pos, gpu)};
  auto up = [&](const Tensor& t) { return c.misaligned ? on_misaligned(t, gpu) : on(t, gpu); };
  const Tensor qkv = up(in.qkv), dqkv = up(in.dqkv);
  const Qkv g{up(in.grads.q), up(in.grads.k), up(in.grads.v)};
  const Stream s = Stream::create(gpu);

  const Qkv want = split_then_rotary(qkv, r_gpu, s);
  const Qkv got = fused_split(qkv, r_gpu, s);
  const Tensor want_d = rotary_then_join(g, dqkv, r_gpu, s);
  const Tensor got_d = fused_join(g, dqkv, r_gpu, s);
  s.synchronize();
  EXPECT_TRUE(bitwise_equal(got.q, want.q));
  EXPECT_TRUE(bitwise_equal(got.k, want.k));
  EXPECT_TRUE(bitwise_equal(got.v, want.v));
  EXPECT_TRUE(bitwise_equal(got_d, want_d));

  const Qkv cpu = fused_split(in.qkv, r_cpu, Stream());
  const Tensor cpu_d = fused_join(in.grads, in.dqkv, r_cpu, Stream());
  const Tolerance tol = tolerance_for(c.dt);
  EXPECT_TRUE(all_close(host(got.q), cpu.q, tol));
  EXPECT_TRUE(all_close(host(got.k), cpu.k, tol));
  EXPECT_TRUE(bitwise_equal(got.v, cpu.v));
  EXPECT_TRUE(all_close(host(got_d), cpu_d, tol));
}

TEST(QkvRotaryCuda, MatchesCompositionBitwiseAndCpu) {
  HELIX_REQUIRE_CUDA();
  for (DType dt : {DType::kBF16, DType::kF32})
    for (PosKind kind : {PosKind::kCuSeqlens, PosKind::kPaddedLayout, PosKind::kExplicit}) {
      expect_cuda_matches({71, 5, 64, dt, kind, false});    // 16-byte packs
      expect_cuda_matches({29, 3, 128, dt, kind, false});
      expect_cuda_matches({33, 7, 8, dt, kind, false});     // bf16: 8-byte packs
      expect_cuda_matches({41, 3, 24, dt, kind, false});    // bf16 4-element, f32 4-element packs
      expect_cuda_matches({17, 2, 12, dt, kind, false});    // 2-element (bf16) / 2 (f32) packs
      expect_cuda_matches({13, 4, 6, dt, kind, false});     // scalar path (D/2 = 3)
      expect_cuda_matches({17, 2, 256, dt, kind, false});   // widest head
      expect_cuda_matches({41, 3, 64, dt, kind, true});     // misaligned bases: scalar path
      expect_cuda_matches({1, 1, 2, dt, kind, false});
    }
}

TEST(QkvRotaryCuda, MatchesOnLargeInputs) {
  HELIX_REQUIRE_CUDA();
  expect_cuda_matches({16384, 40, 64, DType::kBF16, PosKind::kCuSeqlens, false});  // ESM-2 3B layer
  expect_cuda_matches({4099, 20, 128, DType::kBF16, PosKind::kExplicit, false});
  expect_cuda_matches({4099, 20, 64, DType::kF32, PosKind::kPaddedLayout, false});
}

}  // namespace
}  // namespace helix
