#pragma once
// Parameters of a model: fp32 master weights (what the optimizer updates and checkpoints hold), the
// model copy that compute reads (bf16 in mixed precision; the master itself in f32 runs), and an f32
// gradient accumulated across micro-batches through the autograd Var.
#include <map>
#include <string>
#include <vector>

#include "core/autograd.h"

namespace helix {

struct Parameter {
  std::string name;   // helix name (Hugging Face's, except the fused qkv tensors)
  Tensor master;      // f32, the parameter's shape
  Var var;            // data: the model copy (compute dtype); grad: f32, accumulated
  bool decay = true;  // AdamW weight decay applies (matrices and embeddings; not biases or LayerNorm)

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
