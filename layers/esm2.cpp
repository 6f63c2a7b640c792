#include "layers/esm2.h"

#include <algorithm>
#include <numeric>

#include "core/random.h"
#include "layers/attention.h"
#include "layers/cp_attention_node.h"
#include "layers/embedding.h"
#include "layers/fp8_layers.h"
#include "layers/layernorm_linear.h"
#include "layers/layernorm_mlp.h"
#include "layers/linear.h"
#include "layers/masked_lm_loss.h"
#include "parallel/comm_ops.h"
#include "kernels/axpy/axpy.h"

namespace helix {

namespace {
constexpr const char* kEmbedding = "esm.embeddings.word_embeddings.weight";
constexpr const char* kFinalLnW = "esm.encoder.emb_layer_norm_after.weight";
constexpr const char* kFinalLnB = "esm.encoder.emb_layer_norm_after.bias";
}  // namespace

namespace {
// Rows per rank of a kRows shard: dim 0 padded up to a multiple of n (the vocabulary; the pad rows
// sit at the end of the last rank's shard, are zero and are never trained).
int64_t rows_per_rank(int64_t rows, int n) { return (rows + n - 1) / n; }

// This rank's shape of a parameter of full shape `full` split `shard` ways over n ranks.
Shape shard_shape(const Shape& full, TpShard shard, int n) {
  Shape s = full;
  if (shard == TpShard::kRows) s[0] = rows_per_rank(full[0], n);
  if (shard == TpShard::kQkvRows) s[0] = full[0] / n;
  if (shard == TpShard::kCols) s[1] = full[1] / n;
  return s;
}
}  // namespace

Esm2Model::Esm2Model(ModelConfig config, Esm2Options options) : config_(std::move(config)), opts_(options) {
  config_.validate();
  const int tp = tp_size();
  HELIX_CHECK(config_.heads % tp == 0, "--tp {}: expected the number of attention heads ({}) divisible by tp", tp,
              config_.heads);
  HELIX_CHECK(config_.ffn % tp == 0, "--tp {}: expected the FFN size ({}) divisible by tp", tp, config_.ffn);
  HELIX_CHECK((tp - 1) * rows_per_rank(config_.vocab, tp) < config_.vocab,
              "--tp {}: expected every tp rank to hold vocabulary rows (vocabulary {}, {} rows per rank)",
              tp, config_.vocab, rows_per_rank(config_.vocab, tp));
  HELIX_CHECK(!opts_.sequence_parallel || tp > 1, "--sequence-parallel: needs --tp > 1, got --tp {}", tp);
  const int64_t h = config_.hidden, f = config_.ffn, v = config_.vocab;
  HELIX_CHECK(!opts_.fp8 || (h % (16 * tp) == 0 && f % (16 * tp) == 0),
              "--fp8 delayed: expected hidden ({}) and ffn ({}) divisible by 16 * tp = {} (FP8 GEMM sizes)", h, f, 16 * tp);
  const Device d = opts_.device;
  const DType c = opts_.compute;
  const bool sp = opts_.sequence_parallel;
  for (size_t i = 0; i < opts_.layer_ranges.size(); ++i) {
    const auto [lo, hi] = opts_.layer_ranges[i];
    const int prev = i == 0 ? 0 : opts_.layer_ranges[i - 1].second;
    HELIX_CHECK(lo >= prev && lo < hi && hi <= config_.layers,
                "--pp-layers: expected ascending layer ranges within [0, {}), got [{}, {}) after {}", config_.layers,
                lo, hi, prev);
  }
  uint64_t ordinal = 0;  // index in the whole model: a pipeline stage draws the same init as one device
  // Parameters of the sequence-parallel region (LayerNorms, row-parallel biases) see only their
  // rank's rows of T under SP: their gradients are partial sums over tp.
  const auto add = [&](const std::string& name, const Shape& full, bool decay, TpShard shard, bool sp_region) {
    if (!holds(name)) return void(++ordinal);
    init_stream_.push_back(ordinal++);
    Parameter& p = params_.add(name, shard_shape(full, shard, tp), decay, d, c);
    p.shard = tp > 1 ? shard : TpShard::kReplicated;
    p.full_shape = full;
    p.grad_partial = sp && sp_region;
  };
  const TpShard rep = TpShard::kReplicated;
  // Vocabulary parallel: the (tied) embedding table and the decoder bias are split by vocab rows.
  add(kEmbedding, {v, h}, true, TpShard::kRows, false);
  for (int i = 0; i < config_.layers; ++i) {
    const std::string p = layer_prefix(i);
    add(p + "attention.LayerNorm.weight", {h}, false, rep, true);
    add(p + "attention.LayerNorm.bias", {h}, false, rep, true);
    add(p + "attention.self.qkv.weight", {3 * h, h}, true, TpShard::kQkvRows, false);
    add(p + "attention.self.qkv.bias", {3 * h}, false, TpShard::kQkvRows, false);
    add(p + "attention.output.dense.weight", {h, h}, true, TpShard::kCols, false);
    add(p + "attention.output.dense.bias", {h}, false, rep, true);
    add(p + "LayerNorm.weight", {h}, false, rep, true);
    add(p + "LayerNorm.bias", {h}, false, rep, true);
    add(p + "intermediate.dense.weight", {f, h}, true, TpShard::kRows, false);
    add(p + "intermediate.dense.bias", {f}, false, TpShard::kRows, false);
    add(p + "output.dense.weight", {h, f}, true, TpShard::kCols, false);
    add(p + "output.dense.bias", {h}, false, rep, true);
  }
  add(kFinalLnW, {h}, false, rep, true);
  add(kFinalLnB, {h}, false, rep, true);
  // The LM head runs on the full T (replicated): its gradients are whole on every rank.
  add("lm_head.dense.weight", {h, h}, true, rep, false);
  add("lm_head.dense.bias", {h}, false, rep, false);
  add("lm_head.layer_norm.weight", {h}, false, rep, false);
  add("lm_head.layer_norm.bias", {h}, false, rep, false);
  add("lm_head.bias", {v}, false, TpShard::kRows, false);
  int64_t full = 0;
  for (const Parameter& p : params_.all()) full += p.full_shape.numel();
  HELIX_CHECK(!opts_.layer_ranges.empty() || full == config_.num_params(),
              "model '{}': {} parameters created, config says {}", config_.name, full, config_.num_params());
}

Tensor Esm2Model::shard_of(const Parameter& p, const Tensor& full) const {
  HELIX_CHECK(full.shape() == p.full_shape, "shard_of '{}': expected the full shape {}, got {}", p.name,
              p.full_shape.str(), full.str());
  const int n = tp_size(), r = tp_rank();
  Tensor f = full.to(Device::cpu()).to(DType::kF32);
  switch (p.shard) {
    case TpShard::kReplicated:
      return f.clone();
    case TpShard::kRows: {  // zero pad rows past the end of the full tensor
      const int64_t rows = rows_per_rank(f.dim(0), n);
      const int64_t lo = std::min(f.dim(0), r * rows), hi = std::min(f.dim(0), (r + 1) * rows);
      Tensor out = Tensor::zeros(shard_shape(p.full_shape, p.shard, n), DType::kF32);
      if (hi > lo) {
        Tensor dst = out.slice(0, hi - lo);
        dst.copy_from(f.slice(lo, hi));
      }
      return out;
    }
    case TpShard::kQkvRows: {  // [q; k; v] of this rank's heads
      const int64_t part = f.dim(0) / 3, rows = part / n;
      Tensor out = Tensor::empty(shard_shape(p.full_shape, p.shard, n), DType::kF32);
      for (int j = 0; j < 3; ++j) {
        Tensor dst = out.slice(j * rows, (j + 1) * rows);
        dst.copy_from(f.slice(j * part + r * rows, j * part + (r + 1) * rows));
      }
      return out;
    }
    case TpShard::kCols: {
      const int64_t rows = f.dim(0), cols = f.dim(1), w = cols / n;
      Tensor out = Tensor::empty({rows, w}, DType::kF32);
      const float* src = f.data<float>();
      float* dst = out.data<float>();
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < w; ++j) dst[i * w + j] = src[i * cols + r * w + j];
      return out;
    }
  }
  HELIX_FAIL("shard_of: unknown shard kind");
}

