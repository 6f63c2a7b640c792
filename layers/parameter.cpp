#include "layers/parameter.h"

namespace helix {

Parameter& ParameterSet::add(const std::string& name, const Shape& shape, bool decay, Device device, DType compute) {
  HELIX_CHECK(!has(name), "parameter '{}' added twice", name);
  HELIX_CHECK(compute == DType::kF32 || compute == DType::kBF16, "parameter '{}': compute dtype must be f32 or bf16, got {}",
              name, dtype_name(compute));
  Parameter p;
  p.name = name;
  p.decay = decay;
  p.full_shape = shape;
  p.master = Tensor::zeros(shape, DType::kF32, device);
  Tensor copy = compute == DType::kF32 ? p.master : Tensor::zeros(shape, compute, device);
  p.var = Var::leaf(copy, true, DType::kF32, name);
  index_[name] = params_.size();
  params_.push_back(std::move(p));
  return params_.back();
}

Parameter& ParameterSet::get(const std::string& name) {
  auto it = index_.find(name);
  HELIX_CHECK(it != index_.end(), "no parameter named '{}'", name);
  return params_[it->second];
}
const Parameter& ParameterSet::get(const std::string& name) const {
  auto it = index_.find(name);
  HELIX_CHECK(it != index_.end(), "no parameter named '{}'", name);
  return params_[it->second];
}

int64_t ParameterSet::num_elements() const {
  int64_t n = 0;
  for (const Parameter& p : params_) n += p.master.numel();
  return n;
}

void ParameterSet::sync_model_copies(const Stream& stream) const {
  for (const Parameter& p : params_) {
    if (p.shares_master()) continue;
    Tensor converted = p.master.to(p.var.data().dtype(), stream);
    Tensor dst = p.var.data();
    dst.copy_from(converted, stream);
  }
}

void ParameterSet::zero_grads(const Stream& stream) const {
  // In place: gradient buffers keep their memory (and any flat-buffer views onto it) across steps.
  for (const Parameter& p : params_)
    if (p.var.grad().defined()) p.var.cell()->grad.zero(stream);
}

}  // namespace helix
