#pragma once
// ZeRO stages 1-3 for an ESM-2 model over the data-parallel group (tensor-parallel shards stay as
// they are): ZeroSync takes over the model's parameters after initialisation and holds, per unit
// (the non-layer parameters, then one unit per transformer layer), flat buffers laid out by
// parallel/zero.h: the fp32 master and Adam moment shards (every stage), the gradient (stage 1: the
// full buffer, all-reduced; stages 2-3: reduce-scattered into this rank's shard, the full buffer
// dropped), and the model copy (stages 1-2: the full flat buffer that the parameters view; stage 3:
// a shard, all-gathered per layer through the Esm2LayerHooks just before the layer's forward and
// again before its backward, freed after each, the next layer's gather prefetched).
// Gradients are reduced once per optimizer step: the step's last micro-batch (begin_micro_batch).
// ZeroAdamW (layers/zero_optimizer.h) updates the shards. docs/fsdp.md.
#include <memory>
#include <string>
#include <vector>

#include "layers/esm2.h"
#include "layers/optimizer.h"
#include "parallel/context.h"
#include "parallel/zero.h"

namespace helix {

struct ZeroOptions {
  int stage = 1;  // 1, 2 or 3
  // The group that shards and reduces: null means ctx->dp(). Under context parallelism pass
  // ctx->dp_cp() (gradients are summed over cp as well, and the state sharded over dp x cp).
  Communicator* shard_comm = nullptr;
  // Stage 3: gather a layer's parameters again before its backward. Needed when the layer's forward
  // is recomputed (--recompute full); without recompute the layer's nodes still hold the gathered
  // weights they saved in forward, so the gather would only duplicate them.
  bool regather_in_backward = true;
  bool prefetch = true;  // stage 3: gather the next layer (forward) / previous layer (backward) ahead
};

class ZeroSync final : public Esm2LayerHooks {
 public:
  // Call after the model's parameters are initialised or loaded: their masters move into shards
  // (Parameter::master becomes undefined; materialize_masters() brings it back for export). For
  // stage 3 the model's layer hooks are set to this object, which must outlive the model's use.
  ZeroSync(Esm2Model& model, const ParallelContext& ctx, ZeroOptions options);
  ~ZeroSync() override;

  int stage() const { return opts_.stage; }
  Communicator& shard_comm() const { return *comm_; }
  const ParallelContext& context() const { return *ctx_; }
  ParameterSet& params() { return params_; }

  // The GradSync calls of a step: zero_grads before the first micro-batch, begin_micro_batch before
  // each forward (last: the step's last micro-batch; stage 3 reduce-scatters each layer's gradient
  // right after its backward), reduce after the last backward (every remaining unit).
  void zero_grads(const Stream& stream);
  void begin_micro_batch(bool last) { last_micro_batch_ = last; }
  void reduce(const Stream& stream);
  // Sums a [n] tensor of per-rank totals (loss sum, labelled tokens) over the shard group.
  void sum_over_dp(const Tensor& t, const Stream& stream) const;

  // Esm2LayerHooks (stage 3).
  void begin_forward(Tape& tape) override;
  Var enter_layer(Tape& tape, int layer, const Var& x) override;
  Var leave_layer(Tape& tape, int layer, const Var& x) override;

  // Shards and layout. Unit u holds parameters unit_params(u) (indices into params().all()).
  const ZeroShardLayout& layout() const { return layout_; }
  size_t num_units() const { return layout_.units.size(); }
  const std::vector<size_t>& unit_params(size_t u) const { return unit_params_[u]; }
  Tensor master_shard(size_t u) const { return master_[u]; }    // [S] f32
  Tensor exp_avg_shard(size_t u) const { return exp_avg_[u]; }  // [S] f32
  Tensor exp_avg_sq_shard(size_t u) const { return exp_avg_sq_[u]; }  // [S] f32
  Tensor grad_shard(size_t u) const { return grad_shard_[u]; }  // [S] f32, reduced after reduce()
  // Where AdamW writes the updated compute-dtype copy of the shard: stages 1-2 this rank's slice of
  // the full flat model copy, stage 3 the model shard (the master itself in f32 runs).
  Tensor model_shard(size_t u) const;
  // After an applied optimizer step: stages 1-2 all-gather the updated model copies.
  void after_step(const Stream& stream);
  // After the master shards were written from outside (a checkpoint restore): converts them into
  // this rank's model-copy shard and (stages 1-2) all-gathers the full model copies. Collective.
  void refresh_model_copies(const Stream& stream);

