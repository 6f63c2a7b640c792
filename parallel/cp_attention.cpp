// Attention under context parallelism (see cp_attention.h and docs/context-parallel.md).
#include "parallel/cp_attention.h"

#include <algorithm>
#include <memory>

#include "core/error.h"
#include "kernels/axpy/axpy.h"

namespace helix {

std::string_view cp_comm_name(CpComm c) { return c == CpComm::kRing ? "ring" : "all-gather"; }

CpComm parse_cp_comm(const std::string& s) {
  if (s == "ring") return CpComm::kRing;
  if (s == "all-gather") return CpComm::kAllGather;
  HELIX_FAIL("--cp-comm: expected all-gather or ring, got '{}'", s);
}

CpBatch CpBatch::to(Device device) const {
  CpBatch b = *this;
  b.global = global.to(device);
  b.local = local.to(device);
  return b;
}

CpBatch cp_split_batch(const ThdBatch& global, int cp, int rank, const CpShardOptions& opt) {
  CpShardOptions o = opt;
  if (o.split_min_len > 0) {
    // Every rank must hold a row: placement of fewer whole sequences than ranks (and nothing to
    // split) would leave one empty.
    const std::vector<int> owner = cp_place_sequences(global, cp, o);
    std::vector<bool> has(static_cast<size_t>(cp), false);
    bool any_split = false;
    for (int w : owner) {
      if (w < 0)
        any_split = true;
      else
        has[static_cast<size_t>(w)] = true;
    }
    if (!any_split && std::find(has.begin(), has.end(), false) != has.end()) o.split_min_len = 0;
  }
  CpBatch b;
  b.global = global;
  b.rank = rank;
  for (int r = 0; r < cp; ++r) {
    CpShard s = cp_shard_batch(global, cp, r, o);
    if (r == rank) b.local = std::move(s.batch);
    b.layouts.push_back(std::move(s.layout));
  }
  return b;
}

// ---- Plan
// ----------------------------------------------------------------------------------------
namespace {

struct SplitRows {
  int32_t seq = 0;     // global sequence index
  int64_t offset = 0;  // first local row of the sequence on its rank
  int32_t slot = 0;    // local rows of the sequence (2 chunks)
  int32_t real = 0;    // real tokens among them (a prefix)
};

int32_t real_in(int32_t begin, int32_t end, int32_t len) {
  return std::clamp(len - begin, 0, end - begin);
}

std::vector<SplitRows> split_rows_of(const CpLayout& L, int64_t* local_rows) {
  std::vector<SplitRows> out;
  int64_t off = 0;
  for (size_t k = 0; k < L.seq_index.size(); ++k) {
    const int32_t slot =
        (L.chunk0_end[k] - L.chunk0_begin[k]) + (L.chunk1_end[k] - L.chunk1_begin[k]);
    if (L.split[k]) {
      const int32_t real = real_in(L.chunk0_begin[k], L.chunk0_end[k], L.global_len[k]) +
                           real_in(L.chunk1_begin[k], L.chunk1_end[k], L.global_len[k]);
      out.push_back({L.seq_index[k], off, slot, real});
    }
    off += slot;
  }
  *local_rows = off;
  return out;
}

}  // namespace

std::shared_ptr<const CpAttentionPlan> make_cp_attention_plan(const std::vector<CpLayout>& layouts,
                                                              int rank, CpComm comm,
                                                              Device device) {
  const int cp = static_cast<int>(layouts.size());
  HELIX_CHECK(cp >= 1 && rank >= 0 && rank < cp,
              "cp attention plan: expected 0 <= rank < {} layouts, got rank {}", cp, rank);
  auto plan = std::make_shared<CpAttentionPlan>();
  plan->cp = cp;
  plan->rank = rank;
  plan->comm = comm;
  std::vector<std::vector<SplitRows>> rows(static_cast<size_t>(cp));
  for (int s = 0; s < cp; ++s) {
    HELIX_CHECK(layouts[s].cp == cp && layouts[s].rank == s,
                "cp attention plan: expected layout {} of rank {} with cp {}, got rank {} cp {}", s,
                s, cp, layouts[s].rank, layouts[s].cp);
    int64_t lr = 0;
    rows[s] = split_rows_of(layouts[s], &lr);
    if (s == rank) plan->local_rows = lr;
  }
  const std::vector<SplitRows>& mine = rows[static_cast<size_t>(rank)];
  plan->num_split = static_cast<int>(mine.size());
  for (int s = 0; s < cp; ++s) {
    HELIX_CHECK(rows[s].size() == mine.size(),
                "cp attention plan: rank {} holds {} split sequences, rank {} holds {}", s,
                rows[s].size(), rank, mine.size());
    for (size_t j = 0; j < mine.size(); ++j) {
      HELIX_CHECK(rows[s][j].seq == mine[j].seq && rows[s][j].slot == mine[j].slot,
                  "cp attention plan: split sequence {} differs between ranks {} and {}", j, s,
                  rank);
    }
  }
  for (const SplitRows& r : mine) {
    if (!plan->runs.empty() && plan->runs.back().second == r.offset)
      plan->runs.back().second += r.slot;
    else
      plan->runs.emplace_back(r.offset, r.offset + r.slot);
    plan->block_rows += r.slot;
  }
  plan->remote.resize(static_cast<size_t>(cp));
  if (mine.empty() || cp == 1) return plan;
  if (device.is_cuda()) plan->comm_stream = Stream::create(device);
  // Queries: a leading empty sequence spanning rows [0, first offset), then the split sequences at
  // their local offsets (the whole sequences between them are gaps: no query there).
  std::vector<int32_t> q_cu{0, 0}, q_pad{0, static_cast<int32_t>(mine[0].offset)};
  int max_q = 1;
  for (const SplitRows& r : mine) {
    q_cu.push_back(q_cu.back() + r.real);
    q_pad.push_back(static_cast<int32_t>(r.offset + r.slot));
    max_q = std::max(max_q, static_cast<int>(r.real));
  }
  for (size_t j = 0; j + 1 < mine.size(); ++j)
    q_pad[j + 2] = static_cast<int32_t>(mine[j + 1].offset);
  const CuSeqlens cu_q = CuSeqlens::make(q_cu, device), pad_q = CuSeqlens::make(q_pad, device);
  for (int s = 0; s < cp; ++s) {
    if (s == rank) continue;
    std::vector<int32_t> kv_cu{0, 0}, kv_pad{0, 0};
    int max_kv = 1;
    for (const SplitRows& r : rows[s]) {
      kv_cu.push_back(kv_cu.back() + r.real);
      kv_pad.push_back(kv_pad.back() + r.slot);
      max_kv = std::max(max_kv, static_cast<int>(r.real));
    }
    ThdAttentionLayout& L = plan->remote[static_cast<size_t>(s)];
    L.cu_seqlens_q = cu_q;
    L.cu_seqlens_q_padded = pad_q;
    L.cu_seqlens_kv = CuSeqlens::make(kv_cu, device);
    L.cu_seqlens_kv_padded = CuSeqlens::make(kv_pad, device);
    L.max_seqlen_q = max_q;
    L.max_seqlen_kv = max_kv;
  }
  return plan;
}

CpAttentionBytes cp_attention_bytes(const CpAttentionPlan& plan, int64_t heads, int64_t head_dim,
                                    int64_t elem_bytes) {
  const int64_t block = 2 * plan.block_rows * heads * head_dim * elem_bytes;  // K and V
  CpAttentionBytes b;
  if (plan.num_split == 0) return b;
  b.fwd = (plan.cp - 1) * block;
  b.bwd = 2 * (plan.cp - 1) * block;
  return b;
}

// ---- Forward and backward
// ------------------------------------------------------------------------
namespace {

void check_params(const Communicator* comm, const CpAttentionPlan* plan, const Tensor& q) {
  HELIX_CHECK(comm && plan, "cp attention: expected a communicator and a plan");
  HELIX_CHECK(comm->size() == plan->cp && comm->rank() == plan->rank,
              "cp attention: expected the cp group of the plan (size {}, rank {}), got {}",
              plan->cp, plan->rank, comm->describe());
  HELIX_CHECK(q.defined() && q.ndim() == 3 && q.dim(0) >= plan->local_rows,
              "cp attention: expected q [T >= {}, H, D] (the rank's layout rows), got {}",
              plan->local_rows, q.defined() ? q.str() : std::string("undefined"));
}

// dst [2R, H, D] = (rows of k in the plan's runs; the same rows of v).
void pack_block(const CpAttentionPlan& plan, const Tensor& k, const Tensor& v, const Tensor& dst,
                const Stream& stream) {
  const int64_t R = plan.block_rows;
  int64_t at = 0;
  for (const auto& [b, e] : plan.runs) {
    Tensor dk = dst.slice(at, at + (e - b));
    dk.copy_from(k.slice(b, e), stream);
    Tensor dv = dst.slice(R + at, R + at + (e - b));
    dv.copy_from(v.slice(b, e), stream);
    at += e - b;
  }
}

// d_k, d_v rows in the plan's runs += the two halves of src [2R, H, D].
void unpack_add(const CpAttentionPlan& plan, const Tensor& src, const Tensor& d_k,
                const Tensor& d_v, const Stream& stream) {
  const int64_t R = plan.block_rows;
  int64_t at = 0;
  for (const auto& [b, e] : plan.runs) {
    axpy(1.0f, src.slice(at, at + (e - b)), d_k.slice(b, e), stream);
    axpy(1.0f, src.slice(R + at, R + at + (e - b)), d_v.slice(b, e), stream);
    at += e - b;
  }
}

int mod(int a, int n) { return ((a % n) + n) % n; }

// Transfers run on the plan's comm stream when the communicator enqueues on streams (NCCL on a
// GPU), overlapped with compute; the MPI backend blocks the host, so there they run on the compute
// stream, one after the other.
bool use_comm_stream(const CpAttentionPlan& plan, const Communicator& comm, Device dev) {
  return dev.is_cuda() && comm.backend_name() == "nccl" && plan.comm_stream.device() == dev;
}

// Makes `waiter` wait for the work enqueued on `on` so far.
void order_after(const Stream& on, const Stream& waiter, Device dev) {
  Event e(dev);
  e.record(on);
  e.wait(waiter);
}

// Partial outputs merged up to kMaxLseMergeParts at a time.
class PartMerger {
 public:
  void add(Tensor o, Tensor lse, const Stream& stream) {
    outs_.push_back(std::move(o));
    lses_.push_back(std::move(lse));
    if (static_cast<int>(outs_.size()) == kMaxLseMergeParts) {
      Tensor mo = Tensor::empty(outs_[0].shape(), outs_[0].dtype(), outs_[0].device(), stream);
      Tensor ml = Tensor::empty(lses_[0].shape(), DType::kF32, lses_[0].device(), stream);
      lse_merge_fwd(LseMergeFwdParams{.outs = outs_, .lses = lses_, .out = mo, .lse = ml}, stream);
      outs_ = {mo};
      lses_ = {ml};
    }
  }
  void finish(const Tensor& out, const Tensor& lse, const Stream& stream) {
    lse_merge_fwd(LseMergeFwdParams{.outs = outs_, .lses = lses_, .out = out, .lse = lse}, stream);
  }

