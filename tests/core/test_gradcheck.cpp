// The finite-difference gradient checker on reference nodes, in f64 and f32, and a test of the checker
// itself: it must reject a LayerNorm whose backward drops a term, and a node that overwrites instead
// of accumulating.
#include <gtest/gtest.h>

#include "core/gradcheck.h"
#include "core/random.h"
#include "ref_nodes.h"

namespace helix {
namespace {

using testing::LayerNormRef;
using testing::LinearRef;

Tensor rnd(Shape s, DType dt, uint64_t sub) {
  Tensor t = Tensor::empty(s, dt);
  fill_normal(t, 99, sub, 0.f, 1.f);
  return t;
}

TEST(GradCheck, LinearF64) {
  auto r = check_gradients([] { return std::make_shared<LinearRef<double>>(); },
                           {rnd({5, 7}, DType::kF64, 1), rnd({3, 7}, DType::kF64, 2), rnd({3}, DType::kF64, 3)},
                           {true, true, true});
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_EQ(r.checked, 35 + 21 + 3);
}

TEST(GradCheck, LayerNormF64AndF32) {
  for (DType dt : {DType::kF64, DType::kF32}) {
    auto make = [dt]() -> std::shared_ptr<Node> {
      if (dt == DType::kF64) return std::make_shared<LayerNormRef<double>>();
      return std::make_shared<LayerNormRef<float>>();
    };
    auto r = check_gradients(make, {rnd({4, 29}, dt, 4), rnd({29}, dt, 5), rnd({29}, dt, 6)}, {true, true, true});
    EXPECT_TRUE(r.ok) << dtype_name(dt) << ": " << r.message;
  }
}

TEST(GradCheck, OnlyRequestedInputs) {
  auto r = check_gradients([] { return std::make_shared<LinearRef<double>>(); },
                           {rnd({2, 3}, DType::kF64, 7), rnd({4, 3}, DType::kF64, 8), rnd({4}, DType::kF64, 9)},
                           {false, true, false});
  EXPECT_TRUE(r.ok) << r.message;
  EXPECT_EQ(r.checked, 12);
}

TEST(GradCheck, CatchesAWrongBackward) {
  auto r = check_gradients([] { return std::make_shared<LayerNormRef<double>>(/*wrong_backward=*/true); },
                           {rnd({3, 8}, DType::kF64, 10), rnd({8}, DType::kF64, 11), rnd({8}, DType::kF64, 12)},
                           {true, true, true});
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.message.find("layernorm_ref_wrong"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("input 0"), std::string::npos) << r.message;
}

// Overwrites its input gradient instead of accumulating: violates the node contract.
class OverwritingScale : public Node {
 public:
  std::string name() const override { return "overwriting_scale"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override {
    Tensor y = in[0].clone();
    for (int64_t i = 0; i < y.numel(); ++i) y.data<double>()[i] *= 3.0;
    return {y};
  }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream&) override {
    for (int64_t i = 0; i < gout[0].numel(); ++i) gin[0].data<double>()[i] = 3.0 * gout[0].data<double>()[i];
  }
};

TEST(GradCheck, CatchesOverwriteInsteadOfAccumulate) {
  auto r = check_gradients([] { return std::make_shared<OverwritingScale>(); }, {rnd({6}, DType::kF64, 13)}, {true});
  EXPECT_FALSE(r.ok) << "an overwriting backward must fail the accumulation check";
}

}  // namespace
}  // namespace helix
