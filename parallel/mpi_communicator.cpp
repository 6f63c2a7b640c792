#include "parallel/mpi_communicator.h"

#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "core/convert.h"
#include "core/log.h"
#include "parallel/checks.h"

namespace helix {
namespace {

// Largest element count one MPI call takes (counts are int); bigger transfers go in chunks.
constexpr int64_t kMaxChunk = int64_t{1} << 30;

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kF64:
      return MPI_DOUBLE;
    case DType::kI32:
      return MPI_INT32_T;
    case DType::kI64:
      return MPI_INT64_T;
    case DType::kBF16:
      return MPI_UINT16_T;  // moves only; reductions go through f32
    case DType::kE4M3:
    case DType::kE5M2:
    case DType::kU8:
      return MPI_UINT8_T;
  }
  HELIX_FAIL("no MPI datatype for dtype {}", dtype_name(t));
}

int checked_count(int64_t n, std::string_view op) {
  HELIX_CHECK(n <= INT_MAX,
              "{}: expected at most {} elements per rank block in one MPI call, got {}", op,
              INT_MAX, n);
  return static_cast<int>(n);
}

template <typename T>
void nan_max(void* in, void* inout, int* len, MPI_Datatype*) {
  const T* a = static_cast<const T*>(in);
  T* b = static_cast<T*>(inout);
  for (int i = 0; i < *len; ++i) {
    // Commutative: any NaN gives the canonical quiet NaN, so every rank sees the same bits.
    if (std::isnan(a[i]) || std::isnan(b[i]))
      b[i] = std::numeric_limits<T>::quiet_NaN();
    else if (a[i] > b[i])
      b[i] = a[i];
  }
}

// Host view of a tensor: itself on the CPU, a copy (staged on `stream`) for CUDA tensors.
Tensor host_copy(const Tensor& t, const Stream& stream) {
  return t.is_cpu() ? t : t.to(Device::cpu(), stream);
}
// Host buffer to receive into: the tensor itself on the CPU, fresh host memory for CUDA tensors.
Tensor host_output(const Tensor& t) {
  return t.is_cpu() ? t : Tensor::empty(t.shape(), t.dtype(), Device::cpu());
}
// Writes a staged host result back to a CUDA tensor (no-op when `dst` is the host tensor itself).
void write_back(const Tensor& dst, const Tensor& host, const Stream& stream) {
  if (dst.is_cpu()) return;
  Tensor d = dst;
  d.copy_from(host, stream);
}

std::vector<float> bf16_to_f32(const Tensor& h) {
  const auto* src = static_cast<const uint16_t*>(h.data_ptr());
  std::vector<float> f(static_cast<size_t>(h.numel()));
  for (size_t i = 0; i < f.size(); ++i) f[i] = bf16_bits_to_float(src[i]);
  return f;
}
void f32_to_bf16(const std::vector<float>& f, const Tensor& h) {
  auto* dst = static_cast<uint16_t*>(h.data_ptr());
  for (size_t i = 0; i < f.size(); ++i) dst[i] = float_to_bf16_bits(f[i]);
}

template <typename T>
void divide(T* p, int64_t n, int by) {
  const T d = static_cast<T>(by);
  for (int64_t i = 0; i < n; ++i) p[i] /= d;
}
// kAvg on a host buffer of the tensor's own dtype (f32 or f64).
void divide_host(const Tensor& h, int by) {
  if (h.dtype() == DType::kF32)
    divide(static_cast<float*>(h.data_ptr()), h.numel(), by);
  else if (h.dtype() == DType::kF64)
    divide(static_cast<double*>(h.data_ptr()), h.numel(), by);
  else
    HELIX_FAIL("avg: unexpected dtype {}", dtype_name(h.dtype()));
}

}  // namespace

// ---- MpiSession --------------------------------------------------------------------------------
MpiSession::MpiSession(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  HELIX_CHECK(!initialized, "MpiSession: MPI is already initialised (one MpiSession per process)");
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &thread_level_));
  MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank_));
  MPI_CHECK(MPI_Comm_size(MPI_COMM_WORLD, &size_));
  set_log_rank(rank_);
  if (thread_level_ < MPI_THREAD_MULTIPLE && rank_ == 0)
    log_warn(
        "MPI provides thread level {} < MPI_THREAD_MULTIPLE: the watchdog still calls MPI_Abort "
        "from its thread (works with Open MPI and MPICH)",
        thread_level_);
}

