#pragma once
// Communicator: the collectives of one rank group on helix Tensors, with an explicit Stream. The
// public calls validate shapes, dtypes and devices once ("expected X, got Y") and hand over to a
// backend: MpiCommunicator (CPU tensors; CUDA tensors staged through host memory) or
// NcclCommunicator (CUDA tensors on the GPU; CPU tensors forwarded to its MPI twin). Collectives
// along a dimension work on dimension 0, the token dimension T of packed [T, hidden] activations.
//
// Every member of the group must call the same collectives in the same order with matching
// arguments. Ranks are group ranks (0 .. size-1), not world ranks.
//
// Numerics: f32, f64, i32 and i64 reduce in their own type. bf16 reduces in fp32: the MPI backend
// converts to f32 on the host, reduces and rounds once back to bf16; NCCL reduces bf16 natively
// with fp32 arithmetic per step and bf16 storage between steps (so NCCL's bf16 sums may differ from
// MPI's by a few bf16 ulps). kAvg divides the sum by the group size (floats only). MAX with a NaN
// operand is NaN in the MPI backend; NCCL leaves it unspecified, so a caller that must see NaN (FP8
// amax) maps NaN to +inf before reducing. FP8 and u8 tensors move (gather, broadcast, send, ...)
// but do not reduce.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/device.h"
#include "core/tensor.h"

namespace helix {

enum class ReduceOp : uint8_t { kSum, kMax, kAvg };
std::string_view reduce_op_name(ReduceOp op);  // "sum", "max", "avg"

// Which world ranks a communicator spans and what it is called in messages.
struct GroupInfo {
  std::string name;              // "tp", "dp_cp", or "cp/pp" when two kinds share one partition
  int index = 0;                 // which group of the kind (RankGroups::group_index)
  std::vector<int> ranks;        // world ranks of the members, in group-rank order
  int rank = 0;                  // this process's group rank
  std::string describe() const;  // "tp group 3 (world ranks 6,7)"
};

// One send and one receive that run together (a ring step): send `send` to group rank `dst` while
// receiving `recv` from group rank `src`. Either side may be skipped with an undefined tensor.
struct SendRecvParams {
  Tensor send;  // any shape; sent as is
  int dst = -1;
  Tensor recv;  // written; the peer's send tensor must have the same numel and dtype
  int src = -1;
};

// A send posted by Communicator::isend. wait() blocks until it has completed (its tensor may change
// after); a handle destroyed unwaited waits then, ignoring errors.
class PendingSend {
 public:
  virtual ~PendingSend() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  explicit Communicator(GroupInfo info) : info_(std::move(info)) {}
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return info_.rank; }
  int size() const { return static_cast<int>(info_.ranks.size()); }
  const GroupInfo& group() const { return info_; }
  std::string describe() const { return info_.describe(); }
  virtual std::string_view backend_name() const = 0;  // "mpi" or "nccl"
  // Whether tensors on `device` can take part (MPI: any; NCCL: its GPU, and CPU through MPI).
  virtual bool supports(Device device) const = 0;

  // t = op(t over the group), in place.
  void all_reduce(const Tensor& t, ReduceOp op, const Stream& stream);
  // in [n, ...] -> out [size*n, ...], rank r's rows at [r*n, (r+1)*n). `in` may be that slot of
  // `out`.
  void all_gather(const Tensor& in, const Tensor& out, const Stream& stream);
  // in [size*n, ...] -> out [n, ...] = op over ranks of rows [rank*n, (rank+1)*n) of their `in`.
  void reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op, const Stream& stream);
  // t on every rank = t on group rank `root`.
  void broadcast(const Tensor& t, int root, const Stream& stream);
  // Point to point with group rank `peer`; the receiver's tensor has the sender's numel and dtype.
  // A lone send or recv may block until the peer posts its side: for exchanges use send_recv.
  void send(const Tensor& t, int peer, const Stream& stream);
  void recv(const Tensor& t, int peer, const Stream& stream);
  void send_recv(const SendRecvParams& p, const Stream& stream);
  // A send that returns once posted, without waiting for the receiver (pipeline parallelism). MPI:
  // MPI_Isend of a host copy (a CPU tensor is sent in place and must stay unchanged until wait());
  // NCCL: enqueued on `stream` like send (the host does not wait; the stream does). The receiver
  // uses recv or send_recv; messages between two ranks match in posting order.
  std::unique_ptr<PendingSend> isend(const Tensor& t, int peer, const Stream& stream);
  // in [size*n, ...] -> out [size*n, ...]: rows [j*n, (j+1)*n) of `in` go to rank j and arrive at
  // rows [rank*n, ...) of its `out`.
  void all_to_all(const Tensor& in, const Tensor& out, const Stream& stream);
  // Host-side barrier over the group (does not wait for device streams).
  void barrier();

 protected:
  virtual void do_all_reduce(const Tensor& t, ReduceOp op, const Stream& stream) = 0;
  virtual void do_all_gather(const Tensor& in, const Tensor& out, const Stream& stream) = 0;
  virtual void do_reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op,
                                 const Stream& stream) = 0;
  virtual void do_broadcast(const Tensor& t, int root, const Stream& stream) = 0;
  virtual void do_send_recv(const SendRecvParams& p, const Stream& stream) = 0;
  virtual void do_all_to_all(const Tensor& in, const Tensor& out, const Stream& stream) = 0;
  virtual void do_barrier() = 0;
  // Default: the blocking send through do_send_recv, returning a completed handle.
  virtual std::unique_ptr<PendingSend> do_isend(const Tensor& t, int peer, const Stream& stream);

  // "all_reduce(sum) of f32[1000003] cpu on tp group 0 (world ranks 0,1)", for the watchdog.
  std::string what(std::string_view op, const Tensor& t) const;

 private:
  void check_tensor(std::string_view op, std::string_view role, const Tensor& t) const;
  void check_peer(std::string_view op, std::string_view role, int peer) const;

  GroupInfo info_;
};

// Allocating forms (out on t's device, for the autograd pairs and tests).
Tensor all_gather(Communicator& comm, const Tensor& in, const Stream& stream);
Tensor reduce_scatter(Communicator& comm, const Tensor& in, ReduceOp op, const Stream& stream);

}  // namespace helix