// Inverse of shard_of over the tp group: all-gather the shards (stacked along dim 0 in rank order)
// and put every block where it belongs in the full tensor.
Tensor Esm2Model::gather_shards(const Parameter& p, const Tensor& local) const {
  Tensor mine = local.to(Device::cpu()).to(DType::kF32);
  if (p.shard == TpShard::kReplicated) return mine.clone();
  const int n = tp_size();
  std::vector<int64_t> dims{mine.dim(0) * n};
  for (int i = 1; i < mine.ndim(); ++i) dims.push_back(mine.dim(i));
  Tensor stacked = Tensor::empty(Shape(dims), DType::kF32);
  opts_.parallel->tp().all_gather(mine, stacked, Stream());
  const int64_t blk = mine.dim(0);
  if (p.shard == TpShard::kRows)  // drop the vocabulary's pad rows
    return stacked.dim(0) == p.full_shape[0] ? stacked : stacked.slice(0, p.full_shape[0]).clone();
  Tensor full = Tensor::empty(p.full_shape, DType::kF32);
  if (p.shard == TpShard::kQkvRows) {
    const int64_t rows = blk / 3, part = rows * n;
    for (int r = 0; r < n; ++r)
      for (int j = 0; j < 3; ++j) {
        Tensor dst = full.slice(j * part + r * rows, j * part + (r + 1) * rows);
        dst.copy_from(stacked.slice(r * blk + j * rows, r * blk + (j + 1) * rows));
      }
    return full;
  }
  const int64_t rows = p.full_shape[0], cols = p.full_shape[1], w = cols / n;  // kCols
  const float* src = stacked.data<float>();
  float* dst = full.data<float>();
  for (int r = 0; r < n; ++r)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < w; ++j) dst[i * cols + r * w + j] = src[(r * rows + i) * w + j];
  return full;
}

