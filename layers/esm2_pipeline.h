#pragma once
// Pipeline parallelism of the ESM-2 model: a stage model (Esm2Options::layer_ranges, one range per
// model chunk) driven by the schedules and the executor of parallel/pipeline_schedule.h. Every
// micro-batch is padded to a fixed token budget (one extra <pad> sequence without labels), so each
// activation and gradient message is [budget, H] ([ceil(budget/tp), H] under sequence parallelism)
// and every stage derives the same THD metadata from the same micro-batches (all stages of a
// pipeline read the same batches from the loader). Under context parallelism every stage shards
// the same padded micro-batch and messages are the rank's local rows (both ends know the count).
// The tied embedding / decoder table lives on the
// first and the last stage with equal initialisation; its gradient is summed between the two after
// backward, so both apply the same update. docs/pipeline.md.
#include <memory>
#include <utility>
#include <vector>

#include "core/thd_batch.h"
#include "layers/esm2.h"
#include "layers/optimizer.h"
#include "parallel/context.h"
#include "parallel/pipeline_schedule.h"

namespace helix {

class ZeroSync;

// Layer ranges [first, last) of `rank`'s chunks: virtual stage v = chunk * stages + rank holds the
// v-th part of `split` (layers per virtual stage, in order).
std::vector<std::pair<int, int>> pipeline_layer_ranges(const std::vector<int>& split, int stages,
                                                       int rank);

// The balanced split of the model's layers into `parts` virtual stages (balanced_layer_split): a
// layer costs its GEMM FLOPs per token (4H^2 + 2HF, attention scores left out), the first stage
// also the embedding (no GEMM: cost 0), the last also the LM head (H^2 + HV).
std::vector<int> esm2_pipeline_split(const ModelConfig& config, int parts);

// `b` with <pad> sequences (no labels, each at most max(max_seqlen, 1) long) appended up to
// `budget` tokens. Every op is per token or per sequence, so the loss and every gradient are
// unchanged.
ThdBatch pad_thd_batch(const ThdBatch& b, int64_t budget, int32_t pad_id);

struct Esm2PipelineOptions {
  int virtual_stages = 1;    // model chunks per rank (> 1: interleaved 1F1B)
  int64_t token_budget = 0;  // tokens of every padded micro-batch (>= the largest micro-batch);
                             // FP8 models round it up to the model's FP8 token multiple
  // Layers per virtual stage (the whole split, all ranks): the schedule's message placement
  // follows the timeline of these weights. Empty: uniform stages.
  std::vector<int> layers_per_stage;
  // Synchronise the stream after every forward / backward and every send / receive, so that
  // PipelineRunStats holds device time on a GPU (benchmarks; costs the overlap of host and device,
  // and makes NCCL sends wait for their receiver).
  bool timed = false;
};

class Esm2Pipeline {
 public:
  // `model` is this rank's stage, built with layer_ranges = pipeline_layer_ranges(...) for the
  // pp coordinate of `ctx`.
  Esm2Pipeline(Esm2Model& model, const ParallelContext& ctx, Esm2PipelineOptions options);

  // Forward and backward of the step's micro-batches (the same batches on every stage); parameter
  // gradients accumulate, then the tied table's gradient is summed over the first and last stage.
  // Returns the loss sum (as Esm2Model::loss) over the micro-batches, the same on every stage.
  double train_step(const std::vector<ThdBatch>& micro, float grad_scale, const Stream& stream);
  // Forward only (evaluation): the loss sum over `micro`, the same on every stage.
  double eval_loss(const std::vector<ThdBatch>& micro, const Stream& stream);
  // For AdamW::step: `inner` (GradSync::norm_reduce: tp sum, world max of the flag), then the sum
  // of squares over the pipeline stages, the tied table counted once.
  AdamW::NormReduce norm_reduce(AdamW::NormReduce inner) const;
  // The model's tensors under Hugging Face names gathered over the stages (collective over tp and
  // pp); complete on pp rank 0, empty elsewhere.
  std::vector<std::pair<std::string, Tensor>> hf_tensors() const;
  // Esm2Model::save_hf of the whole pipelined model (collective over tp and pp; world rank 0
  // writes).
  void save_hf(const std::string& path) const;

  // ZeRO over dp (layers/zero_sync.h, built on this stage model): told before every backward
  // whether it is the chunk's last micro-batch (ZeRO-3 reduce-scatters each layer's gradient right
  // after that backward). Call ZeroSync::zero_grads before train_step and reduce after it: the tied
  // table's gradient is summed between the first and the last stage on the full (unreduced)
  // buffers first, so the dp reduction of both copies sums the same values.
  void set_zero(ZeroSync* zero) { zero_ = zero; }

  bool first_stage() const { return rank_ == 0; }
  bool last_stage() const { return rank_ == stages_ - 1; }
  const PipelineRunStats& last_stats() const { return stats_; }
  int64_t activation_rows() const;  // rows of every message
  int64_t token_budget() const { return opts_.token_budget; }  // after the FP8 rounding

 private:
  double run(const std::vector<ThdBatch>& micro, float grad_scale, bool train,
             const Stream& stream);
  void sum_tied_embedding_grad(const Stream& stream);

  Esm2Model& model_;
  const ParallelContext& ctx_;
  Esm2PipelineOptions opts_;
  int stages_ = 1, rank_ = 0;
  std::vector<std::pair<int, int>> ranges_;  // [chunk] layer range
  PipelineRunStats stats_;
  ZeroSync* zero_ = nullptr;
};

}  // namespace helix
