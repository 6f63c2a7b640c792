#include "layers/esm2_pipeline.h"

#include <algorithm>
#include <map>
#include <numeric>
#include <set>

#include "kernels/axpy/axpy.h"
#include "kernels/grad_norm/grad_norm.h"
#include "layers/fp8_layers.h"
#include "layers/zero_sync.h"

namespace helix {

namespace {
constexpr const char* kEmbedding = "esm.embeddings.word_embeddings.weight";

// Sum of squares of the gradients (f32, on their device) with the kernel AdamW uses.
double grad_sumsq(const std::vector<Tensor>& grads, const Stream& stream) {
  if (grads.empty()) return 0;
  GradNormTensorList list(grads);
  Tensor out = Tensor::zeros({1}, DType::kF32, grads.front().device());
  grad_norm_sumsq(GradNormParams{.grads = &list, .sumsq = out, .nonfinite_flag = Tensor()}, stream);
  return out.to_floats()[0];
}

// The gradient of `p`, allocated zero when no backward reached it.
Tensor& grad_of(Parameter& p) {
  if (!p.grad().defined())
    p.var.cell()->grad = Tensor::zeros(p.master.shape(), DType::kF32, p.master.device());
  return p.var.cell()->grad;
}
}  // namespace

std::vector<std::pair<int, int>> pipeline_layer_ranges(const std::vector<int>& split, int stages,
                                                       int rank) {
  HELIX_CHECK(stages >= 1 && static_cast<int>(split.size()) % stages == 0,
              "--pp-layers: expected a multiple of --pp {} entries, got {}", stages, split.size());
  std::vector<std::pair<int, int>> out;
  int first = 0;
  for (size_t v = 0; v < split.size(); ++v) {
    if (static_cast<int>(v) % stages == rank) out.emplace_back(first, first + split[v]);
    first += split[v];
  }
  return out;
}

std::vector<int> esm2_pipeline_split(const ModelConfig& c, int parts) {
  const double h = c.hidden, layer = 4 * h * h + 2 * h * c.ffn;
  return balanced_layer_split({.layers = c.layers,
                               .parts = parts,
                               .first_extra = 0.0,
                               .last_extra = (h * h + h * c.vocab) / layer});
}

ThdBatch pad_thd_batch(const ThdBatch& b, int64_t budget, int32_t pad_id) {
  const int64_t t = b.total_tokens();
  HELIX_CHECK(t <= budget, "pipeline: a micro-batch of {} tokens exceeds the token budget {}", t,
              budget);
  if (t == budget) return b;
  const Device d = b.tokens.device();
  const auto host = [](const Tensor& x) { return x.to(Device::cpu()).to_vector<int32_t>(); };
  std::vector<int32_t> tokens = host(b.tokens), labels = host(b.labels), cu = host(b.cu_seqlens),
                       cup = host(b.cu_seqlens_padded), pos;
  if (b.positions.defined()) pos = host(b.positions);
  const int32_t piece = std::max<int32_t>(b.max_seqlen, 1);
  for (int64_t left = budget - t; left > 0;) {
    const int32_t n = static_cast<int32_t>(std::min<int64_t>(left, piece));
    tokens.insert(tokens.end(), n, pad_id);
    labels.insert(labels.end(), n, -100);
    cu.push_back(cu.back() + n);
    cup.push_back(cup.back() + n);
    if (b.positions.defined())
      for (int32_t i = 0; i < n; ++i) pos.push_back(i);
    left -= n;
  }
  const auto dev = [&](const std::vector<int32_t>& v) {
    return Tensor::from_vector<int32_t>(v, Shape{static_cast<int64_t>(v.size())}).to(d);
  };
  ThdBatch o = b;
  o.tokens = dev(tokens);
  o.labels = dev(labels);
  o.cu_seqlens = dev(cu);
  o.cu_seqlens_padded = dev(cup);
  if (b.positions.defined()) o.positions = dev(pos);
  o.cu_seqlens_host = o.cu_seqlens.to(Device::cpu());
  o.cu_seqlens_padded_host = o.cu_seqlens_padded.to(Device::cpu());
  o.max_seqlen = piece;
  o.num_tokens = b.num_tokens + (budget - t);
  return o;
}

Esm2Pipeline::Esm2Pipeline(Esm2Model& model, const ParallelContext& ctx,
                           Esm2PipelineOptions options)
    : model_(model), ctx_(ctx), opts_(options), stages_(ctx.sizes().pp), rank_(ctx.coords().pp) {
  ranges_ = model_.options().layer_ranges;
  if (ranges_.empty()) ranges_ = {{0, model_.config().layers}};
  HELIX_CHECK(static_cast<int>(ranges_.size()) == opts_.virtual_stages,
              "--pp-virtual {}: the stage model holds {} layer ranges", opts_.virtual_stages,
              ranges_.size());
  HELIX_CHECK(opts_.token_budget > 0, "pipeline: expected a positive token budget, got {}",
              opts_.token_budget);
  HELIX_CHECK(model_.options().parallel == &ctx_,
              "pipeline: the model must be built on the same ParallelContext");
  // FP8: the model pads T to a multiple of 16 (lcm(16, tp) under SP); a budget of that multiple
  // makes it pad nothing, so every stage's activations keep the message shape [budget, H].
  if (model_.options().fp8) {
    const int64_t mult = std::lcm<int64_t>(kFp8TokenMultiple,
                                           model_.options().sequence_parallel ? model_.tp_size() : 1);
    opts_.token_budget = (opts_.token_budget + mult - 1) / mult * mult;
  }
  HELIX_CHECK(ctx_.sizes().cp == 1 || !model_.options().fp8,
              "--fp8 with --cp {} and --pp {}: FP8 of a context-parallel pipeline is not implemented",
              ctx_.sizes().cp, stages_);
  if (!opts_.layers_per_stage.empty()) {  // the split must be the one the stage model was built on
    HELIX_CHECK(pipeline_layer_ranges(opts_.layers_per_stage, stages_, rank_) == ranges_,
                "pipeline: layers_per_stage does not match the stage model's layer ranges");
  }
}

int64_t Esm2Pipeline::activation_rows() const {
  const int tp = model_.tp_size();
  return model_.options().sequence_parallel ? (opts_.token_budget + tp - 1) / tp
                                            : opts_.token_budget;
}

double Esm2Pipeline::run(const std::vector<ThdBatch>& micro, float grad_scale, bool train,
                         const Stream& stream) {
  const PipelineScheduleParams sp{.stages = stages_,
                                  .virtual_stages = opts_.virtual_stages,
                                  .micro_batches = static_cast<int>(micro.size()),
                                  .forward_only = !train};
  PipelineCosts costs;
  for (int l : opts_.layers_per_stage) costs.stage_weight.push_back(l);
  const std::vector<PipelineAction> actions = pipeline_schedule(sp, rank_, costs);
  std::vector<ThdBatch> padded;
  for (const ThdBatch& b : micro)
    padded.push_back(pad_thd_batch(b, opts_.token_budget, model_.config().pad_token_id));
  // Context parallelism: every stage shards the same padded micro-batch (cp_split_batch), so the
  // two ends of a message (same cp coordinate) know its row count: the rank's local rows.
  const int cp = ctx_.sizes().cp;
  std::vector<CpBatch> cpb;
  for (size_t m = 0; cp > 1 && m < padded.size(); ++m) {
    const CpShardOptions so{.split_min_len = model_.options().cp.split_min_len,
                            .pad_id = model_.config().pad_token_id};
    cpb.push_back(cp_split_batch(padded[m].to(Device::cpu()), cp, ctx_.coords().cp, so));
    cpb.back().global = padded[m];
    cpb.back().local = cpb.back().local.to(model_.options().device);
  }
  const auto rows_of = [&](int mb) -> int64_t {
    if (cp == 1) return activation_rows();
    const int64_t t = cpb[static_cast<size_t>(mb)].local.total_tokens(), tp = model_.tp_size();
    return model_.options().sequence_parallel ? (t + tp - 1) / tp : t;
  };

  struct Live {  // one (micro-batch, chunk) between its forward and its backward
    std::unique_ptr<Tape> tape;
    Var input;   // leaf for the received activation (undefined on virtual stage 0)
    Var output;  // the activation sent on, or the loss on the last virtual stage
  };
  std::map<std::pair<int, int>, Live> live;
  const int layers = model_.config().layers;
  double loss_sum = 0;
  PipelineCallbacks cb;
  cb.make_buffer = [&](int mb, int) {
    return Tensor::empty({rows_of(mb), model_.config().hidden}, model_.options().compute,
                         model_.options().device);
  };
  cb.forward = [&](int mb, int chunk, const Tensor& input) -> Tensor {
    TapeOptions to;
    to.stream = stream;
    to.recompute = model_.options().recompute;
    to.record = train;
    Live l;
    l.tape = std::make_unique<Tape>(to);
    const auto [first, last] = ranges_[chunk];
    if (first > 0) {
      HELIX_CHECK(input.defined(), "pipeline: no input activation for micro-batch {} chunk {}", mb,
                  chunk);
      l.input = Var::leaf(input, train, "pipeline_input");
    }
    const CpBatch* c = cp > 1 ? &cpb[static_cast<size_t>(mb)] : nullptr;
    const ThdBatch& b = c ? c->local : padded[mb];
    Var out = model_.forward(*l.tape, b, c, Esm2Span{.begin = first, .end = last, .input = l.input});
    Tensor sent;
    if (last == layers) {
      l.output = model_.loss(*l.tape, out, b, grad_scale);
      loss_sum += l.output.data().to_floats()[0];
    } else {
      l.output = out;
      sent = out.data();
    }
    if (train) live.emplace(std::make_pair(mb, chunk), std::move(l));
    if (opts_.timed) stream.synchronize();
    return sent;
  };
  cb.backward = [&](int mb, int chunk, const Tensor& grad_output) -> Tensor {
    auto it = live.find({mb, chunk});
    HELIX_CHECK(it != live.end(),
                "pipeline: backward of micro-batch {} chunk {} before its forward", mb, chunk);
    Live l = std::move(it->second);
    live.erase(it);
    // Every schedule runs a chunk's backwards in micro-batch order.
    if (zero_) zero_->begin_micro_batch(mb + 1 == static_cast<int>(micro.size()));
    if (grad_output.defined())
      l.tape->backward(l.output, grad_output);
    else
      l.tape->backward(l.output);
    if (opts_.timed) stream.synchronize();
    if (!l.input.defined()) return Tensor();
    if (l.input.grad().defined()) return l.input.grad();
    return Tensor::zeros(l.input.data().shape(), l.input.data().dtype(), l.input.data().device());
  };
  if (opts_.timed) cb.after_comm = [&stream] { stream.synchronize(); };
  stats_ = run_pipeline_actions(actions, ctx_.pp(), cb, stream);
  HELIX_CHECK(live.empty(), "pipeline: {} micro-batch chunks ran forward without backward",
              live.size());
  if (train) sum_tied_embedding_grad(stream);
  // The loss lives on the last stage; every stage reports it (under CP each cp rank's labels are
  // its own: summed over cp).
  Tensor l = Tensor::from_vector<double>({last_stage() ? loss_sum : 0.0}, Shape{1});
  if (stages_ > 1) ctx_.pp().broadcast(l, stages_ - 1, Stream());
  if (cp > 1) ctx_.cp().all_reduce(l, ReduceOp::kSum, Stream());
  return l.to_vector<double>()[0];
}

double Esm2Pipeline::train_step(const std::vector<ThdBatch>& micro, float grad_scale,
                                const Stream& stream) {
  return run(micro, grad_scale, true, stream);
}

double Esm2Pipeline::eval_loss(const std::vector<ThdBatch>& micro, const Stream& stream) {
  return run(micro, 1.0f, false, stream);
}

// Both ends add the other's gradient to their own: g0 + g1 on the first stage, g1 + g0 on the last
// (IEEE addition commutes, so the two stay bitwise equal and so do their updates).
void Esm2Pipeline::sum_tied_embedding_grad(const Stream& stream) {
  if (stages_ == 1 || !(first_stage() || last_stage())) return;
  Parameter& p = model_.params().get(kEmbedding);
  Tensor& g = grad_of(p);
  Tensor other = Tensor::empty(g.shape(), g.dtype(), g.device());
  const int peer = first_stage() ? stages_ - 1 : 0;
  ctx_.pp().send_recv(SendRecvParams{.send = g, .dst = peer, .recv = other, .src = peer}, stream);
  axpy(1.0f, other, g, stream);
}

AdamW::NormReduce Esm2Pipeline::norm_reduce(AdamW::NormReduce inner) const {
  if (stages_ == 1) return inner;
  return [this, inner](Tensor& sharded, Tensor& replicated_sumsq, Tensor& flag) {
    if (inner) inner(sharded, replicated_sumsq, flag);
    const Device d = model_.options().device;
    const Stream stream = d.is_cuda() ? Stream::cuda_default(d.index) : Stream();
    // The pipeline total goes back in `sharded` and the replicated part is zeroed: handing back
    // (total - this stage's replicated sum) for AdamW to add again would round differently per stage.
    std::vector<Tensor> replicated;
    for (Parameter& p : model_.params().all())
      if (p.shard == TpShard::kReplicated) replicated.push_back(grad_of(p));
    const double rep = grad_sumsq(replicated, stream);
    double tied = 0;  // the table is on the first and the last stage: count it on the first only
    if (last_stage()) {
      Parameter& e = model_.params().get(kEmbedding);
      Tensor t = Tensor::from_vector<double>({grad_sumsq({grad_of(e)}, stream)}, Shape{1});
      if (e.shard != TpShard::kReplicated && model_.tp_size() > 1)
        ctx_.tp().all_reduce(t, ReduceOp::kSum, Stream());
      tied = t.to_vector<double>()[0];
    }
    Tensor total =
        Tensor::from_vector<double>({double(sharded.to_floats()[0]) + rep - tied}, Shape{1});
    ctx_.pp().all_reduce(total, ReduceOp::kSum, Stream());
    sharded.fill(total.to_vector<double>()[0], stream);
    replicated_sumsq.zero(stream);
  };
}

// Stage s > 0 sends its list to pp rank 0: [count], then per tensor [name length, ndim], the name
// (i32 code points), the shape (i64), the f32 data.
std::vector<std::pair<std::string, Tensor>> Esm2Pipeline::hf_tensors() const {
  std::vector<std::pair<std::string, Tensor>> mine = model_.hf_tensors();  // collective over tp
  if (stages_ == 1) return mine;
  Communicator& pp = ctx_.pp();
  const Stream cpu;
  if (!first_stage()) {
    pp.send(Tensor::from_vector<int64_t>({static_cast<int64_t>(mine.size())}, Shape{1}), 0, cpu);
    for (const auto& [name, t] : mine) {
      pp.send(Tensor::from_vector<int64_t>(
                  {static_cast<int64_t>(name.size()), static_cast<int64_t>(t.ndim())}, Shape{2}),
              0, cpu);
      pp.send(Tensor::from_vector<int32_t>(std::vector<int32_t>(name.begin(), name.end()),
                                           Shape{static_cast<int64_t>(name.size())}),
              0, cpu);
      pp.send(Tensor::from_vector<int64_t>(t.shape().vec(), Shape{static_cast<int64_t>(t.ndim())}),
              0, cpu);
      pp.send(t.is_contiguous() ? t : t.clone(), 0, cpu);
    }
    return {};
  }
  std::set<std::string> seen;
  for (const auto& [name, t] : mine) seen.insert(name);
  for (int s = 1; s < stages_; ++s) {
    Tensor count = Tensor::empty({1}, DType::kI64);
    pp.recv(count, s, cpu);
    for (int64_t i = 0; i < count.to_vector<int64_t>()[0]; ++i) {
      Tensor head = Tensor::empty({2}, DType::kI64);
      pp.recv(head, s, cpu);
      const std::vector<int64_t> h = head.to_vector<int64_t>();
      Tensor name_t = Tensor::empty({h[0]}, DType::kI32),
             shape_t = Tensor::empty({h[1]}, DType::kI64);
      pp.recv(name_t, s, cpu);
      pp.recv(shape_t, s, cpu);
      const std::vector<int32_t> codes = name_t.to_vector<int32_t>();
      const std::string name(codes.begin(), codes.end());
      Tensor data = Tensor::empty(Shape(shape_t.to_vector<int64_t>()), DType::kF32);
      pp.recv(data, s, cpu);
      if (seen.insert(name).second) mine.emplace_back(name, data);  // the tied table comes twice
    }
  }
  return mine;
}

void Esm2Pipeline::save_hf(const std::string& path) const {
  const auto tensors = hf_tensors();  // collective over tp and pp
  if (ctx_.world_rank() != 0) return;
  save_safetensors(path, tensors, {{"format", "pt"}, {"helix_model", model_.config().name}});
}

}  // namespace helix
