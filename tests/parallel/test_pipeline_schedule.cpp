// Pipeline schedules (parallel/pipeline_schedule.h), single process: the forward/backward order of
// 1F1B (4 stages, 8 micro-batches) and interleaved 1F1B (2 stages, 2 chunks, 4 micro-batches)
// against hand-written tables; every action list run together under rendezvous semantics (a send
// completes only when the peer is at the matching receive) finishes, every compute has its input
// when it runs, and every message pairs the right (micro-batch, chunk) on both sides; the predicted
// bubble against the closed forms; the balanced layer split; refusals naming the flag.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <string>
#include <tuple>

#include "core/error.h"
#include "parallel/pipeline_schedule.h"

namespace helix {
namespace {

// "F0 F1 B0 ..." for chunk 0 only; "F0.1" (micro-batch 0, chunk 1) when the schedule interleaves.
std::string compute_string(const std::vector<PipelineAction>& order, bool chunks) {
  std::string s;
  for (const PipelineAction& a : order) {
    if (!s.empty()) s += ' ';
    s += a.kind == PipelineActionKind::kForward ? 'F' : 'B';
    s += std::to_string(a.micro_batch);
    if (chunks) s += "." + std::to_string(a.chunk);
  }
  return s;
}

TEST(PipelineSchedule, OneFOneBFourStagesEightMicroBatches) {
  const PipelineScheduleParams p{.stages = 4, .virtual_stages = 1, .micro_batches = 8};
  const char* want[4] = {
      "F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7",
      "F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7",
      "F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7",
      "F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7",
  };
  for (int r = 0; r < 4; ++r)
    EXPECT_EQ(compute_string(pipeline_compute_order(p, r), false), want[r]) << "rank " << r;
}

TEST(PipelineSchedule, OneFOneBFewerMicroBatchesThanStages) {
  const PipelineScheduleParams p{.stages = 4, .virtual_stages = 1, .micro_batches = 2};
  EXPECT_EQ(compute_string(pipeline_compute_order(p, 0), false), "F0 F1 B0 B1");
  EXPECT_EQ(compute_string(pipeline_compute_order(p, 3), false), "F0 B0 F1 B1");
}

TEST(PipelineSchedule, InterleavedTwoStagesTwoChunksFourMicroBatches) {
  const PipelineScheduleParams p{.stages = 2, .virtual_stages = 2, .micro_batches = 4};
  EXPECT_EQ(compute_string(pipeline_compute_order(p, 0), true),
            "F0.0 F1.0 F0.1 F1.1 F2.0 B0.1 F3.0 B1.1 F2.1 B0.0 F3.1 B1.0 B2.1 B3.1 B2.0 B3.0");
  EXPECT_EQ(compute_string(pipeline_compute_order(p, 1), true),
            "F0.0 F1.0 F0.1 B0.1 F1.1 B1.1 F2.0 B0.0 F3.0 B1.0 F2.1 B2.1 F3.1 B3.1 B2.0 B3.0");
}

// Runs every rank's action list together: computes always proceed; a send or receive proceeds only
// when the peer's current action is its counterpart (fully synchronous messages). Checks that
// everything finishes, every forward has its input and every backward its output gradient when it
// runs, and each forward and backward of every (micro-batch, virtual stage) runs exactly once.
void expect_runs_to_completion(const PipelineScheduleParams& p, const PipelineCosts& costs = {}) {
  const int n = p.stages, nv = p.stages * p.virtual_stages;
  std::vector<std::vector<PipelineAction>> lists;
  for (int r = 0; r < n; ++r) lists.push_back(pipeline_schedule(p, r, costs));
  std::vector<size_t> pos(n, 0);
  std::set<std::tuple<int, int, int>> have_act, have_grad,
      done;  // (rank, mb, chunk) / (F|B, mb, vs)
  const auto is_comm = [](const PipelineAction& a) {
    return a.kind != PipelineActionKind::kForward && a.kind != PipelineActionKind::kBackward;
  };
  const auto counterpart = [&](int r, const PipelineAction& a, PipelineAction* want) {
    const int vs = a.chunk * n + r;
    switch (a.kind) {
      case PipelineActionKind::kSendActivation:
        *want = {PipelineActionKind::kRecvActivation, a.micro_batch, (vs + 1) / n, r};
        return;
      case PipelineActionKind::kRecvActivation:
        *want = {PipelineActionKind::kSendActivation, a.micro_batch, (vs - 1) / n, r};
        return;
      case PipelineActionKind::kSendGrad:
        *want = {PipelineActionKind::kRecvGrad, a.micro_batch, (vs - 1) / n, r};
        return;
      default:
        *want = {PipelineActionKind::kSendGrad, a.micro_batch, (vs + 1) / n, r};
    }
  };
  bool progress = true;
  while (progress) {
    progress = false;
    for (int r = 0; r < n; ++r) {
      while (pos[r] < lists[r].size()) {
        const PipelineAction& a = lists[r][pos[r]];
        const int vs = a.chunk * n + r;
        if (!is_comm(a)) {
          const bool fw = a.kind == PipelineActionKind::kForward;
          if (fw && vs > 0)
            ASSERT_TRUE(have_act.count({r, a.micro_batch, a.chunk}))
                << "rank " << r << " " << a.str();
          if (!fw && vs < nv - 1)
            ASSERT_TRUE(have_grad.count({r, a.micro_batch, a.chunk}))
                << "rank " << r << " " << a.str();
          if (!fw)
            ASSERT_TRUE(done.count({0, a.micro_batch, vs}))
                << "backward before forward: " << a.str();
          ASSERT_TRUE(done.insert({fw ? 0 : 1, a.micro_batch, vs}).second) << "twice: " << a.str();
          ++pos[r];
          progress = true;
          continue;
        }
        const int q = a.peer;
        ASSERT_TRUE(q >= 0 && q < n && q != r) << a.str();
        PipelineAction want;
        counterpart(r, a, &want);
        if (pos[q] >= lists[q].size() || !(lists[q][pos[q]] == want)) break;  // peer not there yet
        if (a.kind == PipelineActionKind::kRecvActivation)
          have_act.insert({r, a.micro_batch, a.chunk});
        if (a.kind == PipelineActionKind::kRecvGrad) have_grad.insert({r, a.micro_batch, a.chunk});
        if (want.kind == PipelineActionKind::kRecvActivation)
          have_act.insert({q, want.micro_batch, want.chunk});
        if (want.kind == PipelineActionKind::kRecvGrad)
          have_grad.insert({q, want.micro_batch, want.chunk});
        ++pos[r];
        ++pos[q];
        progress = true;
      }
    }
  }
  for (int r = 0; r < n; ++r)
    ASSERT_EQ(pos[r], lists[r].size())
        << "deadlock: rank " << r << " stuck at " << lists[r][pos[r]].str();
  const size_t computes = static_cast<size_t>(p.micro_batches) * nv * (p.forward_only ? 1 : 2);
  EXPECT_EQ(done.size(), computes);
}

TEST(PipelineSchedule, ActionListsRunToCompletionUnderRendezvous) {
  for (int n : {2, 3, 4, 5})
    for (int m : {1, 2, 3, 4, 7, 8, 12}) {
      SCOPED_TRACE("1F1B n " + std::to_string(n) + " m " + std::to_string(m));
      expect_runs_to_completion({.stages = n, .virtual_stages = 1, .micro_batches = m});
      PipelineCosts uneven;
      for (int j = 0; j < n; ++j) uneven.stage_weight.push_back(1 + (j * 5) % 3);
      expect_runs_to_completion({.stages = n, .virtual_stages = 1, .micro_batches = m}, uneven);
      expect_runs_to_completion(
          {.stages = n, .virtual_stages = 1, .micro_batches = m, .forward_only = true});
    }
  for (int n : {2, 3, 4})
    for (int v : {2, 3})
      for (int k : {1, 2, 3}) {
        SCOPED_TRACE("interleaved n " + std::to_string(n) + " v " + std::to_string(v) + " m " +
                     std::to_string(k * n));
        expect_runs_to_completion({.stages = n, .virtual_stages = v, .micro_batches = k * n});
        PipelineCosts uneven;  // placement from an uneven split's timeline
        for (int j = 0; j < n * v; ++j) uneven.stage_weight.push_back(1 + (j * 5) % 3);
        expect_runs_to_completion({.stages = n, .virtual_stages = v, .micro_batches = k * n},
                                  uneven);
        expect_runs_to_completion(
            {.stages = n, .virtual_stages = v, .micro_batches = k * n, .forward_only = true});
      }
}

TEST(PipelineSchedule, TwoStageListWithMessages) {
  const PipelineScheduleParams p{.stages = 2, .virtual_stages = 1, .micro_batches = 2};
  std::string s0, s1;
  for (const auto& a : pipeline_schedule(p, 0)) s0 += a.str() + " ";
  for (const auto& a : pipeline_schedule(p, 1)) s1 += a.str() + " ";
  EXPECT_EQ(s0,
            "F(0,0) send_act(0,0)->1 F(1,0) send_act(1,0)->1 recv_grad(0,0)<-1 B(0,0) "
            "recv_grad(1,0)<-1 B(1,0) ");
  EXPECT_EQ(s1,
            "recv_act(0,0)<-0 F(0,0) recv_act(1,0)<-0 B(0,0) send_grad(0,0)->0 F(1,0) B(1,0) "
            "send_grad(1,0)->0 ");
}

TEST(PipelineSchedule, PredictedBubble) {
  for (int n : {2, 4, 8})
    for (int m : {1, 4, 8, 32}) {
      const double want = double(n - 1) / double(m + n - 1);
      EXPECT_NEAR(pipeline_bubble_fraction({.stages = n, .virtual_stages = 1, .micro_batches = m}),
                  want, 1e-12)
          << n << " stages " << m << " micro-batches";
    }
  // Interleaving shrinks the bubble: (N-1) / (V M + N - 1) for F = B (here the costs are 1 and 1).
  const PipelineCosts equal{.forward = 1, .backward = 1};
  const double one =
      pipeline_bubble_fraction({.stages = 4, .virtual_stages = 1, .micro_batches = 8}, equal);
  const double two =
      pipeline_bubble_fraction({.stages = 4, .virtual_stages = 2, .micro_batches = 8}, equal);
  EXPECT_NEAR(one, 3.0 / 11.0, 1e-12);
  EXPECT_NEAR(two, 3.0 / 19.0, 1e-12);
  // An uneven split: the stage with more layers sets the pace.
  const PipelineTimeline t =
      simulate_pipeline({.stages = 2, .virtual_stages = 1, .micro_batches = 4},
                        {.forward = 1, .backward = 2, .stage_weight = {2, 1}});
  EXPECT_DOUBLE_EQ(t.busy[0], 24);
  EXPECT_DOUBLE_EQ(t.busy[1], 12);
  EXPECT_DOUBLE_EQ(t.makespan,
                   25);  // stage 0 waits once, for the first backward of stage 1 (1 unit)
}

// The executor's model (non-blocking sends, blocking receives) reproduces the schedule's timeline
// for every shape, uneven stages included: the messages sit where the schedule needs them.
TEST(PipelineSchedule, ExecutionModelEqualsSchedule) {
  for (int n : {2, 3, 4, 8})
    for (int v : {1, 2, 3})
      for (int m : {n, 2 * n, 4 * n}) {
        const PipelineScheduleParams p{.stages = n, .virtual_stages = v, .micro_batches = m};
        PipelineCosts uneven;
        for (int k = 0; k < n * v; ++k) uneven.stage_weight.push_back(1 + (k * 7) % 3);
        for (const PipelineCosts& c : {PipelineCosts{}, uneven}) {
          const PipelineTimeline ideal = simulate_pipeline(p, c),
                                 exec = simulate_pipeline_execution(p, c);
          EXPECT_DOUBLE_EQ(exec.makespan, ideal.makespan) << n << " " << v << " " << m;
          for (int r = 0; r < n; ++r) EXPECT_DOUBLE_EQ(exec.busy[r], ideal.busy[r]);
        }
      }
}

TEST(PipelineSchedule, BalancedLayerSplit) {
  EXPECT_EQ(balanced_layer_split({.layers = 33, .parts = 4}), (std::vector<int>{9, 8, 8, 8}));
  // The embedding's cost moves the ninth layer off the first stage.
  EXPECT_EQ(
      balanced_layer_split({.layers = 33, .parts = 4, .first_extra = 0.05, .last_extra = 0.1}),
      (std::vector<int>{8, 9, 8, 8}));
  EXPECT_EQ(balanced_layer_split({.layers = 8, .parts = 4}), (std::vector<int>{2, 2, 2, 2}));
  EXPECT_EQ(balanced_layer_split({.layers = 6, .parts = 3, .first_extra = 0, .last_extra = 1.0}),
            (std::vector<int>{3, 2, 1}));
  EXPECT_EQ(balanced_layer_split({.layers = 7, .parts = 2, .first_extra = 1.0, .last_extra = 0}),
            (std::vector<int>{3, 4}));
  EXPECT_EQ(balanced_layer_split({.layers = 4, .parts = 4, .first_extra = 3, .last_extra = 3}),
            (std::vector<int>{1, 1, 1, 1}));
}

void expect_refused(const std::function<void()>& f, const std::string& flag) {
  try {
    f();
    ADD_FAILURE() << "expected a refusal naming " << flag;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(flag), std::string::npos) << e.what();
  }
}

TEST(PipelineSchedule, BadParametersRefusedNamingTheFlag) {
  expect_refused(
      [] { pipeline_compute_order({.stages = 4, .virtual_stages = 2, .micro_batches = 6}, 0); },
      "--micro-batches 6");
  expect_refused(
      [] { pipeline_compute_order({.stages = 1, .virtual_stages = 2, .micro_batches = 2}, 0); },
      "--pp-virtual");
  expect_refused([] { balanced_layer_split({.layers = 3, .parts = 4}); }, "--pp");
  expect_refused([] { validate_layer_split({9, 8, 8, 7}, 33, 4); }, "--pp-layers");
  expect_refused([] { validate_layer_split({9, 8, 8}, 25, 4); }, "--pp-layers");
  expect_refused([] { validate_layer_split({17, 0, 8, 8}, 33, 4); }, "--pp-layers");
}

}  // namespace
}  // namespace helix
