// `helix plan` against a tensor-parallel model built on CPU ranks: this rank's parameter, gradient
// and optimizer bytes, and the bytes a TP (and sequence-parallel) forward allocates per layer,
// against the planner's per-rank formulas (launch/plan/plan.h).
#include <gtest/gtest.h>

#include "core/allocator.h"
#include "launch/plan/plan.h"
#include "layers/esm2.h"
#include "layers/optimizer.h"
#include "parallel/esm2_test_batch.h"
#include "parallel/mpi_test_util.h"

namespace helix {
namespace {

ModelConfig plan_tiny(int layers) {
  ModelConfig c;
  c.name = "tiny";
  c.layers = layers;
  c.hidden = 64;
  c.heads = 4;
  c.ffn = 96;
  return c;
}

struct RankBytes {
  double master = 0, grads = 0, moments = 0, forward = 0;
};

RankBytes measure(const ModelConfig& cfg, const ParallelContext& ctx, bool sp,
                  const std::vector<int>& lens) {
  Esm2Options o{.device = Device::cpu(), .compute = DType::kF32};
  o.parallel = &ctx;
  o.sequence_parallel = sp;
  Esm2Model model(cfg, o);
  model.init_random(5);
  AdamW opt(model.params(), AdamWConfig{});
  const ThdBatch b = testing::synthetic_esm2_batch(lens, 3, 20, Device::cpu());
  Allocator& alloc = allocator_for(Device::cpu());
  RankBytes r;
  for (int step = 0; step < 2; ++step) {
    model.params().zero_grads(Stream());
    const double before = double(alloc.stats().current_bytes);
    Tape tape;
    Var logits = model.forward(tape, b);
    r.forward = double(alloc.stats().current_bytes) - before;
    Var loss = model.loss(tape, logits, b, 1.0f / float(std::max<int64_t>(1, b.num_labels)));
    tape.backward(loss);
    opt.step(1e-3, true, Stream());
  }
  for (const Parameter& p : model.params().all()) {
    r.master += double(p.master.nbytes());
    if (p.grad().defined()) r.grads += double(p.grad().nbytes());
  }
  for (const auto& [m, v] : opt.moments()) r.moments += double(m.nbytes() + v.nbytes());
  return r;
}

TEST(PlanParallel, TensorParallelRankBytesEqualThePlan) {
  const int world = testing::world_size();
  const std::vector<int> lens{9, 14, 5};  // 28 tokens: divisible by tp, no SP padding sequence
  for (int tp : {2, world}) {
    if (world % tp != 0) continue;
    ParallelContext ctx = testing::make_context(ParallelSizes{.tp = tp});
    for (bool sp : {false, true}) {
      const ModelConfig c3 = plan_tiny(3), c1 = plan_tiny(1);
      const RankBytes r3 = measure(c3, ctx, sp, lens), r1 = measure(c1, ctx, sp, lens);
      const double elems = double(stage_param_elements(c3, tp, 3, true, true, false));
      EXPECT_EQ(r3.master, 4 * elems) << "tp " << tp;
      EXPECT_EQ(r3.grads, 4 * elems) << "tp " << tp;
      EXPECT_EQ(r3.moments, 8 * elems) << "tp " << tp;
      PlanLayout l;
      l.tp = tp;
      l.sequence_parallel = sp;
      EXPECT_EQ(r3.forward - r1.forward, 2 * layer_activation_bytes(c3, 28, l, /*bf16=*/false))
          << "tp " << tp << " sp " << sp;
    }
  }
}

}  // namespace
}  // namespace helix
