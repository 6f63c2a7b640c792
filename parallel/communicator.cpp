#include "parallel/communicator.h"

#include "core/error.h"

namespace helix {
namespace {

bool reducible(DType t, ReduceOp op) {
  switch (t) {
    case DType::kF32:
    case DType::kF64:
    case DType::kBF16:
      return true;
    case DType::kI32:
    case DType::kI64:
      return op != ReduceOp::kAvg;
    default:
      return false;
  }
}

// Byte ranges of two tensors intersect (only possible when they share storage).
bool overlaps(const Tensor& a, const Tensor& b) {
  if (!a.shares_storage(b) || a.nbytes() == 0 || b.nbytes() == 0) return false;
  const auto* pa = static_cast<const char*>(a.data_ptr());
  const auto* pb = static_cast<const char*>(b.data_ptr());
  return pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

// Same trailing dimensions (everything but dim 0).
bool same_rows(const Tensor& a, const Tensor& b) {
  if (a.ndim() != b.ndim()) return false;
  for (int i = 1; i < a.ndim(); ++i)
    if (a.dim(i) != b.dim(i)) return false;
  return true;
}

}  // namespace

std::string_view reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return "sum";
    case ReduceOp::kMax:
      return "max";
    case ReduceOp::kAvg:
      return "avg";
  }
  return "?";
}

std::string GroupInfo::describe() const {
  std::string r;
  const size_t shown = ranks.size() <= 8 ? ranks.size() : 6;
  for (size_t i = 0; i < shown; ++i) r += (i ? "," : "") + std::to_string(ranks[i]);
  if (shown < ranks.size()) r += fmt::format(",...,{} ({} ranks)", ranks.back(), ranks.size());
  return fmt::format("{} group {} (world ranks {})", name, index, r);
}

std::string Communicator::what(std::string_view op, const Tensor& t) const {
  return fmt::format("{} of {} on {}", op, t.defined() ? t.str() : std::string("-"), describe());
}

void Communicator::check_tensor(std::string_view op, std::string_view role, const Tensor& t) const {
  HELIX_CHECK(t.defined(), "{} on {}: {} tensor is undefined", op, describe(), role);
  HELIX_CHECK(t.is_contiguous(), "{} on {}: expected a contiguous {} tensor, got {}", op,
              describe(), role, t.str());
  HELIX_CHECK(supports(t.device()), "{} on {}: the {} backend cannot take {} tensor {}", op,
              describe(), backend_name(), role, t.str());
}

void Communicator::check_peer(std::string_view op, std::string_view role, int peer) const {
  HELIX_CHECK(peer >= 0 && peer < size(), "{} on {}: expected a {} group rank in [0, {}), got {}",
              op, describe(), role, size(), peer);
}

void Communicator::all_reduce(const Tensor& t, ReduceOp op, const Stream& stream) {
  check_tensor("all_reduce", "the", t);
  HELIX_CHECK(reducible(t.dtype(), op), "all_reduce({}) on {}: dtype {} cannot be reduced with {}",
              reduce_op_name(op), describe(), dtype_name(t.dtype()), reduce_op_name(op));
  if (t.numel() == 0) return;
  do_all_reduce(t, op, stream);
}

void Communicator::all_gather(const Tensor& in, const Tensor& out, const Stream& stream) {
  check_tensor("all_gather", "input", in);
  check_tensor("all_gather", "output", out);
  HELIX_CHECK(in.ndim() >= 1 && same_rows(in, out) && out.dim(0) == size() * in.dim(0) &&
                  in.dtype() == out.dtype() && in.device() == out.device(),
              "all_gather on {}: expected output {}[{} x {}, ...] on {} for input {}, got {}",
              describe(), dtype_name(in.dtype()), size(), in.ndim() ? in.dim(0) : 0,
              in.device().str(), in.str(), out.str());
  if (overlaps(in, out)) {
    const auto* slot =
        static_cast<const char*>(out.data_ptr()) + static_cast<size_t>(rank()) * in.nbytes();
    HELIX_CHECK(in.data_ptr() == slot,
                "all_gather on {}: the input overlaps the output but is not rank {}'s slot of it",
                describe(), rank());
  }
  if (in.numel() == 0) return;
  do_all_gather(in, out, stream);
}

void Communicator::reduce_scatter(const Tensor& in, const Tensor& out, ReduceOp op,
                                  const Stream& stream) {
  check_tensor("reduce_scatter", "input", in);
  check_tensor("reduce_scatter", "output", out);
  HELIX_CHECK(reducible(in.dtype(), op),
              "reduce_scatter({}) on {}: dtype {} cannot be reduced with {}", reduce_op_name(op),
              describe(), dtype_name(in.dtype()), reduce_op_name(op));
  HELIX_CHECK(in.ndim() >= 1 && same_rows(in, out) && in.dim(0) == size() * out.dim(0) &&
                  in.dtype() == out.dtype() && in.device() == out.device(),
              "reduce_scatter on {}: expected input rows = {} x output rows with equal trailing "
              "dims, dtype and device, got input {} and output {}",
              describe(), size(), in.str(), out.str());
  HELIX_CHECK(!overlaps(in, out), "reduce_scatter on {}: input {} and output {} overlap",
              describe(), in.str(), out.str());
  if (out.numel() == 0) return;
  do_reduce_scatter(in, out, op, stream);
}

