#pragma once
// Pipeline-parallel schedules as pure functions (no MPI, no model): for one rank of the pp group,
// the ordered actions of 1F1B or interleaved 1F1B (forward / backward of a (micro-batch, model
// chunk), send / receive of an activation or of its gradient), the executor that runs such a list
// over the pp communicator through callbacks (parallel never sees the model), the bubble a schedule
// predicts (for `helix plan`), and the balanced split of layers over stages. docs/pipeline.md.
//
// Deadlock freedom: every message (activation of (mb, virtual stage v) to v+1, gradient of
// (mb, v) to v-1) gets one global key from a simulated timeline of the compute order (the end time
// of the compute that produces it, ties broken by kind, virtual stage, micro-batch). Every rank
// performs its sends and receives in increasing key order; a receive comes before the compute that
// consumes it and a send after the compute that produces it. Then the message of smallest key not
// yet delivered always has both sides posted (everything before it on both ranks has completed and
// computes never block), so even fully synchronous (rendezvous) sends and receives cannot deadlock.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace helix {

enum class PipelineActionKind : uint8_t {
  kForward,
  kBackward,
  kRecvActivation,  // the input activation of (micro_batch, chunk) from `peer`
  kSendActivation,  // the output activation of (micro_batch, chunk) to `peer`
  kRecvGrad,        // the gradient of the output of (micro_batch, chunk) from `peer`
  kSendGrad,        // the gradient of the input of (micro_batch, chunk) to `peer`
};
std::string pipeline_action_kind_name(PipelineActionKind kind);  // "F", "B", "recv_act", ...

struct PipelineAction {
  PipelineActionKind kind = PipelineActionKind::kForward;
  int micro_batch = 0;
  int chunk = 0;  // model chunk of this rank: virtual stage = chunk * stages + rank
  int peer = -1;  // pp group rank of the other side (sends and receives only)
  bool operator==(const PipelineAction&) const = default;
  std::string str() const;  // "F(3,0)", "send_act(3,0)->1"
};

struct PipelineScheduleParams {
  int stages = 1;             // pp group size N
  int virtual_stages = 1;     // model chunks per rank V; > 1 selects interleaved 1F1B
  int micro_batches = 1;      // M per step; interleaving needs M a multiple of N
  bool forward_only = false;  // evaluation: every forward in order, no backward
};

// Throws naming the flag (--pp, --pp-virtual, --micro-batches) when the schedule cannot be built.
void validate_pipeline_schedule(const PipelineScheduleParams& p);

// The forward / backward order of one rank (no communication). 1F1B: min(N-1-rank, M) warm-up
// forwards, then one forward and one backward alternately, then the remaining backwards.
// Interleaved (Megatron-LM's order): the k-th forward of a rank runs chunk (k / N) % V of
// micro-batch (k / (N V)) N + k % N, the k-th backward chunk V-1-(k / N) % V of the same
// micro-batch; warm-up (N-1-rank)*2 + (V-1)*N forwards (all of them when M == N).
std::vector<PipelineAction> pipeline_compute_order(const PipelineScheduleParams& p, int rank);

// Relative cost of the computes, for the predicted timeline. stage_weight[v] scales both the
// forward and the backward of virtual stage v (e.g. its layer count); empty = 1 for every stage.
struct PipelineCosts {
  double forward = 1.0;
  double backward = 2.0;
  std::vector<double> stage_weight;  // [N*V] or empty
};

// The full action list of `rank`: the compute order with every send and receive placed (see the
// header comment for the order), from the timeline under `costs` (pass the stage weights of an
// uneven split so that receives sit where that timeline needs them; use integer-valued costs so
// that ties are exact). Identical inputs give identical lists on every rank.
std::vector<PipelineAction> pipeline_schedule(const PipelineScheduleParams& p, int rank,
                                              const PipelineCosts& costs = {});

struct PipelineTimeline {
  double makespan = 0;       // end of the last compute of any rank
  std::vector<double> busy;  // [N] compute time of each rank
  std::vector<double> idle;  // [N] makespan - busy
  // Idle share of the N ranks' time: sum(idle) / (N * makespan).
  double bubble_fraction() const;
};

