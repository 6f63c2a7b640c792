#include "core/autograd.h"

#include <cmath>

namespace helix {

// ---- Var / Node --------------------------------------------------------------------------------
Var Var::leaf(Tensor data, bool requires_grad, std::string name) {
  const DType gd = data.dtype();
  return leaf(std::move(data), requires_grad, gd, std::move(name));
}

Var Var::leaf(Tensor data, bool requires_grad, DType grad_dtype, std::string name) {
  Var v;
  v.cell_ = std::make_shared<GradCell>();
  v.cell_->shape = data.shape();
  v.cell_->device = data.device();
  v.cell_->grad_dtype = grad_dtype;
  v.cell_->requires_grad = requires_grad;
  v.cell_->name = std::move(name);
  v.data_ = std::move(data);
  return v;
}

bool Node::any_input_needs_grad() const {
  for (bool b : needs_grad_)
    if (b) return true;
  return false;
}

int Node::save(const Tensor& t) {
  saved_.push_back(t);
  return static_cast<int>(saved_.size()) - 1;
}

const Tensor& Node::saved(int slot) const {
  HELIX_CHECK(slot >= 0 && slot < static_cast<int>(saved_.size()),
              "node {}: saved tensor {} requested, but {} are held (released already?)", name(), slot,
              saved_.size());
  return saved_[static_cast<size_t>(slot)];
}

size_t Node::saved_bytes() const {
  size_t b = 0;
  for (const Tensor& t : saved_) b += t.defined() ? t.nbytes() : 0;
  return b;
}

bool all_finite(const Tensor& t) {
  if (!dtype_is_float(t.dtype())) return true;
  const Tensor h = t.is_cpu() ? t : t.to(Device::cpu());
  for (int64_t i = 0; i < h.numel(); ++i)
    if (!std::isfinite(cpu_value(h, i))) return false;
  return true;
}

// ---- Tape --------------------------------------------------------------------------------------
void Tape::check_finite(const Tensor& t, const std::string& node, const char* what, size_t index) const {
  if (t.defined() && !all_finite(t))
    HELIX_FAIL("non-finite value: {} {} of node '{}' ({}) contains inf or NaN", what, index, node, t.str());
}

std::vector<Var> Tape::apply(std::shared_ptr<Node> node, const std::vector<Var>& inputs) {
  std::vector<Tensor> in(inputs.size());
  node->needs_grad_.assign(inputs.size(), false);
  bool any = false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    HELIX_CHECK(inputs[i].defined(), "node {}: input {} is undefined", node->name(), i);
    in[i] = inputs[i].data();
    node->needs_grad_[i] = opts_.record && inputs[i].requires_grad();
    any = any || inputs[i].requires_grad();
  }
  if (capture_) {
    for (const Var& v : inputs) {
      const GradCell* c = v.cell().get();
      if (v.requires_grad() && !capture_->inside.count(c) && capture_->seen.insert(c).second)
        capture_->cells.push_back(v.cell());
    }
  }
  std::vector<Tensor> out = node->forward(in, opts_.stream);
  std::vector<Var> vars(out.size());
  for (size_t i = 0; i < out.size(); ++i) {
    if (opts_.check_finite) check_finite(out[i], node->name(), "output", i);
    vars[i] = Var::leaf(std::move(out[i]), any, "");
    vars[i].cell_->name = node->name();
    if (capture_) capture_->inside.insert(vars[i].cell().get());
  }
  if (!opts_.record || !any) {
    node->release_saved();
    return vars;
  }
  Record r{std::move(node), {}, {}, {}};
  for (const Var& v : inputs) r.inputs.push_back(v.cell());
  for (const Var& v : vars) r.outputs.push_back(v.cell());
  records_.push_back(std::move(r));
  return vars;
}

void Tape::backward(const Var& root, Tensor seed) {
  if (!seed.defined()) {
    HELIX_CHECK(root.data().numel() == 1, "backward: a non-scalar root {} needs an explicit seed", root.data().str());
    seed = Tensor::empty(root.data().shape(), root.cell()->grad_dtype, root.data().device(), opts_.stream);
    seed.fill(1.0, opts_.stream);
  }
  backward(std::vector<Var>{root}, std::vector<Tensor>{seed});
}

void Tape::backward(const std::vector<Var>& roots, const std::vector<Tensor>& seeds) {
  HELIX_CHECK(roots.size() == seeds.size(), "backward: {} roots but {} seeds", roots.size(), seeds.size());
  for (size_t i = 0; i < roots.size(); ++i) {
    GradCell& c = *roots[i].cell();
    HELIX_CHECK(seeds[i].shape() == c.shape, "backward: seed {} does not match root {}", seeds[i].str(), c.shape.str());
    if (c.requires_grad) c.grad = seeds[i];
  }
  // Gradient-ready hook: for every leaf cell, the last record in backward order (the smallest
  // forward index) that accumulates into it. Cells some record produces are not leaves.
  std::unordered_map<const GradCell*, size_t> last_use;
  std::vector<std::vector<std::shared_ptr<GradCell>>> ready_after;
  if (opts_.on_grad_ready) {
    std::unordered_set<const GradCell*> produced;
    for (const Record& r : records_)
      for (const auto& c : r.outputs) produced.insert(c.get());
    ready_after.resize(records_.size());
    for (size_t k = 0; k < records_.size(); ++k) {
      const Record& r = records_[k];
      auto note = [&](const std::shared_ptr<GradCell>& c) {
        if (!c->requires_grad || produced.count(c.get())) return;
        auto [it, fresh] = last_use.emplace(c.get(), k);
        if (fresh) ready_after[k].push_back(c);  // first in forward order = last in backward order
      };
      for (size_t i = 0; i < r.inputs.size(); ++i)
        if (r.node->needs_input_grad(i)) note(r.inputs[i]);
      for (const auto& c : r.captured) note(c);
    }
  }
  for (auto it = records_.rbegin(); it != records_.rend(); ++it) {
    Node& node = *it->node;
    std::vector<Tensor> gout(it->outputs.size());
    bool any = false;
    for (size_t i = 0; i < gout.size(); ++i) {
      gout[i] = it->outputs[i]->grad;
      any = any || gout[i].defined();
    }
    if (any) {
      std::vector<Tensor> gin(it->inputs.size());
      for (size_t i = 0; i < gin.size(); ++i) {
        if (!node.needs_input_grad(i)) continue;
        GradCell& c = *it->inputs[i];
        if (!c.grad.defined()) c.grad = Tensor::zeros(c.shape, c.grad_dtype, c.device, opts_.stream);
        gin[i] = c.grad;
      }
      node.backward(gout, gin, opts_.stream);
      if (opts_.check_finite)
        for (size_t i = 0; i < gin.size(); ++i) check_finite(gin[i], node.name(), "input gradient", i);
    }
    node.release_saved();
    // The outputs' gradients were consumed: free them (they are never leaves).
    for (auto& c : it->outputs) c->grad = Tensor();
    if (opts_.on_grad_ready) {
      const size_t k = static_cast<size_t>(records_.rend() - it) - 1;
      for (const auto& c : ready_after[k]) opts_.on_grad_ready(c);
    }
  }
  records_.clear();
}

