#include "layers/zero_sync.h"

#include <algorithm>
#include <functional>

#include "kernels/axpy/axpy.h"

namespace helix {

namespace {

constexpr const char* kLayerPrefix = "esm.encoder.layer.";

// Identity on the activation whose backward runs a callback first: placed right after a layer
// (its backward runs before the layer's) and right before it (its backward runs after).
class ZeroMarkNode final : public Node {
 public:
  ZeroMarkNode(std::string name, std::function<void(const Stream&)> on_backward)
      : name_(std::move(name)), on_backward_(std::move(on_backward)) {}
  std::string name() const override { return name_; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream&) override { return {in[0]}; }
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream& stream) override {
    on_backward_(stream);
    if (gin[0].defined() && gout[0].defined()) axpy(1.0f, gout[0], gin[0], stream);
  }

 private:
  std::string name_;
  std::function<void(const Stream&)> on_backward_;
};

Stream default_stream(Device d) { return d.is_cuda() ? Stream::cuda_default(d.index) : Stream(); }

}  // namespace

std::vector<int> esm2_zero_layers(const Esm2Model& model) {
  std::vector<int> out;
  const auto& ranges = model.options().layer_ranges;
  for (int i = 0; i < model.config().layers; ++i)
    if (ranges.empty() || std::any_of(ranges.begin(), ranges.end(), [i](const auto& r) { return i >= r.first && i < r.second; }))
      out.push_back(i);
  return out;
}

std::vector<std::vector<size_t>> esm2_zero_units(const Esm2Model& model) {
  const int layers = model.config().layers;
  const std::vector<int> held = esm2_zero_layers(model);
  std::vector<int> unit_of(static_cast<size_t>(layers), -1);  // layer -> unit (pipeline: held layers only)
  for (size_t k = 0; k < held.size(); ++k) unit_of[static_cast<size_t>(held[k])] = static_cast<int>(k) + 1;
  std::vector<std::vector<size_t>> units(held.size() + 1);
  const auto& all = model.params().all();
  for (size_t i = 0; i < all.size(); ++i) {
    const std::string& n = all[i].name;
    size_t u = 0;
    if (n.starts_with(kLayerPrefix)) {
      const size_t dot = n.find('.', std::string(kLayerPrefix).size());
      const int layer = std::stoi(n.substr(std::string(kLayerPrefix).size(), dot));
      HELIX_CHECK(layer >= 0 && layer < layers && unit_of[static_cast<size_t>(layer)] > 0,
                  "zero units: parameter '{}' of a layer this model does not hold", n);
      u = static_cast<size_t>(unit_of[static_cast<size_t>(layer)]);
    }
    units[u].push_back(i);
  }
  return units;
}

std::vector<std::vector<int64_t>> esm2_zero_unit_numels(const ModelConfig& config, int tp) {
  HELIX_CHECK(tp >= 1 && config.heads % tp == 0 && config.ffn % tp == 0,
              "--tp {}: expected heads ({}) and FFN size ({}) divisible by tp", tp, config.heads, config.ffn);
  const int64_t h = config.hidden, f = config.ffn, vr = (config.vocab + tp - 1) / tp;
  std::vector<std::vector<int64_t>> units;
  // Parameter order of Esm2Model: embedding, the layers, final LayerNorm, LM head.
  units.push_back({vr * h, h, h, h * h, h, h, h, vr});
  const std::vector<int64_t> layer{h, h, 3 * h / tp * h, 3 * h / tp, h * (h / tp), h, h, h, f / tp * h, f / tp,
                                   h * (f / tp), h};
  for (int i = 0; i < config.layers; ++i) units.push_back(layer);
  return units;
}