MpiSession::~MpiSession() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

// ---- MpiCommunicator ---------------------------------------------------------------------------
MpiCommunicator::MpiCommunicator(MPI_Comm comm, GroupInfo info, std::shared_ptr<Watchdog> watchdog)
    : Communicator(std::move(info)), comm_(comm), watchdog_(std::move(watchdog)) {
  HELIX_CHECK(comm_ != MPI_COMM_NULL, "MpiCommunicator for {}: null MPI communicator", describe());
  MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  int size = 0, rank = 0;
  MPI_CHECK(MPI_Comm_size(comm_, &size));
  MPI_CHECK(MPI_Comm_rank(comm_, &rank));
  HELIX_CHECK(
      size == this->size() && rank == this->rank(),
      "MpiCommunicator for {}: expected size {} and rank {}, the MPI communicator has {} and {}",
      describe(), this->size(), this->rank(), size, rank);
  MPI_CHECK(MPI_Op_create(&nan_max<float>, 1, &max_f32_));
  MPI_CHECK(MPI_Op_create(&nan_max<double>, 1, &max_f64_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;  // MPI already tore everything down
  if (max_f32_ != MPI_OP_NULL) MPI_Op_free(&max_f32_);
  if (max_f64_ != MPI_OP_NULL) MPI_Op_free(&max_f64_);
  if (comm_ != MPI_COMM_NULL && comm_ != MPI_COMM_WORLD) MPI_Comm_free(&comm_);
}

MPI_Op MpiCommunicator::mpi_op(ReduceOp op, DType t) const {
  if (op != ReduceOp::kMax) return MPI_SUM;  // kAvg: sum, then divide
  if (t == DType::kF32 || t == DType::kBF16) return max_f32_;
  if (t == DType::kF64) return max_f64_;
  return MPI_MAX;
}

void MpiCommunicator::do_all_reduce(const Tensor& t, ReduceOp op, const Stream& stream) {
  WatchScope watch(watchdog_.get(), what(fmt::format("all_reduce({})", reduce_op_name(op)), t));
  Tensor h = host_copy(t, stream);
  const int64_t n = h.numel();
  if (h.dtype() == DType::kBF16) {
    std::vector<float> f = bf16_to_f32(h);
    for (int64_t off = 0; off < n; off += kMaxChunk) {
      const int c = static_cast<int>(std::min(kMaxChunk, n - off));
      MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, f.data() + off, c, MPI_FLOAT, mpi_op(op, DType::kBF16),
                              comm_));
    }
    if (op == ReduceOp::kAvg) divide(f.data(), n, size());
    f32_to_bf16(f, h);
  } else {
    const size_t esize = dtype_size(h.dtype());
    auto* p = static_cast<char*>(h.data_ptr());
    for (int64_t off = 0; off < n; off += kMaxChunk) {
      const int c = static_cast<int>(std::min(kMaxChunk, n - off));
      MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, p + static_cast<size_t>(off) * esize, c,
                              mpi_type(h.dtype()), mpi_op(op, h.dtype()), comm_));
    }
    if (op == ReduceOp::kAvg) divide_host(h, size());
  }
  write_back(t, h, stream);
}

void MpiCommunicator::do_all_gather(const Tensor& in, const Tensor& out, const Stream& stream) {
  WatchScope watch(watchdog_.get(), what("all_gather", in));
  const int n = checked_count(in.numel(), "all_gather");
  const MPI_Datatype type = mpi_type(in.dtype());
  const bool in_slot =
      in.shares_storage(out) && in.data_ptr() == static_cast<const char*>(out.data_ptr()) +
                                                     static_cast<size_t>(rank()) * in.nbytes();
  if (in_slot) {
    // The output holds this rank's block already: gather in place.
    Tensor h = host_copy(out, stream);
    MPI_CHECK(MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, h.data_ptr(), n, type, comm_));
    write_back(out, h, stream);
    return;
  }
  Tensor hin = host_copy(in, stream);
  Tensor hout = host_output(out);
  MPI_CHECK(MPI_Allgather(hin.data_ptr(), n, type, hout.data_ptr(), n, type, comm_));
  write_back(out, hout, stream);
}

