#pragma once
// Parameters of a model: fp32 master weights (what the optimizer updates and checkpoints hold), the
// model copy that compute reads (bf16 in mixed precision; the master itself in f32 runs), and an f32
// gradient accumulated across micro-batches through the autograd Var.
#include <map>
#include <string>
#include <vector>

#include "core/autograd.h"

namespace helix {

// How a parameter is split over the tensor-parallel group (rank r of n holds its part of the full
// tensor; the full tensor is what a single device holds and what checkpoints store).
enum class TpShard : uint8_t {
  kReplicated,  // every rank holds the full tensor
  kRows,        // rows [r*R/n, (r+1)*R/n) of dim 0 (column-parallel weight and bias: FC1)
  kCols,        // columns [r*C/n, (r+1)*C/n) of dim 1 (row-parallel weight: out-proj, FC2)
  kQkvRows,     // the fused [3H, ...] qkv tensor: [q rows; k rows; v rows] of this rank's heads
};

struct Parameter {
  std::string name;   // helix name (Hugging Face's, except the fused qkv tensors)
  Tensor master;      // f32, this rank's shard (the parameter's shape on one device)
  Var var;            // data: the model copy (compute dtype); grad: f32, accumulated
  bool decay = true;  // AdamW weight decay applies (matrices and embeddings; not biases or LayerNorm)
  TpShard shard = TpShard::kReplicated;
  Shape full_shape;            // the unsharded shape (== master's shape when replicated)
  bool grad_partial = false;   // replicated, but each TP rank's gradient is a partial sum (sequence
                               // parallelism: rows of T are split): summed over tp after backward

  const Tensor& grad() const { return var.grad(); }
  bool shares_master() const { return var.data().shares_storage(master); }
};

class ParameterSet {
 public:
  // Adds a parameter of `shape` on `device`; compute dtype f32 makes the model copy the master.
  Parameter& add(const std::string& name, const Shape& shape, bool decay, Device device, DType compute);
  Parameter& get(const std::string& name);
  const Parameter& get(const std::string& name) const;
  bool has(const std::string& name) const { return index_.count(name) > 0; }
  std::vector<Parameter>& all() { return params_; }
  const std::vector<Parameter>& all() const { return params_; }
  int64_t num_elements() const;
  // Writes master -> model copy for parameters whose copy is separate (after loading or an update
  // that did not write the copy itself).
  void sync_model_copies(const Stream& stream) const;
  void zero_grads(const Stream& stream) const;

 private:
  std::vector<Parameter> params_;  // stable order: the order of add()
  std::map<std::string, size_t> index_;
};

}  // namespace helix