std::vector<std::vector<int64_t>> esm2_zero_unit_numels(const ModelConfig& config, int tp,
                                                       const std::vector<std::pair<int, int>>& layer_ranges) {
  std::vector<std::vector<int64_t>> all = esm2_zero_unit_numels(config, tp);
  if (layer_ranges.empty()) return all;
  const bool first = layer_ranges.front().first == 0, last = layer_ranges.back().second == config.layers;
  std::vector<std::vector<int64_t>> units(1);
  // Unit 0: the embedding on the first and the last stage, final LayerNorm and LM head on the last.
  if (first || last) units[0].push_back(all[0][0]);
  if (last) units[0].insert(units[0].end(), all[0].begin() + 1, all[0].end());
  for (const auto& [lo, hi] : layer_ranges)
    for (int i = lo; i < hi; ++i) units.push_back(all[static_cast<size_t>(i) + 1]);
  return units;
}

ZeroSync::ZeroSync(Esm2Model& model, const ParallelContext& ctx, ZeroOptions options)
    : esm2_(model), params_(model.params()), ctx_(&ctx), comm_(options.shard_comm ? options.shard_comm : &ctx.dp()),
      opts_(options) {
  HELIX_CHECK(opts_.stage >= 1 && opts_.stage <= 3, "--zero: expected 1, 2 or 3 to shard, got {}", opts_.stage);
  rank_ = comm_->rank();
  const int dp = comm_->size();
  device_ = model.options().device;
  compute_ = model.options().compute;
  unit_params_ = esm2_zero_units(model);
  const std::vector<int> held = esm2_zero_layers(model);
  layer_unit_.assign(static_cast<size_t>(model.config().layers), 0);
  for (size_t k = 0; k < held.size(); ++k) layer_unit_[static_cast<size_t>(held[k])] = k + 1;
  layout_.stage = opts_.stage;
  layout_.dp = dp;
  layout_.rank = rank_;
  for (size_t u = 0; u < unit_params_.size(); ++u) {
    std::vector<int64_t> numels;
    std::vector<std::string> names;
    for (size_t i : unit_params_[u]) {
      const Parameter& p = params_.all()[i];
      HELIX_CHECK(p.master.defined(), "ZeroSync: parameter '{}' has no master (sharded twice?)", p.name);
      numels.push_back(p.master.numel());
      names.push_back(p.name);
    }
    layout_.units.push_back(make_zero_unit_layout(u == 0 ? "outer" : "layer" + std::to_string(held[u - 1]), numels, dp));
    layout_.unit_tensor_names.push_back(std::move(names));
    layout_.global_offsets.push_back(layout_.global_numel);
    layout_.global_numel += layout_.units.back().numel;
  }
  const Stream stream = default_stream(device_);
  const size_t n = num_units();
  master_.resize(n);
  exp_avg_.resize(n);
  exp_avg_sq_.resize(n);
  model_.resize(n);
  full_grad_.resize(n);
  grad_shard_.resize(n);
  for (size_t u = 0; u < n; ++u) {
    const ZeroUnitLayout& l = layout_.units[u];
    const int64_t lo = rank_ * l.shard_numel, hi = lo + l.shard_numel;
    Tensor full = Tensor::zeros({l.numel}, DType::kF32, device_, stream);
    for (size_t k = 0; k < unit_params_[u].size(); ++k) {
      Tensor dst = view_of(full, u, k);
      dst.copy_from(params_.all()[unit_params_[u][k]].master, stream);
    }
    master_[u] = full.slice(lo, hi).clone(stream);
    exp_avg_[u] = Tensor::zeros({l.shard_numel}, DType::kF32, device_, stream);
    exp_avg_sq_[u] = Tensor::zeros({l.shard_numel}, DType::kF32, device_, stream);
    if (opts_.stage < 3) {
      model_[u] = compute_ == DType::kF32 ? full : full.to(compute_, stream);
    } else {
      model_[u] = compute_ == DType::kF32 ? master_[u] : master_[u].to(compute_, stream);
    }
    if (opts_.stage == 1) {
      full_grad_[u] = Tensor::zeros({l.numel}, DType::kF32, device_, stream);
      grad_shard_[u] = full_grad_[u].slice(lo, hi);
    } else {
      grad_shard_[u] = Tensor::zeros({l.shard_numel}, DType::kF32, device_, stream);
    }
    for (size_t k = 0; k < unit_params_[u].size(); ++k) {
      Parameter& p = params_.all()[unit_params_[u][k]];
      p.master = Tensor();
      p.var.data() = opts_.stage < 3 ? view_of(model_[u], u, k) : Tensor();
      p.var.cell()->grad = Tensor();
    }
  }
  reduced_.assign(n, false);
  if (opts_.stage == 3) {
    gatherer_ = std::make_unique<ZeroGatherer>(*comm_, device_, n);
    esm2_.set_layer_hooks(this);
  }
  stream.synchronize();
}