size_t Tape::saved_bytes() const {
  size_t b = 0;
  for (const Record& r : records_) b += r.node->saved_bytes();
  return b;
}

// ---- Recompute segments ------------------------------------------------------------------------
namespace {

// Keeps only the segment's inputs; re-runs the segment on a recording tape during backward and
// back-propagates through it, accumulating straight into the outer gradients (same order of +=
// as without recompute, so gradients are bitwise identical).
class SegmentNode final : public Node {
 public:
  SegmentNode(std::string name, Tape::SegmentFn fn, TapeOptions inner, std::vector<DType> grad_dtypes)
      : name_(std::move(name)), fn_(std::move(fn)), inner_(std::move(inner)), grad_dtypes_(std::move(grad_dtypes)) {}
  std::string name() const override { return name_; }

  std::vector<Tensor> forward(const std::vector<Tensor>&, const Stream&) override {
    HELIX_FAIL("segment '{}' runs through Tape::segment", name_);
  }
  void keep_inputs(const std::vector<Tensor>& inputs) {
    for (const Tensor& t : inputs) save(t);
  }

  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin, const Stream&) override {
    std::vector<Var> leaves(gin.size());
    for (size_t i = 0; i < gin.size(); ++i) {
      leaves[i] = Var::leaf(saved(static_cast<int>(i)), gin[i].defined(), grad_dtypes_[i], "");
      if (gin[i].defined()) leaves[i].cell()->grad = gin[i];  // alias: accumulate in place
    }
    TapeOptions o = inner_;
    o.recompute = RecomputePolicy::kNone;
    o.record = true;
    o.on_grad_ready = nullptr;  // the outer tape fires for the segment's inputs and captured cells
    Tape tape(o);
    std::vector<Var> outs = fn_(tape, leaves);
    HELIX_CHECK(outs.size() == gout.size(), "segment '{}' returned {} outputs on recompute, {} before",
                name_, outs.size(), gout.size());
    std::vector<Var> roots;
    std::vector<Tensor> seeds;
    for (size_t i = 0; i < outs.size(); ++i) {
      if (!gout[i].defined() || !outs[i].requires_grad()) continue;
      roots.push_back(outs[i]);
      seeds.push_back(gout[i].clone(o.stream));
    }
    tape.backward(roots, seeds);
  }

 private:
  std::string name_;
  Tape::SegmentFn fn_;
  TapeOptions inner_;
  std::vector<DType> grad_dtypes_;
};

}  // namespace

std::vector<Var> Tape::segment(const std::string& name, const SegmentFn& fn, const std::vector<Var>& inputs) {
  if (opts_.recompute == RecomputePolicy::kNone || !opts_.record) return fn(*this, inputs);

  // Forward without recording: inner saved tensors are dropped as soon as each node ran.
  TapeOptions quiet = opts_;
  quiet.record = false;
  quiet.on_grad_ready = nullptr;
  Tape inner(quiet);
  Capture capture;
  inner.capture_ = &capture;
  std::vector<Var> leaves(inputs.size());
  std::vector<DType> grad_dtypes(inputs.size());
  std::vector<Tensor> in(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    leaves[i] = Var::leaf(inputs[i].data(), inputs[i].requires_grad(), inputs[i].cell()->grad_dtype, "");
    grad_dtypes[i] = inputs[i].cell()->grad_dtype;
    in[i] = inputs[i].data();
    capture.inside.insert(leaves[i].cell().get());
  }
  std::vector<Var> outs = fn(inner, leaves);
  bool any = false;
  for (const Var& o : outs) any = any || o.requires_grad();

  std::vector<Var> result(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    result[i] = Var::leaf(outs[i].data(), any, outs[i].cell()->grad_dtype, name);
  }
  if (!any) return result;

  auto node = std::make_shared<SegmentNode>(name, fn, opts_, grad_dtypes);
  node->keep_inputs(in);
  node->needs_grad_.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) node->needs_grad_[i] = inputs[i].requires_grad();
  Record r{node, {}, {}, std::move(capture.cells)};
  for (const Var& v : inputs) r.inputs.push_back(v.cell());
  for (const Var& v : result) r.outputs.push_back(v.cell());
  records_.push_back(std::move(r));
  return result;
}

}  // namespace helix