Tensor Esm2Model::full_master(const Parameter& p) const { return gather_shards(p, p.master); }

Tensor Esm2Model::full_grad(const Parameter& p) const {
  const Tensor g = p.grad().defined() ? p.grad() : Tensor::zeros(p.master.shape(), DType::kF32, p.master.device());
  return gather_shards(p, g);
}

bool Esm2Model::holds(const std::string& name) const {
  const auto& ranges = opts_.layer_ranges;
  if (ranges.empty()) return true;
  const bool first = ranges.front().first == 0, last = ranges.back().second == config_.layers;
  if (name == kEmbedding) return first || last;
  const std::string layer = "esm.encoder.layer.";
  if (!name.starts_with(layer)) return last;  // final LayerNorm, LM head
  const int i = std::stoi(name.substr(layer.size()));
  return std::any_of(ranges.begin(), ranges.end(), [i](const auto& r) { return i >= r.first && i < r.second; });
}

void Esm2Model::init_random(uint64_t seed) {
  for (Parameter& p : params_.all()) {
    const uint64_t sub = init_stream_[static_cast<size_t>(&p - params_.all().data())];
    const std::string& n = p.name;
    const bool is_norm = n.find("LayerNorm") != std::string::npos || n.find("layer_norm") != std::string::npos ||
                         n.find("emb_layer_norm") != std::string::npos;
    // The full tensor is drawn on the model's device (a 3B model's 2.8e9 normals take minutes on
    // one host thread, well under a second on a GPU; the device's Philox stream gives the same
    // numbers up to the last bit of Box-Muller's log/cos), then this rank's shard is taken.
    const bool sharded = p.master.shape() != p.full_shape;
    Tensor full = Tensor::empty(p.full_shape, DType::kF32, opts_.device);
    if (is_norm && n.ends_with(".weight")) {
      full.fill(1.0);
    } else if (n.ends_with(".bias")) {
      full.zero();
    } else {
      fill_normal(full, seed, sub, 0.0f, 0.02f);
      if (n == kEmbedding) {  // padding_idx row
        Tensor pad_row = full.slice(config_.pad_token_id, config_.pad_token_id + 1);
        pad_row.zero();
      }
    }
    p.master.copy_from(sharded ? shard_of(p, full.to(Device::cpu())) : full, Stream());
  }
  params_.sync_model_copies(Stream());
}

