#pragma once
// Communication as autograd pairs (Megatron's tensor_parallel/mappings.py): every node's backward
// is the adjoint of its forward, so column- and row-parallel layers and sequence-parallel regions
// are compositions of these nodes and plain compute nodes. docs/parallel.md holds the table of
// pairs. Splits and gathers are along dimension 0 (T of packed [T, hidden] activations); T must be
// divisible by the group size. Identity forwards and the split return views of their input (no
// copy). Every rank of the group must run the same nodes in the same order, forward and backward,
// and agree on which inputs need a gradient (a backward collective runs only where one is needed).
#include <memory>

#include "core/autograd.h"
#include "parallel/communicator.h"

namespace helix {

// Forward: identity. Backward: all-reduce(sum) over the group. Enters a tensor-parallel region
// (before a column-parallel linear, whose per-rank input gradients are partial sums).
class CopyToTP final : public Node {
 public:
  explicit CopyToTP(Communicator& comm) : comm_(&comm) {}
  std::string name() const override { return "copy_to_tp"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                const Stream& stream) override;

 private:
  Communicator* comm_;
};

// Forward: all-reduce(sum). Backward: identity. Leaves a tensor-parallel region (after a
// row-parallel linear, whose per-rank outputs are partial sums).
class ReduceFromTP final : public Node {
 public:
  explicit ReduceFromTP(Communicator& comm) : comm_(&comm) {}
  std::string name() const override { return "reduce_from_tp"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                const Stream& stream) override;

 private:
  Communicator* comm_;
};

// Forward: keep this rank's rows [r*T/n, (r+1)*T/n). Backward: all-gather. Enters a
// sequence-parallel region from a replicated tensor (e.g. the embedding output).
class ScatterToSP final : public Node {
 public:
  explicit ScatterToSP(Communicator& comm) : comm_(&comm) {}
  std::string name() const override { return "scatter_to_sp"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                const Stream& stream) override;

 private:
  Communicator* comm_;
};

// What the backward of a gather from a sequence-parallel region does with the full gradient.
enum class GatherGrad : uint8_t {
  kReduceScatter,  // the gathered tensor feeds a column-parallel linear: gradients are partial sums
  kSplit,  // the gathered tensor is used replicated (e.g. the loss on full T): keep own rows
};

// Forward: all-gather along T. Backward: reduce-scatter(sum) or split (see GatherGrad).
class GatherFromSP final : public Node {
 public:
  GatherFromSP(Communicator& comm, GatherGrad grad) : comm_(&comm), grad_(grad) {}
  std::string name() const override { return "gather_from_sp"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                const Stream& stream) override;

 private:
  Communicator* comm_;
  GatherGrad grad_;
};

// Forward: reduce-scatter(sum) along T. Backward: all-gather. Leaves a tensor-parallel region into
// a sequence-parallel one (after a row-parallel linear under SP).
class ReduceScatterToSP final : public Node {
 public:
  explicit ReduceScatterToSP(Communicator& comm) : comm_(&comm) {}
  std::string name() const override { return "reduce_scatter_to_sp"; }
  std::vector<Tensor> forward(const std::vector<Tensor>& in, const Stream& stream) override;
  void backward(const std::vector<Tensor>& gout, std::vector<Tensor>& gin,
                const Stream& stream) override;

 private:
  Communicator* comm_;
};

// Tape helpers: out = node(x).
Var copy_to_tp(Tape& tape, Communicator& comm, const Var& x);
Var reduce_from_tp(Tape& tape, Communicator& comm, const Var& x);
Var scatter_to_sp(Tape& tape, Communicator& comm, const Var& x);
Var gather_from_sp(Tape& tape, Communicator& comm, const Var& x, GatherGrad grad);
Var reduce_scatter_to_sp(Tape& tape, Communicator& comm, const Var& x);

}  // namespace helix