 private:
  std::vector<Tensor> outs_, lses_;
};

}  // namespace

void cp_attention_fwd(const CpAttentionFwdParams& p, const Stream& stream) {
  check_params(p.comm, p.plan, p.q);
  const CpAttentionPlan& plan = *p.plan;
  const int cp = plan.cp, r = plan.rank;
  const Device dev = p.q.device();
  ThdAttentionFwdParams a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.layout = p.local;
  a.softmax_scale = p.softmax_scale;
  if (cp == 1 || plan.num_split == 0) {  // every key is local
    a.o = p.o;
    a.lse = p.lse;
    thd_attention_fwd(a, stream);
    return;
  }
  const int64_t T = p.q.dim(0), H = p.q.dim(1), D = p.q.dim(2), R = plan.block_rows;
  const Shape block_shape{2 * R, H, D};
  Tensor own = Tensor::empty(block_shape, p.k.dtype(), dev, stream);
  pack_block(plan, p.k, p.v, own, stream);
  PartMerger merger;
  const auto partial = [&](int s, const Tensor& block) {
    ThdAttentionFwdParams b = a;
    b.k = block.slice(0, R);
    b.v = block.slice(R, 2 * R);
    b.layout = plan.remote[static_cast<size_t>(s)];
    b.o = Tensor::empty({T, H, D}, p.q.dtype(), dev, stream);
    b.lse = Tensor::empty({H, T}, DType::kF32, dev, stream);
    thd_attention_fwd(b, stream);
    merger.add(b.o, b.lse, stream);
  };
  const auto local = [&] {
    a.o = Tensor::empty({T, H, D}, p.q.dtype(), dev, stream);
    a.lse = Tensor::empty({H, T}, DType::kF32, dev, stream);
    thd_attention_fwd(a, stream);
    merger.add(a.o, a.lse, stream);
  };
  const bool separate = use_comm_stream(plan, *p.comm, dev);
  const Stream cs = separate ? plan.comm_stream : stream;
  if (plan.comm == CpComm::kAllGather) {
    // The gather runs while the local attention computes.
    Tensor all = Tensor::empty({cp * 2 * R, H, D}, p.k.dtype(), dev, stream);
    if (separate) order_after(stream, cs, dev);
    p.comm->all_gather(own, all, cs);
    local();
    if (separate) order_after(cs, stream, dev);
    for (int s = 0; s < cp; ++s)
      if (s != r) partial(s, all.slice(s * 2 * R, (s + 1) * 2 * R));
  } else {
    // blocks[j] = the block of rank (r - j) mod cp, received from the previous rank while block
    // j - 1 goes to the next; block j + 1 is in flight while block j is computed on.
    std::vector<Tensor> blocks(static_cast<size_t>(cp));
    std::vector<std::unique_ptr<Event>> arrived(static_cast<size_t>(cp));
    blocks[0] = own;
    // Every block is allocated on the compute stream before the comm stream starts (it waits for
    // the compute stream here, so memory the allocator hands out is free on both streams); they
    // are freed only after the compute stream has waited for the last transfer.
    for (int j = 1; j < cp; ++j) blocks[j] = Tensor::empty(block_shape, p.k.dtype(), dev, stream);
    if (separate) order_after(stream, cs, dev);
    const auto post = [&](int j) {
      p.comm->send_recv(SendRecvParams{.send = blocks[j - 1],
                                       .dst = mod(r + 1, cp),
                                       .recv = blocks[j],
                                       .src = mod(r - 1, cp)},
                        cs);
      if (separate) {
        arrived[j] = std::make_unique<Event>(dev);
        arrived[j]->record(cs);
      }
    };
    post(1);
    local();
    for (int j = 1; j < cp; ++j) {
      if (j + 1 < cp) post(j + 1);
      if (separate) arrived[j]->wait(stream);
      partial(mod(r - j, cp), blocks[j]);
    }
    if (separate) order_after(cs, stream, dev);
  }
  merger.finish(p.o, p.lse, stream);
}

void cp_attention_bwd(const CpAttentionBwdParams& p, const Stream& stream) {
  check_params(p.comm, p.plan, p.q);
  const CpAttentionPlan& plan = *p.plan;
  const int cp = plan.cp, r = plan.rank;
  const Device dev = p.q.device();
  ThdAttentionBwdParams a;
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.o = p.o;
  a.d_o = p.d_o;
  a.lse = p.lse;
  a.layout = p.local;
  a.softmax_scale = p.softmax_scale;
  a.mode = p.mode;
  a.d_q = p.d_q;
  a.d_k = p.d_k;
  a.d_v = p.d_v;
  // Local keys (every local sequence) with the final O and LSE: the exact share of these keys.
  const auto local = [&] { thd_attention_bwd(a, stream); };
  if (cp == 1 || plan.num_split == 0) return local();
  const int64_t T = p.q.dim(0), H = p.q.dim(1), D = p.q.dim(2), R = plan.block_rows;
  const DType dt = p.k.dtype();
  const bool separate = use_comm_stream(plan, *p.comm, dev);
  const Stream cs = separate ? plan.comm_stream : stream;
  Tensor own = Tensor::empty({2 * R, H, D}, dt, dev, stream);
  pack_block(plan, p.k, p.v, own, stream);
  Tensor dq = Tensor::empty({T, H, D}, p.q.dtype(), dev, stream);
  // Block `block` of rank s: this rank's queries' dQ (added to d_q) and the block's dK/dV (written
  // into `dkv` [2R, H, D]).
  const auto contribute = [&](int s, const Tensor& block, const Tensor& dkv) {
    ThdAttentionBwdParams b = a;
    b.k = block.slice(0, R);
    b.v = block.slice(R, 2 * R);
    b.layout = plan.remote[static_cast<size_t>(s)];
    b.d_q = dq;
    b.d_k = dkv.slice(0, R);
    b.d_v = dkv.slice(R, 2 * R);
    thd_attention_bwd(b, stream);
    axpy(1.0f, dq, p.d_q, stream);
  };
  if (plan.comm == CpComm::kAllGather) {
    Tensor all = Tensor::empty({cp * 2 * R, H, D}, dt, dev, stream);
    if (separate) order_after(stream, cs, dev);
    p.comm->all_gather(own, all, cs);  // runs while the local backward computes
    local();
    if (separate) order_after(cs, stream, dev);
    Tensor dall = Tensor::empty({cp * 2 * R, H, D}, dt, dev, stream);
    Tensor mine_slot = dall.slice(r * 2 * R, (r + 1) * 2 * R);
    mine_slot.zero(stream);
    for (int s = 0; s < cp; ++s)
      if (s != r)
        contribute(s, all.slice(s * 2 * R, (s + 1) * 2 * R),
                   dall.slice(s * 2 * R, (s + 1) * 2 * R));
    Tensor mine = Tensor::empty({2 * R, H, D}, dt, dev, stream);
    p.comm->reduce_scatter(dall, mine, ReduceOp::kSum, stream);
    unpack_add(plan, mine, p.d_k, p.d_v, stream);
    return;
  }
  // Ring: K/V blocks go around as in the forward (prefetched one step ahead on the comm stream
  // under NCCL); each block's dK/dV sum follows one step behind: kv[j] = the block of rank
  // (r - j), acc[j] = its dK/dV summed over the ranks it has visited, this one included. The last
  // transfer hands each sum to its owner.
  const int next = mod(r + 1, cp), prev = mod(r - 1, cp);
  std::vector<Tensor> kv(static_cast<size_t>(cp)), acc(static_cast<size_t>(cp));
  kv[0] = own;
  for (int j = 1; j < cp; ++j) {
    kv[j] = Tensor::empty({2 * R, H, D}, dt, dev, stream);
    acc[j] = Tensor::empty({2 * R, H, D}, dt, dev, stream);
  }
  Tensor contrib = Tensor::empty({2 * R, H, D}, dt, dev, stream);
  Tensor mine = Tensor::empty({2 * R, H, D}, dt, dev, stream);
  std::vector<std::unique_ptr<Event>> kv_in(static_cast<size_t>(cp)),
      acc_in(static_cast<size_t>(cp));
  const auto mark = [&](const Stream& on) {  // an event recorded on `on` (separate streams only)
    auto e = std::make_unique<Event>(dev);
    e->record(on);
    return e;
  };
  if (separate) mark(stream)->wait(cs);  // packed block and buffers ready
  const auto post_kv = [&](int j) {
    p.comm->send_recv(SendRecvParams{.send = kv[j - 1], .dst = next, .recv = kv[j], .src = prev},
                      cs);
    if (separate) kv_in[j] = mark(cs);
  };
  // Sends acc[j - 1] on (once computed) and receives acc[j] (or, j == cp, this rank's own sum).
  const auto post_acc = [&](int j, const Tensor& recv) {
    if (separate) mark(stream)->wait(cs);
    p.comm->send_recv(SendRecvParams{.send = acc[j - 1], .dst = next, .recv = recv, .src = prev},
                      cs);
    if (separate) acc_in[j < cp ? j : 0] = mark(cs);
  };
  post_kv(1);
  local();
  for (int j = 1; j < cp; ++j) {
    if (j + 1 < cp) post_kv(j + 1);
    if (separate) kv_in[j]->wait(stream);
    if (j == 1) {
      contribute(prev, kv[1], acc[1]);
    } else {
      contribute(mod(r - j, cp), kv[j], contrib);
      if (separate) acc_in[j]->wait(stream);
      axpy(1.0f, contrib, acc[j], stream);
    }
    post_acc(j + 1, j + 1 < cp ? acc[j + 1] : mine);
  }
  if (separate) acc_in[0]->wait(stream);
  unpack_add(plan, mine, p.d_k, p.d_v, stream);
}

}  // namespace helix