std::vector<std::pair<std::string, Tensor>> Esm2Model::hf_tensors() const {
  std::vector<std::pair<std::string, Tensor>> out;
  const int64_t h = config_.hidden;
  for (const Parameter& p : params_.all()) {
    Tensor host = full_master(p);
    const auto qkv = p.name.find("attention.self.qkv.");
    if (qkv == std::string::npos) {
      out.emplace_back(p.name, host);
      continue;
    }
    const std::string prefix = p.name.substr(0, qkv) + "attention.self.";
    const std::string kind = p.name.substr(qkv + std::string("attention.self.qkv.").size());  // weight | bias
    const char* parts[] = {"query", "key", "value"};
    for (int j = 0; j < 3; ++j) out.emplace_back(prefix + parts[j] + "." + kind, host.slice(j * h, (j + 1) * h).clone());
  }
  // The tied decoder, so that transformers finds every weight it expects.
  if (params_.has(kEmbedding)) out.emplace_back("lm_head.decoder.weight", full_master(params_.get(kEmbedding)));
  return out;
}

void Esm2Model::save_hf(const std::string& path) const {
  const auto tensors = hf_tensors();  // collective over tp
  if (opts_.parallel && opts_.parallel->world_rank() != 0) return;
  save_safetensors(path, tensors, {{"format", "pt"}, {"helix_model", config_.name}});
}

void Esm2Model::load_hf(const SafetensorsReader& file) {
  const int64_t h = config_.hidden;
  const auto load_f32 = [&](const std::string& name, const Shape& shape) {
    HELIX_CHECK(file.has(name), "'{}': tensor '{}' is missing (not an ESM-2 checkpoint, or another model size?)",
                file.path(), name);
    const SafetensorsEntry& e = file.entry(name);
    HELIX_CHECK(e.shape == shape, "'{}': tensor '{}' has shape {}, model '{}' needs {}", file.path(), name,
                e.shape.str(), config_.name, shape.str());
    Tensor t = file.load(name);
    return t.dtype() == DType::kF32 ? t : t.to(DType::kF32);
  };
  for (Parameter& p : params_.all()) {
    const auto qkv = p.name.find("attention.self.qkv.");
    if (qkv == std::string::npos) {
      p.master.copy_from(shard_of(p, load_f32(p.name, p.full_shape)), Stream());
      continue;
    }
    const std::string prefix = p.name.substr(0, qkv) + "attention.self.";
    const std::string kind = p.name.substr(qkv + std::string("attention.self.qkv.").size());
    const bool is_weight = kind == "weight";
    Tensor joined = Tensor::empty(p.full_shape, DType::kF32);
    const char* parts[] = {"query", "key", "value"};
    for (int j = 0; j < 3; ++j) {
      Tensor part = load_f32(prefix + parts[j] + "." + kind, is_weight ? Shape{h, h} : Shape{h});
      Tensor dst = joined.slice(j * h, (j + 1) * h);
      dst.copy_from(part);
    }
    p.master.copy_from(shard_of(p, joined), Stream());
  }
  params_.sync_model_copies(Stream());
}

}  // namespace helix