void MpiCommunicator::do_reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op,
                                        const Stream& stream) {
  WatchScope watch(watchdog_.get(),
                   what(fmt::format("reduce_scatter({})", reduce_op_name(op)), in));
  const int n = checked_count(out.numel(), "reduce_scatter");
  Tensor hin = host_copy(in, stream);
  Tensor hout = host_output(out);
  if (in.dtype() == DType::kBF16) {
    std::vector<float> fin = bf16_to_f32(hin);
    std::vector<float> fout(static_cast<size_t>(n));
    MPI_CHECK(MPI_Reduce_scatter_block(fin.data(), fout.data(), n, MPI_FLOAT,
                                       mpi_op(op, DType::kBF16), comm_));
    if (op == ReduceOp::kAvg) divide(fout.data(), n, size());
    f32_to_bf16(fout, hout);
  } else {
    MPI_CHECK(MPI_Reduce_scatter_block(hin.data_ptr(), hout.data_ptr(), n, mpi_type(in.dtype()),
                                       mpi_op(op, in.dtype()), comm_));
    if (op == ReduceOp::kAvg) divide_host(hout, size());
  }
  write_back(out, hout, stream);
}

void MpiCommunicator::do_broadcast(const Tensor& t, int root, const Stream& stream) {
  WatchScope watch(watchdog_.get(), what(fmt::format("broadcast(root {})", root), t));
  Tensor h = rank() == root ? host_copy(t, stream) : host_output(t);
  const int64_t n = h.numel();
  const size_t esize = dtype_size(h.dtype());
  auto* p = static_cast<char*>(h.data_ptr());
  for (int64_t off = 0; off < n; off += kMaxChunk) {
    const int c = static_cast<int>(std::min(kMaxChunk, n - off));
    MPI_CHECK(MPI_Bcast(p + static_cast<size_t>(off) * esize, c, mpi_type(h.dtype()), root, comm_));
  }
  if (rank() != root) write_back(t, h, stream);
}

void MpiCommunicator::do_send_recv(const SendRecvParams& p, const Stream& stream) {
  const std::string op = p.send.defined() && p.recv.defined()
                             ? fmt::format("send_recv(to {}, from {})", p.dst, p.src)
                         : p.send.defined() ? fmt::format("send(to {})", p.dst)
                                            : fmt::format("recv(from {})", p.src);
  WatchScope watch(watchdog_.get(), what(op, p.send.defined() ? p.send : p.recv));
  constexpr int kTag = 7;
  std::vector<MPI_Request> requests;
  // Post the receives first, then the sends; chunks match in order between a pair of ranks.
  Tensor hrecv = p.recv.defined() ? host_output(p.recv) : Tensor();
  Tensor hsend = p.send.defined() ? host_copy(p.send, stream) : Tensor();
  auto post = [&](const Tensor& h, int peer, bool is_send) {
    const int64_t n = h.numel();
    const size_t esize = dtype_size(h.dtype());
    auto* base = static_cast<char*>(h.data_ptr());
    for (int64_t off = 0; off < n; off += kMaxChunk) {
      const int c = static_cast<int>(std::min(kMaxChunk, n - off));
      MPI_Request r;
      void* ptr = base + static_cast<size_t>(off) * esize;
      if (is_send)
        MPI_CHECK(MPI_Isend(ptr, c, mpi_type(h.dtype()), peer, kTag, comm_, &r));
      else
        MPI_CHECK(MPI_Irecv(ptr, c, mpi_type(h.dtype()), peer, kTag, comm_, &r));
      requests.push_back(r);
    }
  };
  if (hrecv.defined()) post(hrecv, p.src, false);
  if (hsend.defined()) post(hsend, p.dst, true);
  std::vector<MPI_Status> statuses(requests.size());
  const int rc = MPI_Waitall(static_cast<int>(requests.size()), requests.data(), statuses.data());
  if (rc == MPI_ERR_IN_STATUS)  // name the request's own error (e.g. MPI_ERR_TRUNCATE)
    for (const MPI_Status& st : statuses)
      if (st.MPI_ERROR != MPI_SUCCESS && st.MPI_ERROR != MPI_ERR_PENDING) MPI_CHECK(st.MPI_ERROR);
  MPI_CHECK(rc);
  if (hrecv.defined()) {
    // A size mismatch shows as MPI_ERR_TRUNCATE (too long) or a short count (too short).
    int64_t received = 0;
    const size_t nrecv = static_cast<size_t>((hrecv.numel() + kMaxChunk - 1) / kMaxChunk);
    for (size_t i = 0; i < nrecv; ++i) {
      int c = 0;
      MPI_CHECK(MPI_Get_count(&statuses[i], mpi_type(hrecv.dtype()), &c));
      received += c;
    }
    HELIX_CHECK(received == hrecv.numel(),
                "recv on {}: expected {} elements from group rank {}, got {}", describe(),
                hrecv.numel(), p.src, received);
    write_back(p.recv, hrecv, stream);
  }
}

