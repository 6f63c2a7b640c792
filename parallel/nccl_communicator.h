#pragma once
// The NCCL backend, compiled only when HELIX_WITH_NCCL. CUDA tensors on this rank's GPU go to NCCL,
// enqueued on the given stream (a call returns once enqueued). Bootstrapped from MPI: group rank 0
// makes the ncclUniqueId, MPI broadcasts it over the group's MPI communicator, every member calls
// ncclCommInitRank. CPU tensors go to the MPI twin, so one context serves both. Each NCCL call
// records an event the watchdog polls; the watchdog also polls ncclCommGetAsyncError and calls
// ncclCommAbort before it aborts the job. NCCL refuses two ranks of one communicator on the same
// GPU: ranks that share a GPU use the MPI backend (host staging).
#if HELIX_WITH_NCCL
#include <nccl.h>

#include <memory>

#include "parallel/mpi_communicator.h"

namespace helix {

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `mpi`'s group. `device` is this rank's GPU; `watchdog` may be null.
  NcclCommunicator(std::unique_ptr<MpiCommunicator> mpi, Device device,
                   std::shared_ptr<Watchdog> watchdog);
  ~NcclCommunicator() override;

  std::string_view backend_name() const override { return "nccl"; }
  bool supports(Device d) const override { return d.is_cpu() || d == device_; }
  MpiCommunicator& mpi() { return *mpi_; }
  ncclComm_t nccl_comm() const { return comm_; }

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
  // Records an event after the enqueued call, for the watchdog to poll.
  void watch(std::string what, const Stream& stream);

  std::unique_ptr<MpiCommunicator> mpi_;
  Device device_;
  std::shared_ptr<Watchdog> watchdog_;
  ncclComm_t comm_ = nullptr;
  uint64_t resource_id_ = 0;
};

}  // namespace helix
#endif