// ---- Forward graph --------------------------------------------------------------------------------
namespace helix {

namespace {
ThdBatch with_pad_sequence(const ThdBatch& b, int64_t pad, int32_t pad_id);  // defined below
Var take_rows(Tape& tape, const Var& x, int64_t rows);
}  // namespace

Var Esm2Model::forward(Tape& tape, const ThdBatch& fwd_batch, const CpBatch* cp, const Esm2Span& span) {
  HELIX_CHECK(span.begin == 0 || span.input.defined(), "forward: a span from layer {} needs its input activation",
              span.begin);
  if (opts_.layer_hooks) opts_.layer_hooks->begin_forward(tape);
  if (tp_size() > 1) return forward_tp(tape, fwd_batch, cp, span);
  const int end = span.end < 0 ? config_.layers : span.end;
  Fp8ScalingManager* fp8 = opts_.fp8;  // FP8: T padded to a multiple of 16 with a dummy sequence
  const int64_t t_in = fwd_batch.total_tokens(), fp8_pad = fp8 ? -t_in & (kFp8TokenMultiple - 1) : 0;
  const ThdBatch batch = fp8_pad ? with_pad_sequence(fwd_batch, fp8_pad, config_.pad_token_id) : fwd_batch;
  const ModelConfig& c = config_;
  const float eps = c.layer_norm_eps;
  HELIX_CHECK(batch.tokens.device() == opts_.device, "forward: batch on {}, model on {}", batch.tokens.device().str(),
              opts_.device.str());
  // Captures by value: under recompute a segment's function runs again during backward.
  const ParameterSet* params = &params_;
  const auto w = [params](const std::string& n) -> const Var& { return params->get(n).var; };

  EmbeddingOptions eo;
  eo.token_dropout = c.token_dropout;
  eo.mask_token_id = c.mask_token_id;
  Var x = span.input;
  if (span.begin == 0) {
    x = tape.apply1(std::make_shared<EmbeddingNode>(cp ? cp->global : batch, eo, opts_.compute), {w(kEmbedding)});
    if (cp) x = tape.apply1(std::make_shared<CpTakeRowsNode>(cp->layouts.at(cp->rank), batch.total_tokens()), {x});
  }

  auto attn = std::make_shared<const AttentionInputs>(AttentionInputs::from_batch(batch, c.heads, c.head_dim()));
  if (cp) attn = cp_attention_inputs(*attn, *cp, opts_.parallel->cp(), opts_.cp.comm);
  for (int i = span.begin; i < end; ++i) {
    const std::string p = layer_prefix(i);
    auto layer = [w, p, eps, attn, fp8, i](Tape& t, const std::vector<Var>& in) -> std::vector<Var> {
      Var qkv = t.apply1(make_layernorm_linear_node(eps, fp8, i),
                         {in[0], w(p + "attention.LayerNorm.weight"), w(p + "attention.LayerNorm.bias"),
                          w(p + "attention.self.qkv.weight"), w(p + "attention.self.qkv.bias")});
      Var a = t.apply1(std::make_shared<AttentionNode>(attn), {qkv});
      Var h = t.apply1(make_linear_residual_node(fp8, i),
                       {a, w(p + "attention.output.dense.weight"), w(p + "attention.output.dense.bias"), in[0]});
      return {t.apply1(make_layernorm_mlp_node(eps, fp8, i),
                       {h, w(p + "LayerNorm.weight"), w(p + "LayerNorm.bias"), w(p + "intermediate.dense.weight"),
                        w(p + "intermediate.dense.bias"), w(p + "output.dense.weight"), w(p + "output.dense.bias")})};
    };
    if (opts_.layer_hooks) x = opts_.layer_hooks->enter_layer(tape, i, x);
    x = tape.segment("layer" + std::to_string(i), layer, {x})[0];
    if (opts_.layer_hooks) x = opts_.layer_hooks->leave_layer(tape, i, x);
  }
  if (end < c.layers) return x;
  x = tape.apply1(std::make_shared<LayerNormNode>(eps), {x, w(kFinalLnW), w(kFinalLnB)});
  Var logits = tape.apply1(std::make_shared<LmHeadNode>(eps),
                     {x, w("lm_head.dense.weight"), w("lm_head.dense.bias"), w("lm_head.layer_norm.weight"),
                      w("lm_head.layer_norm.bias"), w(kEmbedding), w("lm_head.bias")});
  return fp8_pad ? take_rows(tape, logits, t_in) : logits;
}

Var Esm2Model::loss(Tape& tape, const Var& logits, const ThdBatch& batch, float grad_scale) {
  if (tp_size() > 1) {
    VocabParallelLossOptions o;
    o.tp = &opts_.parallel->tp();
    o.vocab_start = tp_rank() * rows_per_rank(config_.vocab, tp_size());
    o.vocab_size = config_.vocab;
    o.grad_scale = grad_scale;
    return tape.apply(std::make_shared<VocabParallelLossNode>(batch.labels, o), {logits})[0];
  }
  return tape.apply(std::make_shared<MaskedLmLossNode>(batch.labels, grad_scale), {logits})[0];
}

// ---- Tensor- and sequence-parallel forward graph --------------------------------------------------
namespace {

// Rows [0, rows) of x: drops the dummy padding sequence from the logits. Backward fills those rows.
class TakeRowsNode final : public Node {
 public:
  explicit TakeRowsNode(int64_t rows) : rows_(rows) {}
  std::string name() const override { return "take_rows"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override { return {in[0].slice(0, rows_)}; }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override {
    if (gin[0].defined() && gout[0].defined()) axpy(1.0f, gout[0], gin[0].slice(0, rows_), stream);
  }

 private:
  int64_t rows_;
};

// The batch with one more sequence of `pad` <pad> tokens (no labels) at the end. Every op is per
// token or per sequence, so the extra sequence changes no other token's value or gradient, and its
// own gradient is zero (no label): the loss and every gradient are those of the original batch.
ThdBatch with_pad_sequence(const ThdBatch& b, int64_t pad, int32_t pad_id) {
  const Device d = b.tokens.device();
  const auto extend = [&](const Tensor& t, const std::vector<int32_t>& tail) {
    std::vector<int32_t> v = t.to(Device::cpu()).to_vector<int32_t>();
    v.insert(v.end(), tail.begin(), tail.end());
    return Tensor::from_vector<int32_t>(v, Shape{static_cast<int64_t>(v.size())}).to(d);
  };
  const std::vector<int32_t> cu = b.cu_seqlens.to(Device::cpu()).to_vector<int32_t>();
  const std::vector<int32_t> cup = b.cu_seqlens_padded.to(Device::cpu()).to_vector<int32_t>();
  const int32_t p = static_cast<int32_t>(pad);
  ThdBatch o = b;
  o.tokens = extend(b.tokens, std::vector<int32_t>(pad, pad_id));
  o.labels = extend(b.labels, std::vector<int32_t>(pad, -100));
  o.cu_seqlens = extend(b.cu_seqlens, {cu.back() + p});
  o.cu_seqlens_padded = extend(b.cu_seqlens_padded, {cup.back() + p});
  if (b.positions.defined()) {
    std::vector<int32_t> pos(pad);
    for (int32_t i = 0; i < p; ++i) pos[i] = i;
    o.positions = extend(b.positions, pos);
  }
  o.cu_seqlens_host = o.cu_seqlens.to(Device::cpu());
  o.cu_seqlens_padded_host = o.cu_seqlens_padded.to(Device::cpu());
  o.max_seqlen = std::max<int32_t>(b.max_seqlen, p);
  o.num_tokens = b.num_tokens + pad;
  return o;
}

Var take_rows(Tape& tape, const Var& x, int64_t rows) { return tape.apply1(std::make_shared<TakeRowsNode>(rows), {x}); }

}  // namespace

// Per layer (x [T, H] replicated, or [T/tp, H] this rank's rows under SP):
//   u   = enter(LN1(x))                 enter = copy_to_tp, or gather_from_sp(kReduceScatter) under SP
//   h   = x + leave(attn(u Wqkv_r^T + bqkv_r) Wo_r^T) + bo       leave = reduce_from_tp, or
//   y   = h + leave(GELU(enter(LN2(h)) W1_r^T + b1_r) W2_r^T) + b2      reduce_scatter_to_sp under SP
// then the final LayerNorm, gather_from_sp(kSplit) under SP, and the LM head on the full T.
Var Esm2Model::forward_tp(Tape& tape, const ThdBatch& batch, const CpBatch* cp, const Esm2Span& span) {
  const int end = span.end < 0 ? config_.layers : span.end;
  const ModelConfig& c = config_;
  const float eps = c.layer_norm_eps;
  const int n = tp_size();
  const bool sp = opts_.sequence_parallel;
  Communicator* tp = &opts_.parallel->tp();
  HELIX_CHECK(batch.tokens.device() == opts_.device, "forward: batch on {}, model on {}", batch.tokens.device().str(),
              opts_.device.str());
  const int64_t t = batch.total_tokens();
  const int64_t mult = opts_.fp8 ? std::lcm<int64_t>(kFp8TokenMultiple, sp ? n : 1) : n;  // FP8: T % 16 == 0
  const ThdBatch b = (sp || opts_.fp8) && t % mult != 0 ? with_pad_sequence(batch, mult - t % mult, c.pad_token_id)
                                                         : batch;
  Fp8ScalingManager* fp8 = opts_.fp8;
  const ParameterSet* params = &params_;
  const auto w = [params](const std::string& name) -> const Var& { return params->get(name).var; };

  // Vocabulary-parallel embedding: each rank looks up its rows (zero rows for other ids), the sum
  // over tp completes the lookup (reduce-scatter along T under SP).
  EmbeddingOptions eo;
  eo.token_dropout = c.token_dropout;
  eo.mask_token_id = c.mask_token_id;
  eo.vocab_rows = rows_per_rank(c.vocab, n);
  eo.vocab_start = tp_rank() * eo.vocab_rows;
  Var x = span.input;
  if (span.begin == 0) {
    x = tape.apply1(std::make_shared<EmbeddingNode>(cp ? cp->global : b, eo, opts_.compute), {w(kEmbedding)});
    if (cp) x = tape.apply1(std::make_shared<CpTakeRowsNode>(cp->layouts.at(cp->rank), b.total_tokens()), {x});
    x = sp ? reduce_scatter_to_sp(tape, *tp, x) : reduce_from_tp(tape, *tp, x);
  }

  auto attn = std::make_shared<const AttentionInputs>(AttentionInputs::from_batch(b, c.heads / n, c.head_dim()));
  if (cp) attn = cp_attention_inputs(*attn, *cp, opts_.parallel->cp(), opts_.cp.comm);
  for (int i = span.begin; i < end; ++i) {
    const std::string p = layer_prefix(i);
    auto layer = [w, p, eps, attn, tp, sp, fp8, i](Tape& tt, const std::vector<Var>& in) -> std::vector<Var> {
      const auto enter = [&](const Var& v) {
        return sp ? gather_from_sp(tt, *tp, v, GatherGrad::kReduceScatter) : copy_to_tp(tt, *tp, v);
      };
      const auto leave = [&](const Var& v) { return sp ? reduce_scatter_to_sp(tt, *tp, v) : reduce_from_tp(tt, *tp, v); };
      const auto ln = [&](const Var& v, const std::string& name) {
        return tt.apply1(std::make_shared<LayerNormNode>(eps), {v, w(name + ".weight"), w(name + ".bias")});
      };
      const auto linear = [&](const Var& v, const std::string& name, bool bias, Fp8Gemm gemm) {
        std::vector<Var> ins{v, w(name + ".weight")};
        if (bias) ins.push_back(w(name + ".bias"));
        return tt.apply1(make_linear_node(fp8, i, gemm), ins);
      };
      const auto bias_residual = [&](const Var& v, const std::string& bias, const Var& residual) {
        return tt.apply1(std::make_shared<BiasResidualNode>(), {v, w(bias), residual});
      };
      Var qkv = linear(enter(ln(in[0], p + "attention.LayerNorm")), p + "attention.self.qkv", true, Fp8Gemm::kQkv);
      Var a = tt.apply1(std::make_shared<AttentionNode>(attn), {qkv});
      Var h = bias_residual(leave(linear(a, p + "attention.output.dense", false, Fp8Gemm::kOutProj)), p + "attention.output.dense.bias",
                            in[0]);
      Var f1 = linear(enter(ln(h, p + "LayerNorm")), p + "intermediate.dense", true, Fp8Gemm::kFc1);
      Var f2 = linear(tt.apply1(std::make_shared<GeluNode>(), {f1}), p + "output.dense", false, Fp8Gemm::kFc2);
      return {bias_residual(leave(f2), p + "output.dense.bias", h)};
    };
    if (opts_.layer_hooks) x = opts_.layer_hooks->enter_layer(tape, i, x);
    x = tape.segment("layer" + std::to_string(i), layer, {x})[0];
    if (opts_.layer_hooks) x = opts_.layer_hooks->leave_layer(tape, i, x);
  }
  if (end < c.layers) return x;
  x = tape.apply1(std::make_shared<LayerNormNode>(eps), {x, w(kFinalLnW), w(kFinalLnB)});
  if (sp) x = gather_from_sp(tape, *tp, x, GatherGrad::kSplit);
  // LM head: dense / GELU / LayerNorm replicated on the full T, then the vocabulary-parallel decoder
  // (logits of this rank's real vocabulary columns only).
  x = tape.apply1(std::make_shared<LinearNode>(),
                  {x, w("lm_head.dense.weight"), w("lm_head.dense.bias")});
  x = tape.apply1(std::make_shared<GeluNode>(), {x});
  x = tape.apply1(std::make_shared<LayerNormNode>(eps),
                  {x, w("lm_head.layer_norm.weight"), w("lm_head.layer_norm.bias")});
  x = copy_to_tp(tape, *tp, x);
  const int64_t rows = rows_per_rank(c.vocab, n), start = tp_rank() * rows;
  const int64_t valid = std::clamp<int64_t>(c.vocab - start, 0, rows);
  Var logits =
      tape.apply1(std::make_shared<LmDecoderNode>(valid), {x, w(kEmbedding), w("lm_head.bias")});
  if (b.total_tokens() != t) logits = tape.apply1(std::make_shared<TakeRowsNode>(t), {logits});
  return logits;
}

}  // namespace helix
