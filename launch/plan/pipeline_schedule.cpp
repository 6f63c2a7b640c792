#include "launch/plan/pipeline_schedule.h"

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "core/log.h"

namespace helix {

std::string pipeline_shape_error(const PipelineShape& s) {
  if (s.stages < 1 || s.virtual_stages < 1 || s.micro_batches < 1)
    return fmt::format("expected --pp, --pp-virtual and --micro-batches >= 1, got {}, {}, {}",
                       s.stages, s.virtual_stages, s.micro_batches);
  if (s.virtual_stages > 1 && s.stages == 1) return "--pp-virtual > 1 needs --pp > 1";
  if (s.virtual_stages > 1 && s.micro_batches % s.stages != 0)
    return fmt::format("interleaved 1F1B needs --micro-batches ({}) divisible by --pp ({})",
                       s.micro_batches, s.stages);
  return "";
}

double pipeline_step_units(const PipelineShape& s) {
  return s.micro_batches + double(s.stages - 1) / s.virtual_stages;
}

double pipeline_bubble_fraction(const PipelineShape& s) {
  const double idle = double(s.stages - 1);
  return idle / (double(s.virtual_stages) * s.micro_batches + idle);
}

double pipeline_in_flight(const PipelineShape& s, int stage) {
  const int p = s.stages, v = s.virtual_stages, m = s.micro_batches;
  if (v == 1) return std::min(p - stage, m);
  const int chunks = std::min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v);
  return double(chunks) / v;
}

namespace {

struct Op {
  bool forward;
  int mb, chunk;
};

// The op order of stage `s` (Megatron-LM forward_backward_pipelining_{without,with}_interleaving).
std::vector<Op> stage_ops(const PipelineShape& sh, int s) {
  const int p = sh.stages, v = sh.virtual_stages, m = sh.micro_batches;
  std::vector<Op> ops;
  if (v == 1) {
    const int warm = std::min(p - s - 1, m);
    for (int i = 0; i < warm; ++i) ops.push_back({true, i, 0});
    for (int i = 0; i < m - warm; ++i) {
      ops.push_back({true, warm + i, 0});
      ops.push_back({false, i, 0});
    }
    for (int i = m - warm; i < m; ++i) ops.push_back({false, i, 0});
    return ops;
  }
  const int total = m * v;
  const auto fwd_op = [&](int k) { return Op{true, (k / (p * v)) * p + k % p, (k / p) % v}; };
  const auto bwd_op = [&](int k) {
    return Op{false, (k / (p * v)) * p + k % p, v - 1 - (k / p) % v};
  };
  const int warm = std::min((p - s - 1) * 2 + (v - 1) * p, total);
  for (int k = 0; k < warm; ++k) ops.push_back(fwd_op(k));
  for (int i = 0; i < total - warm; ++i) {
    ops.push_back(fwd_op(warm + i));
    ops.push_back(bwd_op(i));
  }
  for (int k = total - warm; k < total; ++k) ops.push_back(bwd_op(k));
  return ops;
}

}  // namespace

PipelineSimResult simulate_pipeline(const PipelineShape& sh, double tf, double tb) {
  const std::string err = pipeline_shape_error(sh);
  HELIX_CHECK(err.empty(), "simulate_pipeline: {}", err);
  const int p = sh.stages, v = sh.virtual_stages, m = sh.micro_batches, nv = p * v;
  const double cf = tf / v, cb = tb / v;
  // End times per (virtual stage, micro-batch); -1: not yet run.
  std::vector<double> fend(size_t(nv) * m, -1), bend(size_t(nv) * m, -1);
  std::vector<std::vector<Op>> ops(p);
  for (int s = 0; s < p; ++s) ops[s] = stage_ops(sh, s);
  std::vector<size_t> next(p, 0);
  std::vector<double> free_at(p, 0);
  std::vector<int> in_flight(p, 0), max_in_flight(p, 0);
  size_t left = 0;
  for (auto& o : ops) left += o.size();
  while (left > 0) {
    bool progress = false;
    for (int s = 0; s < p; ++s) {
      while (next[s] < ops[s].size()) {
        const Op& op = ops[s][next[s]];
        const int vs = op.chunk * p + s;  // virtual stage of this chunk on this rank
        double dep = 0;
        if (op.forward && vs > 0) dep = fend[size_t(vs - 1) * m + op.mb];
        if (!op.forward)
          dep = vs + 1 < nv ? bend[size_t(vs + 1) * m + op.mb] : fend[size_t(vs) * m + op.mb];
        if (dep < 0) break;  // dependency not run yet
        const double start = std::max(free_at[s], dep);
        const double end = start + (op.forward ? cf : cb);
        (op.forward ? fend : bend)[size_t(vs) * m + op.mb] = end;
        free_at[s] = end;
        in_flight[s] += op.forward ? 1 : -1;
        max_in_flight[s] = std::max(max_in_flight[s], in_flight[s]);
        ++next[s];
        --left;
        progress = true;
      }
    }
    HELIX_CHECK(progress, "simulate_pipeline: the schedule deadlocks (p {}, v {}, m {})", p, v, m);
  }
  PipelineSimResult r;
  r.makespan = *std::max_element(free_at.begin(), free_at.end());
  for (int s = 0; s < p; ++s) r.max_in_flight.push_back(double(max_in_flight[s]) / v);
  r.max_in_flight_stage0 = r.max_in_flight[0];
  r.busy_per_stage = m * (tf + tb);
  return r;
}

}  // namespace helix