ZeroSync::~ZeroSync() {
  if (opts_.stage == 3 && esm2_.options().layer_hooks == this) esm2_.set_layer_hooks(nullptr);
}

Tensor ZeroSync::view_of(const Tensor& flat, size_t u, size_t k) const {
  const ZeroUnitLayout& l = layout_.units[u];
  const Shape& shape = params_.all()[unit_params_[u][k]].var.cell()->shape;
  return flat.slice(l.offsets[k], l.offsets[k] + l.numels[k]).view(shape);
}

Tensor ZeroSync::model_shard(size_t u) const {
  if (opts_.stage == 3) return model_[u];
  const int64_t s = layout_.units[u].shard_numel;
  return model_[u].slice(rank_ * s, (rank_ + 1) * s);
}

// ---- Gradients -----------------------------------------------------------------------------------
void ZeroSync::ensure_full_grad(size_t u, const Stream& stream) {
  if (!full_grad_[u].defined())
    full_grad_[u] = Tensor::zeros({layout_.units[u].numel}, DType::kF32, device_, stream);
  for (size_t k = 0; k < unit_params_[u].size(); ++k) {
    Tensor view = view_of(full_grad_[u], u, k);
    Tensor& g = params_.all()[unit_params_[u][k]].var.cell()->grad;
    if (g.defined() && g.data_ptr() != view.data_ptr()) axpy(1.0f, g, view, stream);  // made elsewhere
    g = view;
  }
}

void ZeroSync::zero_grads(const Stream& stream) {
  for (size_t u = 0; u < num_units(); ++u) {
    reduced_[u] = false;
    if (opts_.stage == 1) {
      full_grad_[u].zero(stream);
      ensure_full_grad(u, stream);
    } else if (opts_.stage == 2 || u == 0) {  // stage 3: a layer's buffer appears at its backward
      full_grad_[u] = Tensor();
      for (size_t i : unit_params_[u]) params_.all()[i].var.cell()->grad = Tensor();
      ensure_full_grad(u, stream);
    } else {
      full_grad_[u] = Tensor();
      for (size_t i : unit_params_[u]) params_.all()[i].var.cell()->grad = Tensor();
    }
  }
  last_micro_batch_ = true;
}

void ZeroSync::reduce_unit(size_t u, const Stream& stream) {
  if (reduced_[u]) return;
  ensure_full_grad(u, stream);
  if (gatherer_) gatherer_->order_after_in_flight(stream);  // a prefetch of the same group
  // Sequence parallelism: partial sums over tp first (as GradSync does).
  if (ctx_->sizes().tp > 1)
    for (size_t k = 0; k < unit_params_[u].size(); ++k)
      if (params_.all()[unit_params_[u][k]].grad_partial)
        ctx_->tp().all_reduce(view_of(full_grad_[u], u, k), ReduceOp::kSum, stream);
  if (opts_.stage == 1) {
    comm_->all_reduce(full_grad_[u], ReduceOp::kSum, stream);
  } else {
    comm_->reduce_scatter(full_grad_[u], grad_shard_[u], ReduceOp::kSum, stream);
    full_grad_[u] = Tensor();
    for (size_t i : unit_params_[u]) params_.all()[i].var.cell()->grad = Tensor();
  }
  reduced_[u] = true;
}

