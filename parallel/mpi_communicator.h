#pragma once
// The MPI backend. CPU tensors go to MPI directly; CUDA tensors are staged through host memory
// (copy to host on the given stream, MPI, copy back), so several ranks can share one GPU for
// correctness runs: slow, simple and exact. bf16 reduces by converting to f32 on the host, reducing
// in f32 and rounding once back to bf16. Blocking: a call returns when the collective is done.
// Every communicator uses MPI_ERRORS_RETURN (errors throw through MPI_CHECK) and reports its calls
// to the watchdog. MpiSession is the start-up and shut-down of MPI itself.
#include <mpi.h>

#include <memory>

#include "parallel/communicator.h"
#include "parallel/watchdog.h"

namespace helix {

// MPI_Init_thread (asking for MPI_THREAD_MULTIPLE: the watchdog thread may call MPI_Abort) and
// MPI_Finalize. Sets MPI_ERRORS_RETURN on MPI_COMM_WORLD. One per process, in main().
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int world_rank() const { return rank_; }
  int world_size() const { return size_; }
  int thread_level() const { return thread_level_; }  // MPI_THREAD_* provided

 private:
  int rank_ = 0, size_ = 1, thread_level_ = 0;
};

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm` (freed on destruction) and sets MPI_ERRORS_RETURN on it. `info` must
  // match the communicator's size and rank. `watchdog` may be null (no timeout).
  MpiCommunicator(MPI_Comm comm, GroupInfo info, std::shared_ptr<Watchdog> watchdog);
  ~MpiCommunicator() override;

  MPI_Comm comm() const { return comm_; }
  std::string_view backend_name() const override { return "mpi"; }
  bool supports(Device) const override { return true; }

 protected:
  void do_all_reduce(const Tensor& t, ReduceOp op, const Stream& stream) override;
  void do_all_gather(const Tensor& in, const Tensor& out, const Stream& stream) override;
  void do_reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op,
                         const Stream& stream) override;
  void do_broadcast(const Tensor& t, int root, const Stream& stream) override;
  void do_send_recv(const SendRecvParams& p, const Stream& stream) override;
  void do_all_to_all(const Tensor& in, const Tensor& out, const Stream& stream) override;
  void do_barrier() override;
  std::unique_ptr<PendingSend> do_isend(const Tensor& t, int peer, const Stream& stream) override;

 private:
  MPI_Op mpi_op(ReduceOp op, DType t) const;

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::shared_ptr<Watchdog> watchdog_;
  MPI_Op max_f32_ = MPI_OP_NULL;  // MAX that propagates NaN (MPI_MAX's NaN result depends on order)
  MPI_Op max_f64_ = MPI_OP_NULL;
};

}  // namespace helix