  // Collective over the shard group (call in the same order on every rank): this tp rank's
  // full-shape f32 master / reduced gradient of parameter i, on the CPU.
  Tensor local_master(size_t i) const;
  Tensor local_grad(size_t i) const;
  // Collective: gives every Parameter::master its full tensor again, on the CPU (for save_hf /
  // hf_tensors at the end of training; the device holds no second full copy).
  void materialize_masters();

  // Bytes of the buffers that exist now (measured) and the formula for this layout.
  ZeroMemory memory() const;
  ZeroMemory formula() const;

 private:
  bool next_in_range(int layer, int dir) const;
  void gather_unit(size_t u, const Stream& stream);
  void release_unit(size_t u);
  void ensure_full_grad(size_t u, const Stream& stream);
  void reduce_unit(size_t u, const Stream& stream);
  Tensor view_of(const Tensor& flat, size_t u, size_t k) const;
  Tensor gather_flat(const Tensor& shard) const;  // [S] -> [S * dp] on the CPU, f32

  Esm2Model& esm2_;
  ParameterSet& params_;
  const ParallelContext* ctx_;
  Communicator* comm_;
  ZeroOptions opts_;
  int rank_ = 0;
  Device device_;
  DType compute_ = DType::kF32;
  ZeroShardLayout layout_;
  std::vector<std::vector<size_t>> unit_params_;  // per unit, parameter indices
  std::vector<size_t> layer_unit_;                // per model layer, its unit (0: not held here)
  std::vector<Tensor> master_, exp_avg_, exp_avg_sq_;  // [S] f32 each
  std::vector<Tensor> model_;       // stages 1-2: [P] compute dtype; stage 3: [S] (== master_ in f32)
  std::vector<Tensor> full_grad_;   // [P] f32 while it exists (stage 1: always)
  std::vector<Tensor> grad_shard_;  // [S] f32 (stage 1: a view of full_grad_)
  std::vector<bool> reduced_;       // this step, per unit
  bool last_micro_batch_ = true;
  std::unique_ptr<ZeroGatherer> gatherer_;
};

// Per-rank bytes of an unsharded (ZeRO 0) model and its AdamW, from the tensors that exist:
// parameters = model copies, gradients = gradient tensors, optimizer = separate masters + moments.
ZeroMemory unsharded_memory(const ParameterSet& params, AdamW& opt);

// The ZeRO units of an ESM-2 model (unit 0: the parameters outside the layers; unit 1 + k: the k-th
// layer the model holds, i.e. layer k without pipeline parallelism), as parameter indices; the
// memory formula's unit_numels come from their shapes. A pipeline stage (Esm2Options::layer_ranges)
// has units for its own layers only; its unit 0 holds the embedding on the first stage, embedding,
// final LayerNorm and LM head on the last, nothing on a middle stage (a padding-only unit).
std::vector<std::vector<size_t>> esm2_zero_units(const Esm2Model& model);
// The layers the model holds, ascending (all of them without layer_ranges).
std::vector<int> esm2_zero_layers(const Esm2Model& model);
// The same units' tensor sizes from the configuration alone (this tp rank's shapes, the vocabulary
// padded to a multiple of tp), for zero_memory_bytes without building the model (`helix plan`).
std::vector<std::vector<int64_t>> esm2_zero_unit_numels(const ModelConfig& config, int tp);
// The same for a pipeline stage holding `layer_ranges` (pipeline_layer_ranges; empty: every layer).
std::vector<std::vector<int64_t>> esm2_zero_unit_numels(const ModelConfig& config, int tp,
                                                       const std::vector<std::pair<int, int>>& layer_ranges);

}  // namespace helix