void Communicator::broadcast(const Tensor& t, int root, const Stream& stream) {
  check_tensor("broadcast", "the", t);
  check_peer("broadcast", "root", root);
  if (t.numel() == 0) return;
  do_broadcast(t, root, stream);
}

void Communicator::send(const Tensor& t, int peer, const Stream& stream) {
  SendRecvParams p;
  p.send = t;
  p.dst = peer;
  send_recv(p, stream);
}

namespace {
class CompletedSend final : public PendingSend {
 public:
  void wait() override {}
};
}  // namespace

std::unique_ptr<PendingSend> Communicator::isend(const Tensor& t, int peer, const Stream& stream) {
  check_tensor("send", "the sent", t);
  check_peer("send", "destination", peer);
  if (t.numel() == 0) return std::make_unique<CompletedSend>();
  return do_isend(t, peer, stream);
}

std::unique_ptr<PendingSend> Communicator::do_isend(const Tensor& t, int peer,
                                                   const Stream& stream) {
  SendRecvParams p;
  p.send = t;
  p.dst = peer;
  do_send_recv(p, stream);
  return std::make_unique<CompletedSend>();
}

void Communicator::recv(const Tensor& t, int peer, const Stream& stream) {
  SendRecvParams p;
  p.recv = t;
  p.src = peer;
  send_recv(p, stream);
}

void Communicator::send_recv(const SendRecvParams& p, const Stream& stream) {
  HELIX_CHECK(p.send.defined() || p.recv.defined(), "send_recv on {}: neither side is defined",
              describe());
  SendRecvParams q = p;
  if (p.send.defined()) {
    check_tensor("send", "the sent", p.send);
    check_peer("send", "destination", p.dst);
    if (p.send.numel() == 0) q.send = Tensor();
  }
  if (p.recv.defined()) {
    check_tensor("recv", "the received", p.recv);
    check_peer("recv", "source", p.src);
    if (p.recv.numel() == 0) q.recv = Tensor();
  }
  if (p.send.defined() && p.recv.defined()) {
    HELIX_CHECK(
        p.send.device() == p.recv.device() && !overlaps(p.send, p.recv),
        "send_recv on {}: expected distinct send and recv tensors on one device, got {} and {}",
        describe(), p.send.str(), p.recv.str());
  }
  if (!q.send.defined() && !q.recv.defined()) return;
  do_send_recv(q, stream);
}

void Communicator::all_to_all(const Tensor& in, const Tensor& out, const Stream& stream) {
  check_tensor("all_to_all", "input", in);
  check_tensor("all_to_all", "output", out);
  HELIX_CHECK(
      in.ndim() >= 1 && in.shape() == out.shape() && in.dim(0) % size() == 0 &&
          in.dtype() == out.dtype() && in.device() == out.device(),
      "all_to_all on {}: expected input and output of one shape, dtype and device with rows "
      "divisible by {}, got {} and {}",
      describe(), size(), in.str(), out.str());
  HELIX_CHECK(!overlaps(in, out), "all_to_all on {}: input {} and output {} overlap", describe(),
              in.str(), out.str());
  if (in.numel() == 0) return;
  do_all_to_all(in, out, stream);
}

void Communicator::barrier() { do_barrier(); }

Tensor all_gather(Communicator& comm, const Tensor& in, const Stream& stream) {
  HELIX_CHECK(in.defined() && in.ndim() >= 1,
              "all_gather on {}: expected a tensor with >= 1 dims, got {}", comm.describe(),
              in.defined() ? in.str() : std::string("undefined"));
  std::vector<int64_t> dims = in.shape().vec();
  dims[0] *= comm.size();
  Tensor out = Tensor::empty(Shape(dims), in.dtype(), in.device(), stream);
  comm.all_gather(in, out, stream);
  return out;
}

Tensor reduce_scatter(Communicator& comm, const Tensor& in, ReduceOp op, const Stream& stream) {
  HELIX_CHECK(in.defined() && in.ndim() >= 1 && in.dim(0) % comm.size() == 0,
              "reduce_scatter on {}: expected rows divisible by {}, got {}", comm.describe(),
              comm.size(), in.defined() ? in.str() : std::string("undefined"));
  std::vector<int64_t> dims = in.shape().vec();
  dims[0] /= comm.size();
  Tensor out = Tensor::empty(Shape(dims), in.dtype(), in.device(), stream);
  comm.reduce_scatter(in, out, op, stream);
  return out;
}

}  // namespace helix