void ZeroSync::reduce(const Stream& stream) {
  for (size_t u = num_units(); u-- > 0;) reduce_unit(u, stream);
  if (opts_.stage == 3) {
    release_unit(0);
    // A prefetch nobody consumed (a pipeline stage's last forward) would hand out the weights of
    // before the optimizer step: finish and drop it.
    for (size_t u = 0; u < num_units(); ++u)
      if (gatherer_->in_flight(u)) gatherer_->wait(u, model_[u], stream);
  }
}

void ZeroSync::sum_over_dp(const Tensor& t, const Stream& stream) const {
  if (comm_->size() > 1) comm_->all_reduce(t, ReduceOp::kSum, stream);
}

// ---- Stage 3: parameters gathered around each layer -----------------------------------------------
// Whether layer + dir is held in the same chunk as `layer` (its unit is the neighbouring one): the
// only layer worth prefetching next; a pipeline chunk's neighbour runs at another time of the step.
bool ZeroSync::next_in_range(int layer, int dir) const {
  const int next = layer + dir;
  if (next < 0 || next >= static_cast<int>(layer_unit_.size())) return false;
  const size_t u = layer_unit_[static_cast<size_t>(layer)], v = layer_unit_[static_cast<size_t>(next)];
  return v != 0 && v == u + static_cast<size_t>(dir);
}

void ZeroSync::gather_unit(size_t u, const Stream& stream) {
  const Tensor full = gatherer_->wait(u, model_[u], stream);
  for (size_t k = 0; k < unit_params_[u].size(); ++k) params_.all()[unit_params_[u][k]].var.data() = view_of(full, u, k);
}

void ZeroSync::release_unit(size_t u) {
  for (size_t i : unit_params_[u]) params_.all()[i].var.data() = Tensor();
}

void ZeroSync::begin_forward(Tape& tape) {
  if (opts_.stage != 3) return;
  // Embedding and LM head: gathered once (the first forward of the step; a pipeline runs one forward
  // per micro-batch and chunk) and held until reduce(). A middle pipeline stage holds neither.
  const bool gathered = unit_params_[0].empty() || params_.all()[unit_params_[0][0]].var.data().defined();
  if (!gathered) gather_unit(0, tape.stream());
  // Without a pipeline every forward starts at layer 0 (unit 1); a stage's chunks start elsewhere.
  if (opts_.prefetch && num_units() > 1 && esm2_.options().layer_ranges.empty())
    gatherer_->start(1, model_[1], tape.stream());
}

Var ZeroSync::enter_layer(Tape& tape, int layer, const Var& x) {
  if (opts_.stage != 3) return x;
  const size_t u = layer_unit_.at(static_cast<size_t>(layer));
  gather_unit(u, tape.stream());
  if (opts_.prefetch && next_in_range(layer, +1)) gatherer_->start(u + 1, model_[u + 1], tape.stream());
  // Backward: the layer's backward is done; free its weights, reduce-scatter its gradient.
  return tape.apply1(std::make_shared<ZeroMarkNode>("zero_enter", [this, u](const Stream& s) {
                       if (opts_.regather_in_backward) release_unit(u);
                       if (last_micro_batch_) reduce_unit(u, s);
                     }),
                     {x});
}

Var ZeroSync::leave_layer(Tape& tape, int layer, const Var& x) {
  if (opts_.stage != 3) return x;
  const size_t u = layer_unit_.at(static_cast<size_t>(layer));
  release_unit(u);
  // Backward, before the layer's: its gradient buffer, and its weights again (recompute reads them).
  return tape.apply1(std::make_shared<ZeroMarkNode>("zero_leave", [this, u, layer](const Stream& s) {
                       ensure_full_grad(u, s);
                       if (!opts_.regather_in_backward) return;
                       gather_unit(u, s);
                       if (opts_.prefetch && next_in_range(layer, -1)) gatherer_->start(u - 1, model_[u - 1], s);
                     }),
                     {x});
}

