// The autograd graph: accumulation, skipped inputs, release of saved tensors, recompute policy
// (bitwise-identical gradients), the non-finite check, and evaluation without recording.
#include <gtest/gtest.h>

#include <map>

#include "core/allocator.h"
#include "core/autograd.h"
#include "core/random.h"
#include "ref_nodes.h"
#include "test_util.h"

namespace helix {
namespace {

using testing::AddRef;
using testing::LinearRef;
using testing::LogRef;
using testing::SumRef;
using testing::TanhRef;

Tensor randn(Shape s, uint64_t sub, float std = 1.f) {
  Tensor t = Tensor::empty(s, DType::kF32);
  fill_normal(t, 2024, sub, 0.f, std);
  return t;
}

TEST(Autograd, GradientsAccumulateOverConsumers) {
  Tape tape;
  Var x = Var::leaf(Tensor::from_vector<float>({0.5f, -1.f}, {2}), true, "x");
  Var a = tape.apply1(std::make_shared<TanhRef<float>>(), {x});
  Var b = tape.apply1(std::make_shared<AddRef<float>>(), {a, x});  // x used twice
  Var l = tape.apply1(std::make_shared<SumRef<float>>(), {b});
  tape.backward(l);
  const std::vector<float> g = x.grad().to_vector<float>();
  EXPECT_FLOAT_EQ(g[0], 1.f + (1.f - std::tanh(0.5f) * std::tanh(0.5f)));
  EXPECT_FLOAT_EQ(g[1], 1.f + (1.f - std::tanh(-1.f) * std::tanh(-1.f)));
  // A second backward pass (gradient accumulation over micro-batches) adds to the leaf gradient.
  Var a2 = tape.apply1(std::make_shared<TanhRef<float>>(), {x});
  Var l2 = tape.apply1(std::make_shared<SumRef<float>>(), {a2});
  tape.backward(l2);
  EXPECT_FLOAT_EQ(x.grad().to_vector<float>()[0], g[0] + (1.f - std::tanh(0.5f) * std::tanh(0.5f)));
}

TEST(Autograd, InputsWithoutGradAreSkipped) {
  Tape tape;
  Var x = Var::leaf(randn({3, 4}, 1), false, "x");
  Var w = Var::leaf(randn({2, 4}, 2), true, "w");
  Var b = Var::leaf(randn({2}, 3), false, "b");
  Var y = tape.apply1(std::make_shared<LinearRef<float>>(), {x, w, b});
  Var l = tape.apply1(std::make_shared<SumRef<float>>(), {y});
  tape.backward(l);
  EXPECT_TRUE(w.grad().defined());
  EXPECT_FALSE(x.grad().defined());
  EXPECT_FALSE(b.grad().defined());
  // Nothing that needs a gradient: the node is not recorded and keeps nothing.
  Tape t2;
  Var y2 = t2.apply1(std::make_shared<LinearRef<float>>(), {x, Var::leaf(randn({2, 4}, 4), false), b});
  EXPECT_EQ(t2.num_recorded(), 0u);
  EXPECT_FALSE(y2.requires_grad());
}

TEST(Autograd, SavedTensorsAreReleasedAfterBackward) {
  Allocator& alloc = allocator_for(Device::cpu());
  Var x = Var::leaf(randn({64, 32}, 5), true);
  Var w = Var::leaf(randn({32, 32}, 6), true);
  Var b = Var::leaf(randn({32}, 7), true);
  const size_t before = alloc.stats().current_bytes;
  {
    Tape tape;
    Var y = tape.apply1(std::make_shared<LinearRef<float>>(), {x, w, b});
    Var t = tape.apply1(std::make_shared<TanhRef<float>>(), {y});
    Var l = tape.apply1(std::make_shared<SumRef<float>>(), {t});
    y = Var();
    t = Var();
    // Linear saves x and w (views, no copies); tanh saves its [64, 32] output.
    EXPECT_EQ(tape.saved_bytes(), (64 * 32 + 32 * 32 + 64 * 32) * 4u);
    tape.backward(l);
    EXPECT_EQ(tape.saved_bytes(), 0u);
    EXPECT_EQ(tape.num_recorded(), 0u);
  }
  // Only the three leaf gradients remain allocated (+ the scalar loss which went out of scope).
  EXPECT_EQ(alloc.stats().current_bytes, before + (64 * 32 + 32 * 32 + 32) * 4u);
}

// A residual "layer": x + tanh(linear2(tanh(linear1(x)))), as a recompute segment.
struct ToyLayer {
  Var w1, b1, w2, b2;
  std::vector<Var> operator()(Tape& tape, const std::vector<Var>& in) const {
    Var h = tape.apply1(std::make_shared<LinearRef<float>>(), {in[0], w1, b1});
    h = tape.apply1(std::make_shared<TanhRef<float>>(), {h});
    h = tape.apply1(std::make_shared<LinearRef<float>>(), {h, w2, b2});
    h = tape.apply1(std::make_shared<TanhRef<float>>(), {h});
    return {tape.apply1(std::make_shared<AddRef<float>>(), {in[0], h})};
  }
};

struct ToyRun {
  std::vector<std::vector<float>> grads;
  size_t saved_bytes_before_backward;
  float loss;
};

ToyRun run_toy(RecomputePolicy policy) {
  std::vector<ToyLayer> layers;
  std::vector<Var> params;
  for (int l = 0; l < 3; ++l) {
    ToyLayer t{Var::leaf(randn({16, 16}, 10 + l, 0.3f), true), Var::leaf(randn({16}, 20 + l), true),
               Var::leaf(randn({16, 16}, 30 + l, 0.3f), true), Var::leaf(randn({16}, 40 + l), true)};
    params.insert(params.end(), {t.w1, t.b1, t.w2, t.b2});
    layers.push_back(t);
  }
  Var x = Var::leaf(randn({8, 16}, 50), true, "x");
  params.push_back(x);
  Tape tape(TapeOptions{.recompute = policy});
  Var h = x;
  for (int l = 0; l < 3; ++l) h = tape.segment(fmt::format("layer{}", l), layers[l], {h})[0];
  Var loss = tape.apply1(std::make_shared<SumRef<float>>(), {h});
  ToyRun r;
  r.saved_bytes_before_backward = tape.saved_bytes();
  r.loss = loss.data().to_vector<float>()[0];
  tape.backward(loss);
  for (const Var& p : params) r.grads.push_back(p.grad().to_vector<float>());
  return r;
}

TEST(Autograd, RecomputeGivesBitwiseIdenticalGradients) {
  const ToyRun plain = run_toy(RecomputePolicy::kNone);
  const ToyRun recomputed = run_toy(RecomputePolicy::kFull);
  EXPECT_EQ(plain.loss, recomputed.loss);
  ASSERT_EQ(plain.grads.size(), recomputed.grads.size());
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    ASSERT_EQ(plain.grads[i].size(), recomputed.grads[i].size());
    EXPECT_EQ(std::memcmp(plain.grads[i].data(), recomputed.grads[i].data(), plain.grads[i].size() * 4), 0)
        << "gradient " << i << " differs under recompute";
  }
  // Recompute keeps only each segment's input [8, 16] instead of every intermediate.
  EXPECT_EQ(recomputed.saved_bytes_before_backward, 3u * 8 * 16 * 4);
  EXPECT_GT(plain.saved_bytes_before_backward, 4 * recomputed.saved_bytes_before_backward);
}

// The gradient-ready hook (the data-parallel overlap): fires exactly once per leaf that receives a
// gradient, after its last accumulation (the gradient it sees equals the final one), in the order
// the backward finishes with leaves (late layers first), with and without recompute. A parameter
// shared by the first and the last layer fires only after the first layer's backward.
struct Fired {
  std::string name;
  std::vector<float> grad;  // the gradient when the hook fired
};

void check_ready_hook(RecomputePolicy policy) {
  std::vector<ToyLayer> layers;
  std::vector<Var> params;
  for (int l = 0; l < 3; ++l) {
    ToyLayer t{Var::leaf(randn({16, 16}, 10 + l, 0.3f), true, fmt::format("w1.{}", l)),
               Var::leaf(randn({16}, 20 + l), true, fmt::format("b1.{}", l)),
               Var::leaf(randn({16, 16}, 30 + l, 0.3f), true, fmt::format("w2.{}", l)),
               Var::leaf(randn({16}, 40 + l), true, fmt::format("b2.{}", l))};
    if (l == 2) t.b2 = layers[0].b2;  // shared by layers 0 and 2 (captured by two segments)
    layers.push_back(t);
    params.insert(params.end(), {t.w1, t.b1, t.w2});
    if (l != 2) params.push_back(t.b2);
  }
  Var x = Var::leaf(randn({8, 16}, 50), true, "x");
  Var unused = Var::leaf(randn({4}, 51), true, "unused");
  Var frozen = Var::leaf(randn({8, 16}, 52), false, "frozen");
  params.push_back(x);
  std::vector<Fired> fired;
  std::map<std::string, std::vector<float>> final_grads;
  TapeOptions o{.recompute = policy};
  o.on_grad_ready = [&](const std::shared_ptr<GradCell>& c) {
    fired.push_back({c->name, c->grad.defined() ? c->grad.to_vector<float>() : std::vector<float>{}});
  };
  Tape tape(o);
  Var h = tape.apply1(std::make_shared<AddRef<float>>(), {x, frozen});  // x is also used outside
  for (int l = 0; l < 3; ++l) h = tape.segment(fmt::format("layer{}", l), layers[l], {h})[0];
  h = tape.apply1(std::make_shared<AddRef<float>>(), {h, x});
  Var loss = tape.apply1(std::make_shared<SumRef<float>>(), {h});
  tape.backward(loss);

  ASSERT_EQ(fired.size(), params.size()) << "one call per leaf that receives a gradient";
  std::map<std::string, int> position;
  for (size_t i = 0; i < fired.size(); ++i) {
    EXPECT_TRUE(position.emplace(fired[i].name, static_cast<int>(i)).second) << fired[i].name << " fired twice";
    EXPECT_NE(fired[i].name, "unused");
    EXPECT_NE(fired[i].name, "frozen");
  }
  for (const Var& p : params) {
    ASSERT_TRUE(position.count(p.name())) << p.name() << " never fired";
    const std::vector<float> g = p.grad().to_vector<float>();
    EXPECT_EQ(fired[static_cast<size_t>(position[p.name()])].grad, g)
        << p.name() << ": the hook saw a gradient that was still accumulating";
  }
  // Late layers are final first; the shared b2 and x (used by the first node) come last.
  for (const char* n : {"w1", "b1", "w2"}) {
    EXPECT_LT(position[fmt::format("{}.2", n)], position[fmt::format("{}.1", n)]) << n;
    EXPECT_LT(position[fmt::format("{}.1", n)], position[fmt::format("{}.0", n)]) << n;
  }
  EXPECT_LT(position["b2.1"], position["b2.0"]);
  EXPECT_GT(position["b2.0"], position["w1.1"]);  // not final while layer 0 is still ahead
  EXPECT_EQ(position["x"], static_cast<int>(fired.size()) - 1);
  EXPECT_FALSE(unused.grad().defined());
}

TEST(Autograd, GradReadyHookFiresOncePerLeafAfterItsLastAccumulation) {
  check_ready_hook(RecomputePolicy::kNone);
}

TEST(Autograd, GradReadyHookUnderRecomputeCoversCapturedParameters) {
  check_ready_hook(RecomputePolicy::kFull);
}

TEST(Autograd, NonFiniteCheckNamesTheNode) {
  Tape tape(TapeOptions{.check_finite = true});
  Var x = Var::leaf(Tensor::from_vector<float>({1.f, -1.f}, {2}), true);
  Var t = tape.apply1(std::make_shared<TanhRef<float>>(), {x});
  try {
    tape.apply1(std::make_shared<LogRef<float>>(), {t});
    FAIL() << "expected the non-finite check to throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("log_ref"), std::string::npos) << e.what();
  }
  Tape tape3(TapeOptions{.check_finite = true});
  Var y = Var::leaf(Tensor::from_vector<float>({0.5f, 1e-39f}, {2}), true);  // 1/1e-39 overflows
  Var logy = tape3.apply1(std::make_shared<LogRef<float>>(), {y});
  Var s = tape3.apply1(std::make_shared<SumRef<float>>(), {logy});
  try {
    tape3.backward(s);
    FAIL() << "expected the backward non-finite check to throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("input gradient 0 of node 'log_ref'"), std::string::npos) << e.what();
  }
}

TEST(Autograd, EvaluationRecordsNothing) {
  Tape tape(TapeOptions{.record = false});
  Var x = Var::leaf(randn({4, 4}, 60), true);
  Var w = Var::leaf(randn({4, 4}, 61), true);
  Var b = Var::leaf(randn({4}, 62), true);
  Var y = tape.apply1(std::make_shared<LinearRef<float>>(), {x, w, b});
  EXPECT_EQ(tape.num_recorded(), 0u);
  EXPECT_EQ(tape.saved_bytes(), 0u);
  EXPECT_EQ(y.data().numel(), 16);
}

}  // namespace
}  // namespace helix
