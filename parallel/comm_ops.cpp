#include "parallel/comm_ops.h"

#include "core/error.h"
#include "parallel/accumulate.h"

namespace helix {
namespace {

const Tensor& only_input(const std::vector<Tensor>& in, const char* node) {
  HELIX_CHECK(in.size() == 1, "{}: expected 1 input, got {}", node, in.size());
  return in[0];
}

const Tensor& only_grad(const std::vector<Tensor>& gout, const char* node) {
  HELIX_CHECK(gout.size() == 1 && gout[0].defined(),
              "{}: expected the output gradient (every rank of the group runs this backward)",
              node);
  return gout[0];
}

// Rows [r*T/n, (r+1)*T/n) of x.
Tensor own_rows(const Tensor& x, const Communicator& comm, const char* node) {
  HELIX_CHECK(x.ndim() >= 1 && x.dim(0) % comm.size() == 0,
              "{} on {}: expected T (dim 0) divisible by the group size {}, got {}", node,
              comm.describe(), comm.size(), x.str());
  const int64_t n = x.dim(0) / comm.size();
  return x.slice(comm.rank() * n, (comm.rank() + 1) * n);
}

}  // namespace

// ---- copy_to_tp: identity / all-reduce ---------------------------------------------------------
std::vector<Tensor> CopyToTP::forward(const std::vector<Tensor>& in, const Stream&) {
  return {only_input(in, "copy_to_tp")};
}
void CopyToTP::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                        const Stream& stream) {
  if (!gin[0].defined()) return;
  Tensor g = only_grad(gout, "copy_to_tp").clone(stream);
  comm_->all_reduce(g, ReduceOp::kSum, stream);
  accumulate(gin[0], g, stream);
}

// ---- reduce_from_tp: all-reduce / identity -----------------------------------------------------
std::vector<Tensor> ReduceFromTP::forward(const std::vector<Tensor>& in, const Stream& stream) {
  Tensor y = only_input(in, "reduce_from_tp").clone(stream);
  comm_->all_reduce(y, ReduceOp::kSum, stream);
  return {y};
}
void ReduceFromTP::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                            const Stream& stream) {
  if (!gin[0].defined()) return;
  accumulate(gin[0], only_grad(gout, "reduce_from_tp"), stream);
}

// ---- scatter_to_sp: split / all-gather ---------------------------------------------------------
std::vector<Tensor> ScatterToSP::forward(const std::vector<Tensor>& in, const Stream&) {
  return {own_rows(only_input(in, "scatter_to_sp"), *comm_, "scatter_to_sp")};
}
void ScatterToSP::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                           const Stream& stream) {
  if (!gin[0].defined()) return;
  accumulate(gin[0], all_gather(*comm_, only_grad(gout, "scatter_to_sp"), stream), stream);
}

// ---- gather_from_sp: all-gather / reduce-scatter or split --------------------------------------
std::vector<Tensor> GatherFromSP::forward(const std::vector<Tensor>& in, const Stream& stream) {
  return {all_gather(*comm_, only_input(in, "gather_from_sp"), stream)};
}
void GatherFromSP::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                            const Stream& stream) {
  if (!gin[0].defined()) return;
  const Tensor& g = only_grad(gout, "gather_from_sp");
  if (grad_ == GatherGrad::kReduceScatter) {
    accumulate(gin[0], reduce_scatter(*comm_, g, ReduceOp::kSum, stream), stream);
  } else {
    accumulate(gin[0], own_rows(g, *comm_, "gather_from_sp"), stream);
  }
}

// ---- reduce_scatter_to_sp: reduce-scatter / all-gather -----------------------------------------
std::vector<Tensor> ReduceScatterToSP::forward(const std::vector<Tensor>& in,
                                               const Stream& stream) {
  return {reduce_scatter(*comm_, only_input(in, "reduce_scatter_to_sp"), ReduceOp::kSum, stream)};
}
void ReduceScatterToSP::backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                                 const Stream& stream) {
  if (!gin[0].defined()) return;
  accumulate(gin[0], all_gather(*comm_, only_grad(gout, "reduce_scatter_to_sp"), stream), stream);
}

// ---- tape helpers ------------------------------------------------------------------------------
Var copy_to_tp(Tape& tape, Communicator& comm, const Var& x) {
  return tape.apply1(std::make_shared<CopyToTP>(comm), {x});
}
Var reduce_from_tp(Tape& tape, Communicator& comm, const Var& x) {
  return tape.apply1(std::make_shared<ReduceFromTP>(comm), {x});
}
Var scatter_to_sp(Tape& tape, Communicator& comm, const Var& x) {
  return tape.apply1(std::make_shared<ScatterToSP>(comm), {x});
}
Var gather_from_sp(Tape& tape, Communicator& comm, const Var& x, GatherGrad grad) {
  return tape.apply1(std::make_shared<GatherFromSP>(comm, grad), {x});
}
Var reduce_scatter_to_sp(Tape& tape, Communicator& comm, const Var& x) {
  return tape.apply1(std::make_shared<ReduceScatterToSP>(comm), {x});
}

}  // namespace helix
