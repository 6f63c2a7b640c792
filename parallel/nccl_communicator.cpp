#include "parallel/nccl_communicator.h"

#if HELIX_WITH_NCCL
#include <memory>

#include "core/cuda_check.h"
#include "parallel/checks.h"

namespace helix {
namespace {

ncclDataType_t nccl_reduce_type(DType t) {
  switch (t) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kF64:
      return ncclFloat64;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    default:
      HELIX_FAIL("NCCL: dtype {} cannot be reduced", dtype_name(t));
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kAvg:
      return ncclAvg;
  }
  HELIX_FAIL("NCCL: unknown reduce op");
}

cudaStream_t cuda_stream(const Stream& s) { return static_cast<cudaStream_t>(s.handle()); }

char* bytes(const Tensor& t) { return static_cast<char*>(t.data_ptr()); }

}  // namespace

NcclCommunicator::NcclCommunicator(std::unique_ptr<MpiCommunicator> mpi, Device device,
                                   std::shared_ptr<Watchdog> watchdog)
    : Communicator(mpi->group()),
      mpi_(std::move(mpi)),
      device_(device),
      watchdog_(std::move(watchdog)) {
  HELIX_CHECK(device_.is_cuda(), "NCCL communicator for {}: expected a CUDA device, got {}",
              describe(), device_.str());
  CUDA_CHECK(cudaSetDevice(device_.index));
  ncclUniqueId id;
  {
    WatchScope watch(watchdog_.get(), fmt::format("ncclCommInitRank on {}", describe()));
    if (rank() == 0) NCCL_CHECK(ncclGetUniqueId(&id));
    MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, mpi_->comm()));
    NCCL_CHECK(ncclCommInitRank(&comm_, size(), id, rank()));
  }
  if (watchdog_ && watchdog_->enabled()) {
    ncclComm_t comm = comm_;
    const std::string name = describe();
    resource_id_ = watchdog_->add_resource(
        [comm, name]() -> std::string {
          ncclResult_t st = ncclSuccess;
          if (ncclCommGetAsyncError(comm, &st) != ncclSuccess)
            return "ncclCommGetAsyncError failed on " + name;
          if (st != ncclSuccess && st != ncclInProgress)
            return fmt::format("NCCL asynchronous error on {}: {}", name, ncclGetErrorString(st));
          return {};
        },
        [comm]() { ncclCommAbort(comm); });
  }
}

NcclCommunicator::~NcclCommunicator() {
  if (resource_id_) watchdog_->remove_resource(resource_id_);
  if (comm_) ncclCommDestroy(comm_);
}

void NcclCommunicator::watch(std::string what, const Stream& stream) {
  if (!watchdog_ || !watchdog_->enabled()) return;
  cudaEvent_t ev;
  CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
  std::shared_ptr<void> owner(ev, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
  CUDA_CHECK(cudaEventRecord(ev, cuda_stream(stream)));
  watchdog_->track(std::move(what),
                   [ev, owner]() { return cudaEventQuery(ev) != cudaErrorNotReady; });
}

void NcclCommunicator::do_all_reduce(const Tensor& t, ReduceOp op, const Stream& stream) {
  if (t.is_cpu()) return mpi_->all_reduce(t, op, stream);
  NCCL_CHECK(ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()),
                           nccl_reduce_type(t.dtype()), nccl_op(op), comm_, cuda_stream(stream)));
  watch(what(fmt::format("all_reduce({})", reduce_op_name(op)), t), stream);
}

void NcclCommunicator::do_all_gather(const Tensor& in, const Tensor& out, const Stream& stream) {
  if (in.is_cpu()) return mpi_->all_gather(in, out, stream);
  // Bytes: every dtype moves; `in` may be this rank's slot of `out` (NCCL's in-place form).
  NCCL_CHECK(ncclAllGather(in.data_ptr(), out.data_ptr(), in.nbytes(), ncclUint8, comm_,
                           cuda_stream(stream)));
  watch(what("all_gather", in), stream);
}

void NcclCommunicator::do_reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op,
                                         const Stream& stream) {
  if (in.is_cpu()) return mpi_->reduce_scatter(in, out, op, stream);
  NCCL_CHECK(ncclReduceScatter(in.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()),
                               nccl_reduce_type(in.dtype()), nccl_op(op), comm_,
                               cuda_stream(stream)));
  watch(what(fmt::format("reduce_scatter({})", reduce_op_name(op)), in), stream);
}

void NcclCommunicator::do_broadcast(const Tensor& t, int root, const Stream& stream) {
  if (t.is_cpu()) return mpi_->broadcast(t, root, stream);
  NCCL_CHECK(ncclBroadcast(t.data_ptr(), t.data_ptr(), t.nbytes(), ncclUint8, root, comm_,
                           cuda_stream(stream)));
  watch(what(fmt::format("broadcast(root {})", root), t), stream);
}

void NcclCommunicator::do_send_recv(const SendRecvParams& p, const Stream& stream) {
  const Tensor& any = p.send.defined() ? p.send : p.recv;
  if (any.is_cpu()) return mpi_->send_recv(p, stream);
  // Grouped, so a ring step (everyone sends, everyone receives) cannot deadlock.
  NCCL_CHECK(ncclGroupStart());
  if (p.send.defined())
    NCCL_CHECK(
        ncclSend(p.send.data_ptr(), p.send.nbytes(), ncclUint8, p.dst, comm_, cuda_stream(stream)));
  if (p.recv.defined())
    NCCL_CHECK(
        ncclRecv(p.recv.data_ptr(), p.recv.nbytes(), ncclUint8, p.src, comm_, cuda_stream(stream)));
  NCCL_CHECK(ncclGroupEnd());
  watch(what(fmt::format("send_recv(to {}, from {})", p.dst, p.src), any), stream);
}

void NcclCommunicator::do_all_to_all(const Tensor& in, const Tensor& out, const Stream& stream) {
  if (in.is_cpu()) return mpi_->all_to_all(in, out, stream);
  const size_t block = in.nbytes() / static_cast<size_t>(size());
  NCCL_CHECK(ncclGroupStart());
  for (int j = 0; j < size(); ++j) {
    NCCL_CHECK(ncclSend(bytes(in) + j * block, block, ncclUint8, j, comm_, cuda_stream(stream)));
    NCCL_CHECK(ncclRecv(bytes(out) + j * block, block, ncclUint8, j, comm_, cuda_stream(stream)));
  }
  NCCL_CHECK(ncclGroupEnd());
  watch(what("all_to_all", in), stream);
}

void NcclCommunicator::do_barrier() { mpi_->barrier(); }

// CPU tensors: the MPI twin's isend. CUDA tensors: the send enqueued on `stream` (do_send_recv);
// the host returns at once, the stream waits for the receiver.
std::unique_ptr<PendingSend> NcclCommunicator::do_isend(const Tensor& t, int peer,
                                                       const Stream& stream) {
  if (t.is_cpu()) return mpi_->isend(t, peer, stream);
  return Communicator::do_isend(t, peer, stream);
}

}  // namespace helix
#endif
