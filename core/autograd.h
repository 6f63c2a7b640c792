#pragma once
// The autograd graph of fused layers. A Node is one fused op with an explicit forward and backward
// (no scalar autograd). A Tape records nodes in forward order and backward() walks them in reverse.
//
// Node contract (tests/core/test_autograd.cpp checks each point):
//  * backward writes one gradient per input and ACCUMULATES (+=) into it; inputs whose
//    needs_input_grad(i) is false get an undefined tensor and are skipped;
//  * tensors backward reads are declared in forward with save() and released by the tape right
//    after the node's backward ran (or at once when nothing needs a gradient);
//  * a node never decides about recompute: Tape::segment() applies the executor's RecomputePolicy.
//
// Data and gradient routing are separate: a Var is a value (its tensor plus a shared GradCell); the
// tape keeps only GradCells, so an activation's memory is freed as soon as neither the model code
// nor a node's saved tensors hold it.
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "core/tensor.h"

namespace helix {

struct GradCell {
  Tensor grad;  // allocated zeroed on first accumulation; a parameter's persists across micro-batches
  Shape shape;
  DType grad_dtype = DType::kF32;
  Device device;
  bool requires_grad = false;
  std::string name;
};

class Var {
 public:
  Var() = default;
  // A leaf: an input or a parameter. grad_dtype defaults to the data's dtype (parameters: f32).
  static Var leaf(Tensor data, bool requires_grad, std::string name = "");
  static Var leaf(Tensor data, bool requires_grad, DType grad_dtype, std::string name = "");

  bool defined() const { return cell_ != nullptr; }
  const Tensor& data() const { return data_; }
  Tensor& data() { return data_; }
  const Tensor& grad() const { return cell_->grad; }
  bool requires_grad() const { return cell_ && cell_->requires_grad; }
  const std::string& name() const { return cell_->name; }
  const std::shared_ptr<GradCell>& cell() const { return cell_; }
  // Drops the accumulated gradient (e.g. after the optimizer step).
  void zero_grad() const { cell_->grad = Tensor(); }

 private:
  friend class Tape;
  Tensor data_;
  std::shared_ptr<GradCell> cell_;
};

class Node {
 public:
  virtual ~Node() = default;
  virtual std::string name() const = 0;
  // Computes the outputs; calls save() for every tensor backward will read.
  virtual std::vector<Tensor> forward(const std::vector<Tensor>& inputs, const Stream& stream) = 0;
  // grad_outputs[i] is undefined when no gradient reached output i (treat it as zero).
  // grad_inputs[i] is undefined when input i needs no gradient; otherwise accumulate into it.
  virtual void backward(const std::vector<Tensor>& grad_outputs, std::vector<Tensor>& grad_inputs,
                        const Stream& stream) = 0;

  bool needs_input_grad(size_t i) const { return i < needs_grad_.size() && needs_grad_[i]; }
  bool any_input_needs_grad() const;
  // Bytes currently held in saved tensors.
  size_t saved_bytes() const;
  void release_saved() { saved_.clear(); }

 protected:
  // Declares a tensor that backward reads; returns its slot for saved().
  int save(const Tensor& t);
  const Tensor& saved(int slot) const;

 private:
  friend class Tape;
  std::vector<Tensor> saved_;
  std::vector<bool> needs_grad_;
};

enum class RecomputePolicy {
  kNone,  // every node keeps its saved tensors until backward
  kFull,  // a segment keeps only its inputs and re-runs its forward during backward
};

struct TapeOptions {
  Stream stream;
  RecomputePolicy recompute = RecomputePolicy::kNone;
  // Stop at the first node whose output (forward) or input gradient (backward) is not finite and
  // name it. Costs a device-to-host copy per tensor: a debugging aid.
  bool check_finite = false;
  // false: run forwards without recording (evaluation); saved tensors are dropped immediately.
  bool record = true;
  // Called during backward once per leaf cell (a cell no recorded node produces) that requires a
  // gradient, right after the backward of the last record (in backward order) that accumulates
  // into it: its gradient is final for this backward (work for it is enqueued on `stream`). Leaves
  // used inside a recompute segment (its inputs, and parameters its function captures) count as
  // inputs of the segment: the hook fires after the segment's whole backward. Cells that no record
  // reaches never fire. Empty: off. (The data-parallel gradient reducer's overlap hook.)
  std::function<void(const std::shared_ptr<GradCell>&)> on_grad_ready;
};

class Tape {
 public:
  explicit Tape(TapeOptions options = {}) : opts_(std::move(options)) {}

  // Runs node->forward on the inputs' data and records the node when any input requires a gradient.
  std::vector<Var> apply(std::shared_ptr<Node> node, const std::vector<Var>& inputs);
  Var apply1(std::shared_ptr<Node> node, const std::vector<Var>& inputs) { return apply(std::move(node), inputs).at(0); }

  // A segment (e.g. one transformer layer) run under the tape's recompute policy.
  using SegmentFn = std::function<std::vector<Var>(Tape&, const std::vector<Var>&)>;
  std::vector<Var> segment(const std::string& name, const SegmentFn& fn, const std::vector<Var>& inputs);

  // Backward from `roots`, seeded with `seeds` (default: ones for a single scalar root).
  void backward(const Var& root, Tensor seed = {});
  void backward(const std::vector<Var>& roots, const std::vector<Tensor>& seeds);

  const TapeOptions& options() const { return opts_; }
  const Stream& stream() const { return opts_.stream; }
  size_t num_recorded() const { return records_.size(); }
  // Bytes held in saved tensors by all recorded nodes (tests check release and recompute).
  size_t saved_bytes() const;
  void clear() { records_.clear(); }

 private:
  struct Record {
    std::shared_ptr<Node> node;
    std::vector<std::shared_ptr<GradCell>> inputs;
    std::vector<std::shared_ptr<GradCell>> outputs;
    // Recompute segments: cells requiring a gradient that the segment's function reads without
    // receiving them as inputs (captured parameters); its backward accumulates into them.
    std::vector<std::shared_ptr<GradCell>> captured;
  };
  // While a segment's forward runs on a quiet tape, collects the cells it reads from outside.
  struct Capture {
    std::unordered_set<const GradCell*> inside;  // segment leaves and cells produced in the segment
    std::unordered_set<const GradCell*> seen;
    std::vector<std::shared_ptr<GradCell>> cells;
  };
  void check_finite(const Tensor& t, const std::string& node, const char* what, size_t index) const;

  TapeOptions opts_;
  std::vector<Record> records_;
  Capture* capture_ = nullptr;  // set on the quiet tape of Tape::segment's forward
};

// True when every element of a float tensor is finite (copies CUDA tensors to the host).
bool all_finite(const Tensor& t);

}  // namespace helix
