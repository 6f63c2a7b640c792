#include "parallel/zero.h"

#include <algorithm>

#include "core/error.h"

namespace helix {

namespace {
int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
}  // namespace

ZeroUnitLayout make_zero_unit_layout(std::string name, const std::vector<int64_t>& numels, int dp) {
  HELIX_CHECK(dp >= 1, "zero layout '{}': expected dp >= 1, got {}", name, dp);
  ZeroUnitLayout u;
  u.name = std::move(name);
  u.dp = dp;
  u.numels = numels;
  int64_t end = 0;
  for (int64_t n : numels) {
    HELIX_CHECK(n >= 0, "zero layout '{}': expected tensor sizes >= 0, got {}", u.name, n);
    const int64_t off = round_up(end, kZeroAlign);
    u.offsets.push_back(off);
    end = off + n;
  }
  u.numel = std::max<int64_t>(round_up(end, kZeroAlign * dp), kZeroAlign * dp);
  u.shard_numel = u.numel / dp;
  return u;
}

std::vector<ZeroShardPiece> zero_shard_pieces(const ZeroUnitLayout& u, int rank) {
  HELIX_CHECK(rank >= 0 && rank < u.dp, "zero unit '{}': rank {} of {}", u.name, rank, u.dp);
  const int64_t lo = rank * u.shard_numel, hi = lo + u.shard_numel;
  std::vector<ZeroShardPiece> out;
  for (size_t k = 0; k < u.numels.size(); ++k) {
    const int64_t b = std::max(lo, u.offsets[k]), e = std::min(hi, u.offsets[k] + u.numels[k]);
    if (e > b) out.push_back({k, b - u.offsets[k], b - lo, e - b});
  }
  return out;
}

ZeroMemory zero_memory_bytes(const ZeroMemoryParams& p) {
  HELIX_CHECK(p.stage >= 0 && p.stage <= 3, "--zero: expected 0, 1, 2 or 3, got {}", p.stage);
  HELIX_CHECK(p.compute_bytes == 2 || p.compute_bytes == 4, "zero memory: compute bytes 2 or 4, got {}",
              p.compute_bytes);
  const int64_t c = static_cast<int64_t>(p.compute_bytes);
  const bool copy_is_master = c == 4;  // f32 compute: the model copy is the master itself
  ZeroMemory m;
  for (const auto& unit : p.unit_numels) {
    if (p.stage == 0) {
      int64_t n = 0;
      for (int64_t k : unit) n += k;
      m.params += n * c;
      m.grads += n * 4;
      m.optimizer += (copy_is_master ? 0 : n * 4) + 2 * n * 4;
      continue;
    }
    const ZeroUnitLayout u = make_zero_unit_layout("", unit, p.dp);
    const int64_t full = u.numel, shard = u.shard_numel;
    if (p.stage == 3) {  // model copy sharded too; in f32 the shard is the master shard
      m.params += shard * c;
      m.optimizer += (copy_is_master ? 0 : shard * 4) + 2 * shard * 4;
    } else {  // full flat model copy, separate master shard
      m.params += full * c;
      m.optimizer += 3 * shard * 4;
    }
    m.grads += (p.stage == 1 ? full : shard) * 4;
  }
  return m;
}

// ---- Gatherer ------------------------------------------------------------------------------------
struct ZeroGatherer::Pending {
  Tensor full;  // [S * dp]
  std::unique_ptr<Event> ready;  // compute stream: the shard is current
  std::unique_ptr<Event> done;   // comm stream: gathered
};

ZeroGatherer::ZeroGatherer(Communicator& comm, Device device, size_t num_units) : comm_(&comm), device_(device) {
  pending_.resize(num_units);
  if (device_.is_cuda()) {
    comm_stream_ = Stream::create(device_);
  }
}

ZeroGatherer::~ZeroGatherer() = default;

bool ZeroGatherer::in_flight(size_t unit) const { return pending_.at(unit) != nullptr; }

void ZeroGatherer::start(size_t unit, const Tensor& shard, const Stream& compute) {
  HELIX_CHECK(unit < pending_.size(), "ZeroGatherer: unit {} of {}", unit, pending_.size());
  if (pending_[unit]) return;
  auto p = std::make_unique<Pending>();
  const int dp = comm_->size();
  if (device_.is_cuda()) {
    p->ready = std::make_unique<Event>(device_);
    p->done = std::make_unique<Event>(device_);
    p->ready->record(compute);
    p->ready->wait(comm_stream_);
    p->full = Tensor::empty({shard.numel() * dp}, shard.dtype(), device_, comm_stream_);
    comm_->all_gather(shard, p->full, comm_stream_);
    p->done->record(comm_stream_);
  } else {
    p->full = Tensor::empty({shard.numel() * dp}, shard.dtype(), device_);
    comm_->all_gather(shard, p->full, compute);
  }
  pending_[unit] = std::move(p);
}

void ZeroGatherer::order_after_in_flight(const Stream& compute) const {
  for (const auto& p : pending_)
    if (p && p->done) p->done->wait(compute);
}

Tensor ZeroGatherer::wait(size_t unit, const Tensor& shard, const Stream& compute) {
  start(unit, shard, compute);
  std::unique_ptr<Pending> p = std::move(pending_[unit]);
  if (p->done) p->done->wait(compute);
  return p->full;
}

}  // namespace helix