// Simulates every rank's compute order with the given costs and free communication (a compute
// starts when its rank is free and its input is ready). For 1F1B with uniform stages the bubble
// is (N-1) / (M+N-1).
PipelineTimeline simulate_pipeline(const PipelineScheduleParams& p, const PipelineCosts& costs);
// The action lists (pipeline_schedule with the same costs) as run_pipeline_actions executes them:
// a send is posted and never waits, a receive waits until its send was posted; transfers are free.
// Equals simulate_pipeline (a test checks it for many shapes): the messages sit where the
// schedule needs them.
PipelineTimeline simulate_pipeline_execution(const PipelineScheduleParams& p,
                                             const PipelineCosts& costs);
// The predicted bubble fraction of the schedule (simulate_pipeline), and of the executor's action
// lists (simulate_pipeline_execution). `helix plan` calls these.
double pipeline_bubble_fraction(const PipelineScheduleParams& p, const PipelineCosts& costs = {});
double pipeline_executor_bubble_fraction(const PipelineScheduleParams& p,
                                         const PipelineCosts& costs = {});

// Balanced split of `layers` transformer layers into `parts` contiguous parts (stages, or virtual
// stages in order), each at least one layer: minimises the largest part cost, a layer costing 1,
// the first part also `first_extra` (the embedding), the last part also `last_extra` (final
// LayerNorm + LM head + loss), in layer units; among those, the least sum of squared part costs;
// among equals, earlier parts get more layers (33 layers on 4 stages: 9,8,8,8; with the embedding
// and head costed: 8,9,8,8).
struct LayerSplitParams {
  int layers = 0;
  int parts = 1;
  double first_extra = 0;
  double last_extra = 0;
};
std::vector<int> balanced_layer_split(const LayerSplitParams& p);
// Checks a user split (--pp-layers): `parts` entries, each >= 1, summing to `layers`.
void validate_layer_split(const std::vector<int>& split, int layers, int parts);

// ---- Executor ----------------------------------------------------------------------------------

// What the executor calls; tensors are whole activations [rows, hidden] of the fixed token budget.
struct PipelineCallbacks {
  // Forward of (micro_batch, chunk). `input` is undefined on virtual stage 0 (the model embeds the
  // tokens); returns the output activation, undefined on the last virtual stage (the loss).
  std::function<Tensor(int micro_batch, int chunk, const Tensor& input)> forward;
  // Backward of (micro_batch, chunk) seeded with `grad_output` (undefined on the last virtual
  // stage: the loss is the root); returns the gradient of the input, undefined on virtual stage 0.
  std::function<Tensor(int micro_batch, int chunk, const Tensor& grad_output)> backward;
  // A receive buffer for the activation entering, or the gradient leaving, (micro_batch, chunk).
  std::function<Tensor(int micro_batch, int chunk)> make_buffer;
  // Optional: called right after each send and receive is issued, inside its timing (benchmarks
  // synchronise the stream there, so that a device-side wait counts as communication, not compute).
  std::function<void()> after_comm;
};

struct PipelineRunStats {
  double compute_s = 0;  // in forward / backward callbacks (host time: on a GPU, enqueue time)
  double forward_s = 0;  // the forward share of compute_s
  double backward_s = 0;
  double comm_s = 0;  // in sends and receives, waiting for peers included
  double total_s = 0;
  int64_t messages = 0;  // sends + receives
};

// Runs `actions` (from pipeline_schedule) on the pp communicator: sends are posted without waiting
// (Communicator::isend; all completed at the end), receives block. Non-blocking sends only make the
// deadlock argument above easier (a send never waits), and a sender never idles on a receiver that
// is still computing. NCCL enqueues on `stream`: the host goes on, the stream waits for the peer.
PipelineRunStats run_pipeline_actions(const std::vector<PipelineAction>& actions, Communicator& pp,
                                      const PipelineCallbacks& callbacks, const Stream& stream);

}  // namespace helix
