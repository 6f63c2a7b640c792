#include "parallel/pipeline_schedule.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <tuple>

#include "core/error.h"

namespace helix {

std::string pipeline_action_kind_name(PipelineActionKind kind) {
  switch (kind) {
    case PipelineActionKind::kForward:
      return "F";
    case PipelineActionKind::kBackward:
      return "B";
    case PipelineActionKind::kRecvActivation:
      return "recv_act";
    case PipelineActionKind::kSendActivation:
      return "send_act";
    case PipelineActionKind::kRecvGrad:
      return "recv_grad";
    case PipelineActionKind::kSendGrad:
      return "send_grad";
  }
  return "?";
}

std::string PipelineAction::str() const {
  std::string s = pipeline_action_kind_name(kind) + "(" + std::to_string(micro_batch) + "," +
                  std::to_string(chunk) + ")";
  if (peer >= 0) {
    const bool send =
        kind == PipelineActionKind::kSendActivation || kind == PipelineActionKind::kSendGrad;
    s += (send ? "->" : "<-") + std::to_string(peer);
  }
  return s;
}

void validate_pipeline_schedule(const PipelineScheduleParams& p) {
  HELIX_CHECK(p.stages >= 1, "--pp: expected >= 1, got {}", p.stages);
  HELIX_CHECK(p.virtual_stages >= 1, "--pp-virtual: expected >= 1, got {}", p.virtual_stages);
  HELIX_CHECK(p.micro_batches >= 1, "--micro-batches: expected >= 1, got {}", p.micro_batches);
  HELIX_CHECK(p.virtual_stages == 1 || p.stages > 1,
              "--pp-virtual {}: interleaving needs --pp > 1, got --pp {}", p.virtual_stages,
              p.stages);
  HELIX_CHECK(
      p.virtual_stages == 1 || p.forward_only || p.micro_batches % p.stages == 0,
      "--micro-batches {}: the interleaved schedule (--pp-virtual {}) needs a multiple of --pp {}",
      p.micro_batches, p.virtual_stages, p.stages);
}

std::vector<PipelineAction> pipeline_compute_order(const PipelineScheduleParams& p, int rank) {
  validate_pipeline_schedule(p);
  HELIX_CHECK(rank >= 0 && rank < p.stages, "pipeline schedule: expected a rank in [0, {}), got {}",
              p.stages, rank);
  const int n = p.stages, v = p.virtual_stages, m = p.micro_batches;
  std::vector<PipelineAction> out;
  const auto fwd = [&](int mb, int chunk) {
    out.push_back({PipelineActionKind::kForward, mb, chunk, -1});
  };
  if (p.forward_only) {  // chunk by chunk, micro-batches in order
    for (int c = 0; c < v; ++c)
      for (int mb = 0; mb < m; ++mb) fwd(mb, c);
    return out;
  }
  const int total = m * v;
  const auto mb_of = [&](int k) { return (k / (n * v)) * n + k % n; };
  const auto f = [&](int k) { fwd(mb_of(k), (k / n) % v); };
  const auto b = [&](int k) {
    out.push_back({PipelineActionKind::kBackward, mb_of(k), v - 1 - (k / n) % v, -1});
  };
  int warmup = 0;
  if (v == 1)
    warmup = std::min(n - 1 - rank, m);
  else if (m == n)
    warmup = total;
  else
    warmup = std::min((n - 1 - rank) * 2 + (v - 1) * n, total);
  for (int k = 0; k < warmup; ++k) f(k);
  for (int i = 0; i < total - warmup; ++i) {
    f(warmup + i);
    b(i);
  }
  for (int k = total - warmup; k < total; ++k) b(k);
  return out;
}

namespace {

// Start and end time of every compute of every rank under `costs` (list scheduling: each rank runs
// its order; a compute starts when the rank is free and its input is ready).
struct Timing {
  std::vector<std::vector<PipelineAction>> order;  // [rank]
  std::vector<std::vector<double>> start, end;     // [rank][index in order]
  std::vector<double> f_end, b_end;                // [mb * N*V + virtual stage], -1 unknown
};

Timing simulate(const PipelineScheduleParams& p, const PipelineCosts& costs) {
  const int n = p.stages, nv = p.stages * p.virtual_stages, m = p.micro_batches;
  HELIX_CHECK(costs.stage_weight.empty() || static_cast<int>(costs.stage_weight.size()) == nv,
              "pipeline costs: expected {} stage weights, got {}", nv, costs.stage_weight.size());
  Timing t;
  t.f_end.assign(static_cast<size_t>(m) * nv, -1);
  t.b_end.assign(static_cast<size_t>(m) * nv, -1);
  std::vector<size_t> pos(n, 0);
  std::vector<double> free(n, 0);
  size_t left = 0;
  for (int r = 0; r < n; ++r) {
    t.order.push_back(pipeline_compute_order(p, r));
    t.start.emplace_back(t.order.back().size(), 0.0);
    t.end.emplace_back(t.order.back().size(), 0.0);
    left += t.order.back().size();
  }
  const auto at = [&](int mb, int vs) { return static_cast<size_t>(mb) * nv + vs; };
  bool progress = true;
  while (left > 0 && progress) {
    progress = false;
    for (int r = 0; r < n; ++r) {
      while (pos[r] < t.order[r].size()) {
        const PipelineAction& a = t.order[r][pos[r]];
        const int vs = a.chunk * n + r;
        const bool fw = a.kind == PipelineActionKind::kForward;
        double ready = 0;
        if (fw && vs > 0) ready = t.f_end[at(a.micro_batch, vs - 1)];
        if (!fw)
          ready =
              vs == nv - 1 ? t.f_end[at(a.micro_batch, vs)] : t.b_end[at(a.micro_batch, vs + 1)];
        if (ready < 0) break;  // input not produced yet
        const double w = costs.stage_weight.empty() ? 1.0 : costs.stage_weight[vs];
        const double s = std::max(free[r], ready),
                     e = s + w * (fw ? costs.forward : costs.backward);
        t.start[r][pos[r]] = s;
        t.end[r][pos[r]] = e;
        (fw ? t.f_end : t.b_end)[at(a.micro_batch, vs)] = e;
        free[r] = e;
        ++pos[r];
        --left;
        progress = true;
      }
    }
  }
  HELIX_CHECK(
      left == 0,
      "pipeline schedule (pp {}, virtual {}, micro-batches {}): the compute order deadlocks",
      p.stages, p.virtual_stages, p.micro_batches);
  return t;
}

}  // namespace

std::vector<PipelineAction> pipeline_schedule(const PipelineScheduleParams& p, int rank,
                                              const PipelineCosts& costs) {
  const int n = p.stages, nv = p.stages * p.virtual_stages;
  const Timing t = simulate(p, costs);
  // Sort key: (time, 0 = message before 1 = compute, message kind, producing virtual stage, mb).
  using Key = std::tuple<double, int, int, int, int>;
  std::vector<std::pair<Key, PipelineAction>> items;
  for (int r = 0; r < n; ++r)
    for (size_t i = 0; i < t.order[r].size(); ++i) {
      const PipelineAction& a = t.order[r][i];
      const int vs = a.chunk * n + r;
      const bool fw = a.kind == PipelineActionKind::kForward;
      if (r == rank) items.push_back({Key{t.start[r][i], 1, 0, 0, static_cast<int>(i)}, a});
      const int to = fw ? vs + 1 : vs - 1;  // the message this compute produces, if any
      if (to < 0 || to >= nv) continue;
      const int src = vs % n, dst = to % n;
      if (src != rank && dst != rank) continue;
      const Key key{t.end[r][i], 0, fw ? 0 : 1, vs, a.micro_batch};
      PipelineAction c;
      c.micro_batch = a.micro_batch;
      if (src == rank)  // this rank sends (a send to itself cannot happen: n > 1 when nv > 1)
        items.push_back({key,
                         {fw ? PipelineActionKind::kSendActivation : PipelineActionKind::kSendGrad,
                          a.micro_batch, vs / n, dst}});
      if (dst == rank)
        items.push_back({key,
                         {fw ? PipelineActionKind::kRecvActivation : PipelineActionKind::kRecvGrad,
                          a.micro_batch, to / n, src}});
    }
  std::stable_sort(items.begin(), items.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<PipelineAction> out;
  for (const auto& [k, a] : items) out.push_back(a);
  return out;
}

double PipelineTimeline::bubble_fraction() const {
  if (busy.empty() || makespan <= 0) return 0;
  double idle_sum = 0;
  for (double i : idle) idle_sum += i;
  return idle_sum / (static_cast<double>(busy.size()) * makespan);
}

PipelineTimeline simulate_pipeline(const PipelineScheduleParams& p, const PipelineCosts& costs) {
  const Timing t = simulate(p, costs);
  PipelineTimeline out;
  out.busy.assign(p.stages, 0);
  for (int r = 0; r < p.stages; ++r)
    for (size_t i = 0; i < t.order[r].size(); ++i) {
      out.busy[r] += t.end[r][i] - t.start[r][i];
      out.makespan = std::max(out.makespan, t.end[r][i]);
    }
  for (double b : out.busy) out.idle.push_back(out.makespan - b);
  return out;
}

namespace {
bool is_send(const PipelineAction& a) {
  return a.kind == PipelineActionKind::kSendActivation || a.kind == PipelineActionKind::kSendGrad;
}
bool is_recv(const PipelineAction& a) {
  return a.kind == PipelineActionKind::kRecvActivation || a.kind == PipelineActionKind::kRecvGrad;
}
}  // namespace

PipelineTimeline simulate_pipeline_execution(const PipelineScheduleParams& p,
                                             const PipelineCosts& costs) {
  const int n = p.stages;
  (void)simulate(p, costs);  // validates the costs
  std::vector<std::vector<PipelineAction>> lists;
  for (int r = 0; r < n; ++r) lists.push_back(pipeline_schedule(p, r, costs));
  // A message is identified by (kind: 0 activation / 1 gradient, producing virtual stage, mb);
  // the value is the time its send was posted.
  using Msg = std::tuple<int, int, int>;
  const auto msg_of = [n](int r, const PipelineAction& a) -> Msg {
    const int vs = a.chunk * n + r;
    switch (a.kind) {
      case PipelineActionKind::kSendActivation:
        return {0, vs, a.micro_batch};
      case PipelineActionKind::kRecvActivation:
        return {0, vs - 1, a.micro_batch};
      case PipelineActionKind::kSendGrad:
        return {1, vs, a.micro_batch};
      default:
        return {1, vs + 1, a.micro_batch};
    }
  };
  std::map<Msg, double> sent;
  std::vector<size_t> pos(n, 0);
  std::vector<double> now(n, 0.0);
  PipelineTimeline out;
  out.busy.assign(n, 0);
  bool progress = true;
  while (progress) {
    progress = false;
    for (int r = 0; r < n; ++r) {
      while (pos[r] < lists[r].size()) {
        const PipelineAction& a = lists[r][pos[r]];
        if (is_send(a)) {  // posted; never waits
          sent[msg_of(r, a)] = now[r];
        } else if (is_recv(a)) {  // waits until the sender has posted
          const auto it = sent.find(msg_of(r, a));
          if (it == sent.end()) break;
          now[r] = std::max(now[r], it->second);
        } else {
          const int vs = a.chunk * n + r;
          const double w = costs.stage_weight.empty() ? 1.0 : costs.stage_weight[vs];
          const double c =
              w * (a.kind == PipelineActionKind::kForward ? costs.forward : costs.backward);
          now[r] += c;
          out.busy[r] += c;
        }
        ++pos[r];
        progress = true;
      }
    }
  }
  for (int r = 0; r < n; ++r)
    HELIX_CHECK(pos[r] == lists[r].size(), "pipeline execution model: rank {} blocked at {}", r,
                lists[r][pos[r]].str());
  for (double t : now) out.makespan = std::max(out.makespan, t);
  for (double b : out.busy) out.idle.push_back(out.makespan - b);
  return out;
}

double pipeline_bubble_fraction(const PipelineScheduleParams& p, const PipelineCosts& costs) {
  return simulate_pipeline(p, costs).bubble_fraction();
}

double pipeline_executor_bubble_fraction(const PipelineScheduleParams& p,
                                         const PipelineCosts& costs) {
  return simulate_pipeline_execution(p, costs).bubble_fraction();
}

std::vector<int> balanced_layer_split(const LayerSplitParams& p) {
  HELIX_CHECK(p.parts >= 1, "layer split: expected >= 1 parts, got {}", p.parts);
  HELIX_CHECK(p.layers >= p.parts,
              "--pp: {} layers cannot fill {} pipeline stages (at least one layer each)", p.layers,
              p.parts);
  HELIX_CHECK(p.first_extra >= 0 && p.last_extra >= 0,
              "layer split: expected non-negative extra costs");
  const auto extra = [&](int j) {
    return (j == 0 ? p.first_extra : 0.0) + (j == p.parts - 1 ? p.last_extra : 0.0);
  };
  // Candidate bounds: the cost of some part, i.e. k layers plus the extras a part can carry.
  std::vector<double> bounds;
  for (int k = 1; k <= p.layers; ++k)
    for (double e : {0.0, p.first_extra, p.last_extra, p.first_extra + p.last_extra})
      bounds.push_back(k + e);
  std::sort(bounds.begin(), bounds.end());
  const int parts = p.parts, layers = p.layers;
  const double inf = std::numeric_limits<double>::infinity();
  for (double bound : bounds) {
    // g[j][l]: least sum of squared part costs of parts j.. holding the last l layers, every part
    // within `bound` (inf: impossible). Then walk forward taking the most layers that stay optimal.
    std::vector<std::vector<double>> g(parts + 1, std::vector<double>(layers + 1, inf));
    g[parts][0] = 0;
    for (int j = parts - 1; j >= 0; --j)
      for (int l = 1; l <= layers; ++l)
        for (int take = 1; take <= l; ++take) {
          const double cost = take + extra(j);
          if (cost > bound + 1e-9 || g[j + 1][l - take] == inf) continue;
          g[j][l] = std::min(g[j][l], cost * cost + g[j + 1][l - take]);
        }
    if (g[0][layers] == inf) continue;
    std::vector<int> split;
    int left = layers;
    for (int j = 0; j < parts; ++j)
      for (int take = left; take >= 1; --take) {
        const double cost = take + extra(j);
        if (cost > bound + 1e-9 || g[j + 1][left - take] == inf) continue;
        if (std::abs(cost * cost + g[j + 1][left - take] - g[j][left]) > 1e-9 * (1 + g[j][left]))
          continue;
        split.push_back(take);
        left -= take;
        break;
      }
    return split;
  }
  HELIX_FAIL("layer split: no split of {} layers into {} parts", p.layers, p.parts);
}

void validate_layer_split(const std::vector<int>& split, int layers, int parts) {
  HELIX_CHECK(static_cast<int>(split.size()) == parts,
              "--pp-layers: expected {} entries (--pp x --pp-virtual), got {}", parts,
              split.size());
  int sum = 0;
  for (int s : split) {
    HELIX_CHECK(s >= 1, "--pp-layers: expected every stage to hold >= 1 layer, got {}", s);
    sum += s;
  }
  HELIX_CHECK(sum == layers,
              "--pp-layers: expected the entries to sum to the model's {} layers, got {}", layers,
              sum);
}

// ---- Executor ----------------------------------------------------------------------------------

PipelineRunStats run_pipeline_actions(const std::vector<PipelineAction>& actions, Communicator& pp,
                                      const PipelineCallbacks& cb, const Stream& stream) {
  using Clock = std::chrono::steady_clock;
  using Slot = std::pair<int, int>;  // (micro-batch, chunk)
  std::map<Slot, Tensor> act_in, act_out, grad_in,
      grad_out;  // grad_in: of an input (sent upstream)
  PipelineRunStats st;
  const auto t0 = Clock::now();
  const auto take = [](std::map<Slot, Tensor>& m, const Slot& s) {
    auto it = m.find(s);
    if (it == m.end()) return Tensor();
    Tensor t = std::move(it->second);
    m.erase(it);
    return t;
  };
  const auto secs = [](Clock::time_point a) {
    return std::chrono::duration<double>(Clock::now() - a).count();
  };
  std::vector<std::unique_ptr<PendingSend>> sends;  // posted; completed at the end
  for (const PipelineAction& a : actions) {
    const Slot s{a.micro_batch, a.chunk};
    const auto t = Clock::now();
    if (is_send(a)) {
      Tensor out = take(a.kind == PipelineActionKind::kSendActivation ? act_out : grad_in, s);
      HELIX_CHECK(out.defined(), "pipeline: {} before its compute produced the tensor", a.str());
      sends.push_back(pp.isend(out, a.peer, stream));
      if (cb.after_comm) cb.after_comm();
      st.comm_s += secs(t);
      ++st.messages;
    } else if (is_recv(a)) {
      Tensor buf = cb.make_buffer(a.micro_batch, a.chunk);
      pp.recv(buf, a.peer, stream);
      if (cb.after_comm) cb.after_comm();
      (a.kind == PipelineActionKind::kRecvActivation ? act_in : grad_out)[s] = buf;
      st.comm_s += secs(t);
      ++st.messages;
    } else if (a.kind == PipelineActionKind::kForward) {
      Tensor out = cb.forward(a.micro_batch, a.chunk, take(act_in, s));
      if (out.defined()) act_out[s] = out;
      st.forward_s += secs(t);
      st.compute_s += secs(t);
    } else {
      Tensor g = cb.backward(a.micro_batch, a.chunk, take(grad_out, s));
      if (g.defined()) grad_in[s] = g;
      st.backward_s += secs(t);
      st.compute_s += secs(t);
    }
  }
  const auto t_wait = Clock::now();
  for (auto& p : sends) p->wait();
  if (cb.after_comm) cb.after_comm();
  st.comm_s += secs(t_wait);
  HELIX_CHECK(act_in.empty() && act_out.empty() && grad_in.empty() && grad_out.empty(),
              "pipeline: the action list left {} tensors unsent or unused",
              act_in.size() + act_out.size() + grad_in.size() + grad_out.size());
  st.total_s = secs(t0);
  return st;
}

}  // namespace helix