namespace {
// MPI_Isend requests of one host buffer; wait() completes them under the watchdog.
class MpiPendingSend final : public PendingSend {
 public:
  MpiPendingSend(Tensor host, std::vector<MPI_Request> requests, Watchdog* dog, std::string what)
      : host_(std::move(host)), requests_(std::move(requests)), dog_(dog), what_(std::move(what)) {}
  ~MpiPendingSend() override {
    if (done_) return;
    try {
      wait();
    } catch (...) {  // destructors do not throw; wait() explicitly to see the error
    }
  }
  void wait() override {
    if (done_) return;
    done_ = true;
    WatchScope watch(dog_, what_);
    std::vector<MPI_Status> statuses(requests_.size());
    const int rc =
        MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), statuses.data());
    if (rc == MPI_ERR_IN_STATUS)
      for (const MPI_Status& st : statuses)
        if (st.MPI_ERROR != MPI_SUCCESS && st.MPI_ERROR != MPI_ERR_PENDING) MPI_CHECK(st.MPI_ERROR);
    MPI_CHECK(rc);
    host_ = Tensor();
  }

 private:
  Tensor host_;  // kept alive until the send completes
  std::vector<MPI_Request> requests_;
  Watchdog* dog_;
  std::string what_;
  bool done_ = false;
};
}  // namespace

// Same tag and chunking as do_send_recv, so an isend matches a recv / send_recv of the peer.
std::unique_ptr<PendingSend> MpiCommunicator::do_isend(const Tensor& t, int peer,
                                                      const Stream& stream) {
  constexpr int kTag = 7;
  Tensor h = host_copy(t, stream);
  const int64_t n = h.numel();
  const size_t esize = dtype_size(h.dtype());
  auto* base = static_cast<char*>(h.data_ptr());
  std::vector<MPI_Request> requests;
  for (int64_t off = 0; off < n; off += kMaxChunk) {
    const int c = static_cast<int>(std::min(kMaxChunk, n - off));
    MPI_Request r;
    MPI_CHECK(MPI_Isend(base + static_cast<size_t>(off) * esize, c, mpi_type(h.dtype()), peer, kTag,
                        comm_, &r));
    requests.push_back(r);
  }
  return std::make_unique<MpiPendingSend>(std::move(h), std::move(requests), watchdog_.get(),
                                          what(fmt::format("isend(to {})", peer), t));
}

void MpiCommunicator::do_all_to_all(const Tensor& in, const Tensor& out, const Stream& stream) {
  WatchScope watch(watchdog_.get(), what("all_to_all", in));
  const int n = checked_count(in.numel() / size(), "all_to_all");
  Tensor hin = host_copy(in, stream);
  Tensor hout = host_output(out);
  const MPI_Datatype type = mpi_type(in.dtype());
  MPI_CHECK(MPI_Alltoall(hin.data_ptr(), n, type, hout.data_ptr(), n, type, comm_));
  write_back(out, hout, stream);
}

void MpiCommunicator::do_barrier() {
  WatchScope watch(watchdog_.get(), fmt::format("barrier on {}", describe()));
  MPI_CHECK(MPI_Barrier(comm_));
}

}  // namespace helix