// ---- After the optimizer, views for tests and export, memory -------------------------------------
void ZeroSync::after_step(const Stream& stream) {
  if (opts_.stage == 3) return;  // AdamW wrote the model shard (or it is the master)
  for (size_t u = 0; u < num_units(); ++u) {
    Tensor mine = model_shard(u);
    if (compute_ == DType::kF32) mine.copy_from(master_[u], stream);
    comm_->all_gather(mine, model_[u], stream);
  }
}

void ZeroSync::refresh_model_copies(const Stream& stream) {
  for (size_t u = 0; u < num_units(); ++u) {
    Tensor mine = model_shard(u);
    if (!mine.shares_storage(master_[u]))
      mine.copy_from(mine.dtype() == DType::kF32 ? master_[u] : master_[u].to(mine.dtype(), stream), stream);
    if (opts_.stage < 3) comm_->all_gather(mine, model_[u], stream);
  }
}

Tensor ZeroSync::gather_flat(const Tensor& shard) const {
  const Stream stream = default_stream(device_);
  Tensor full = Tensor::empty({shard.numel() * comm_->size()}, shard.dtype(), device_, stream);
  comm_->all_gather(shard, full, stream);
  return full.to(Device::cpu(), stream).to(DType::kF32);
}

namespace {
std::pair<size_t, size_t> find_param(const std::vector<std::vector<size_t>>& units, size_t i) {
  for (size_t u = 0; u < units.size(); ++u)
    for (size_t k = 0; k < units[u].size(); ++k)
      if (units[u][k] == i) return {u, k};
  HELIX_FAIL("ZeroSync: no parameter {}", i);
}
}  // namespace

Tensor ZeroSync::local_master(size_t i) const {
  const auto [u, k] = find_param(unit_params_, i);
  return view_of(gather_flat(master_[u]), u, k).clone();
}

Tensor ZeroSync::local_grad(size_t i) const {
  const auto [u, k] = find_param(unit_params_, i);
  if (opts_.stage == 1) return view_of(full_grad_[u], u, k).to(Device::cpu()).clone();
  return view_of(gather_flat(grad_shard_[u]), u, k).clone();
}

void ZeroSync::materialize_masters() {
  // On the CPU: export reads them there, and the device keeps no second full copy of the model.
  for (size_t i = 0; i < params_.all().size(); ++i) params_.all()[i].master = local_master(i);
}

ZeroMemory ZeroSync::memory() const {
  ZeroMemory m;
  for (size_t u = 0; u < num_units(); ++u) {
    m.params += static_cast<int64_t>(model_[u].nbytes());
    const bool shared = model_[u].shares_storage(master_[u]);
    m.optimizer += static_cast<int64_t>((shared ? 0 : master_[u].nbytes()) + exp_avg_[u].nbytes() +
                                        exp_avg_sq_[u].nbytes());
    if (full_grad_[u].defined()) m.grads += static_cast<int64_t>(full_grad_[u].nbytes());
    if (opts_.stage > 1) m.grads += static_cast<int64_t>(grad_shard_[u].nbytes());
  }
  return m;
}

ZeroMemory ZeroSync::formula() const {
  ZeroMemoryParams p;
  p.stage = opts_.stage;
  p.dp = comm_->size();
  p.compute_bytes = dtype_size(compute_);
  for (const ZeroUnitLayout& u : layout_.units) p.unit_numels.push_back(u.numels);
  return zero_memory_bytes(p);
}

ZeroMemory unsharded_memory(const ParameterSet& params, AdamW& opt) {
  ZeroMemory m;
  for (const Parameter& p : params.all()) {
    m.params += static_cast<int64_t>(p.var.data().nbytes());
    if (p.grad().defined()) m.grads += static_cast<int64_t>(p.grad().nbytes());
    if (!p.shares_master()) m.optimizer += static_cast<int64_t>(p.master.nbytes());
  }
  for (const auto& [a, b] : opt.moments()) m.optimizer += static_cast<int64_t>(a.nbytes() + b.nbytes());
  return m;
}

}  // namespace helix
