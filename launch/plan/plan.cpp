#include "launch/plan/plan.h"

#include <algorithm>
#include <cmath>

#include "core/log.h"
#include "launch/plan/pipeline_schedule.h"
#include "layers/esm2_pipeline.h"
#include "layers/zero_sync.h"
#include "parallel/zero.h"

namespace helix {

const char* recompute_name(RecomputeMode r) {
  switch (r) {
    case RecomputeMode::kNone:
      return "none";
    case RecomputeMode::kSelective:
      return "selective";
    case RecomputeMode::kFull:
      return "full";
  }
  return "?";
}

std::string PlanLayout::str() const {
  return fmt::format("tp{} cp{} pp{} v{} zero{} mb{} {}{}", tp, cp, pp, virtual_stages, zero,
                     micro_batches, recompute_name(recompute),
                     tp > 1 && !sequence_parallel ? " no-sp" : "");
}

namespace {
int64_t vocab_rows(int64_t v, int tp) {
  return (v + tp - 1) / tp;
}  // per rank, padded (layers/esm2.cpp)
}  // namespace

int64_t stage_param_elements(const ModelConfig& m, int tp, int layers, bool first, bool last,
                             bool pp) {
  const int64_t h = m.hidden, f = m.ffn, v = m.vocab;
  const int64_t per_layer = 4 * h                          // two LayerNorms
                            + 3 * h * h / tp + 3 * h / tp  // qkv (column-parallel)
                            + h * h / tp + h               // out-proj (row-parallel) + bias
                            + f / tp * h + f / tp          // FC1 (column-parallel)
                            + h * f / tp + h;              // FC2 (row-parallel) + bias
  int64_t n = layers * per_layer;
  const int64_t embedding = vocab_rows(v, tp) * h;
  if (first) n += embedding;
  if (last) {
    if (pp && !first) n += embedding;  // the tied decoder's copy on the last pipeline stage
    n +=
        2 * h + h * h + h + 2 * h + vocab_rows(v, tp);  // final LN, LM head dense + LN, output bias
  }
  return n;
}

double layer_activation_bytes(const ModelConfig& m, int64_t tokens, const PlanLayout& l,
                              bool bf16) {
  const double e = bf16 ? 2 : 4, t = double(tokens), h = m.hidden, f = m.ffn;
  const int tp = l.tp;
  const double heads = double(m.heads) / tp;
  const double stats = 2 * 4 * t;    // LayerNorm mean and rstd, f32 [t]
  const double lse = 4 * heads * t;  // attention log-sum-exp, f32 [heads, t]
  if (l.recompute == RecomputeMode::kFull) {
    const double ts = tp > 1 && l.sequence_parallel ? t / tp : t;
    return e * ts * h;  // the layer's input only
  }
  if (tp == 1) {
    // Fused single-device layer: x, LN1 out, q, k, v, o, h, LN2 out [t, H] and FC1's pre-GELU [t,
    // F] (the fused MLP recomputes GELU); selective drops the two LN outputs (recomputed).
    const double th = l.recompute == RecomputeMode::kSelective ? 6 : 8;
    return e * (th * t * h + t * f) + 2 * stats + lse;
  }
  // TP graph: q, k, v, o [t, H/tp]; pre-GELU and GELU out [t, F/tp]; x and h [t_sp, H] (t/tp under
  // SP); the two gathered LN outputs that QKV and FC1 read [t, H]. Selective keeps the LN outputs'
  // SP shards instead (re-gathered in backward) and recomputes GELU.
  const double ts = l.sequence_parallel ? t / tp : t;
  double b = e * (4 * t * h / tp + 2 * ts * h) + 2 * stats * ts / t + lse;
  if (l.recompute == RecomputeMode::kSelective)
    b += e * (2 * ts * h + t * f / tp);
  else
    b += e * (2 * t * h + 2 * t * f / tp);
  return b;
}

double plan_model_flops(const ModelConfig& m, double tokens, double seq_len) {
  return 6.0 * double(m.num_matmul_params()) * tokens +
         12.0 * double(m.hidden) * m.layers * seq_len * tokens;
}

std::vector<int> plan_layer_split(const PlanInput& in) {
  if (!in.pp_layers.empty()) return in.pp_layers;
  return esm2_pipeline_split(in.model, in.layout.pp * in.layout.virtual_stages);
}

std::string layout_error(const PlanInput& in) {
  const PlanLayout& l = in.layout;
  const ModelConfig& m = in.model;
  if (l.tp < 1 || l.cp < 1 || l.pp < 1)
    return fmt::format("--tp/--cp/--pp: expected >= 1, got {}/{}/{}", l.tp, l.cp, l.pp);
  const int64_t mp = int64_t(l.tp) * l.cp * l.pp;
  if (in.gpus % mp != 0)
    return fmt::format("--gpus {}: expected a multiple of tp*cp*pp = {}", in.gpus, mp);
  if (m.heads % l.tp != 0)
    return fmt::format("--tp {}: heads {} not divisible by tp", l.tp, m.heads);
  if (m.ffn % l.tp != 0) return fmt::format("--tp {}: ffn {} not divisible by tp", l.tp, m.ffn);
  if (l.zero < 0 || l.zero > 3) return fmt::format("--zero {}: expected 0, 1, 2 or 3", l.zero);
  if (m.layers < l.pp * l.virtual_stages)
    return fmt::format("--pp {} --pp-virtual {}: {} layers cannot fill {} virtual stages", l.pp,
                       l.virtual_stages, m.layers, l.pp * l.virtual_stages);
  if (!in.pp_layers.empty()) {
    int sum = 0;
    bool positive = true;
    for (int k : in.pp_layers) {
      sum += k;
      positive &= k >= 1;
    }
    if (int(in.pp_layers.size()) != l.pp * l.virtual_stages || sum != m.layers || !positive)
      return fmt::format(
          "--pp-layers: expected {} counts >= 1 (pp x pp-virtual) summing to {} layers, got {} "
          "summing to {}",
          l.pp * l.virtual_stages, m.layers, in.pp_layers.size(), sum);
  }
  const std::string pe = pipeline_shape_error({l.pp, l.virtual_stages, l.micro_batches});
  if (!pe.empty()) return pe;
  const int dp = in.gpus / int(mp);
  const int64_t per_mb = in.tokens_per_step / (int64_t(dp) * l.micro_batches);
  if (per_mb < in.max_seq_len)
    return fmt::format(
        "--tokens-per-step {}: {} tokens per micro-batch (dp {}, {} micro-batches) is less than "
        "the "
        "longest sample ({})",
        in.tokens_per_step, per_mb, dp, l.micro_batches, in.max_seq_len);
  if (per_mb < 2 * l.cp)
    return fmt::format("--cp {}: {} tokens per micro-batch is less than 2*cp", l.cp, per_mb);
  return "";
}

namespace {

struct Link {
  double bytes_per_s, latency_s;
  bool nvlink;
};

// Time of a collective moving `bytes` per rank over `link` (0 when the group has one rank).
double coll_seconds(double bytes, int n, const Link& link, int calls) {
  if (n <= 1 || bytes <= 0) return 0;
  return bytes / link.bytes_per_s + calls * link.latency_s;
}
double ag_bytes(double full, int n) {
  return n > 1 ? full * (n - 1) / n : 0;
}  // all-gather, reduce-scatter
double ar_bytes(double full, int n) { return 2 * ag_bytes(full, n); }  // all-reduce (ring)

struct MicroBatchCost {
  double gemm_f = 0, gemm_b = 0, attn_f = 0, attn_b = 0, mem_f = 0, mem_b = 0;
  double tp_f = 0, tp_b = 0, cp_f = 0, cp_b = 0;
  double tp_bytes = 0, cp_bytes = 0;
};

// One transformer layer, one micro-batch of t tokens per rank (after CP).
MicroBatchCost layer_cost(const PlanInput& in, const Calibration& cal, int64_t tokens,
                          const Link& tp_link, const Link& cp_link) {
  const ModelConfig& m = in.model;
  const PlanLayout& l = in.layout;
  const bool fp8 = in.fp8 == Fp8Mode::kDelayed;
  const int tp = l.tp;
  const int64_t t = tokens, h = m.hidden, f = m.ffn, h3 = 3 * h / tp, hr = h / tp, fr = f / tp;
  const double e = in.bf16 ? 2 : 4;
  const bool sp = tp > 1 && l.sequence_parallel;
  const double ts = sp ? double(t) / tp : double(t);
  MicroBatchCost c;
  const auto g = [&](GemmPass p, int64_t mm, int64_t nn, int64_t kk) {
    return cal.gemm_seconds(p, mm, nn, kk, fp8);
  };
  c.gemm_f = g(GemmPass::kFwd, t, h3, h) + g(GemmPass::kFwd, t, h, hr) +
             g(GemmPass::kFwd, t, fr, h) + g(GemmPass::kFwd, t, h, fr);
  c.gemm_b = g(GemmPass::kDgrad, t, h, h3) + g(GemmPass::kDgrad, t, hr, h) +
             g(GemmPass::kDgrad, t, h, fr) + g(GemmPass::kDgrad, t, fr, h) +
             g(GemmPass::kWgrad, h3, h, t) + g(GemmPass::kWgrad, h, hr, t) +
             g(GemmPass::kWgrad, fr, h, t) + g(GemmPass::kWgrad, h, fr, t);
  // Attention: each rank's queries against all keys of their sequences (CP splits queries).
  const double attn_fwd_flops = 4.0 * double(m.heads / tp) * m.head_dim() * double(t) * in.seq_len;
  const double attn_fb = 3.5 * attn_fwd_flops / cal.attention_fwd_bwd_flops(m.head_dim());
  c.attn_f = attn_fwd_flops / cal.attention_fwd_flops(m.head_dim());
  c.attn_b = attn_fb - c.attn_f;
  // Memory-bound passes, bytes as tests/bench/kernels_memory.cpp counts them (bf16: e = 2).
  const auto mb = [&](const char* op, double bytes) { return bytes / cal.memory_bound_rate(op); };
  const double ln_f = mb("layernorm_fwd", 2 * e * ts * h + 8 * ts);
  const double ln_b = mb("layernorm_bwd", 4 * e * ts * h + 8 * ts);
  // The rotary embedding rides in the QKV split and in the gradient join (kernels/qkv).
  c.mem_f = 2 * ln_f + mb("qkv_split_rotary", 6 * e * t * hr) + mb("gelu_fwd", 2 * e * t * fr) +
            2 * mb("copy", 2 * e * ts * h);  // residual copies
  // Backward: every activation gradient starts as a zeroed buffer that the kernels accumulate into
  // (core/autograd.h's contract); the fused single-device MLP recomputes GELU from the
  // pre-activation.
  c.mem_b = 2 * ln_b + mb("gelu_bwd", 4 * e * t * fr) + mb("qkv_join_grad_rotary", 9 * e * t * hr) +
            2 * mb("axpy", 3 * e * ts * h);
  if (tp == 1) {
    // zeroed: dh, d_pre [t, F]; two d_ln, the grads of h, of the attention output and of x [t, H];
    // of qkv [t, 3H]
    c.mem_b += mb("gelu_fwd", 2 * e * t * fr) + mb("memset", e * (2.0 * t * fr + 8.0 * t * h));
  } else {
    // zeroed: grads of the two gathered LN outputs [t, H], of qkv [t, 3H/tp] and the attention
    // output [t, H/tp], of FC1's output and GELU's [t, F/tp], of four SP-region tensors [t_sp, H]
    c.mem_b += mb("memset", e * (2.0 * t * fr + 2.0 * t * h + 4.0 * t * hr + 4.0 * ts * h));
  }
  // FP8 forward casts: with the transposes (`t_bytes` = 1) when a backward follows, without (0) in
  // the first pass of a fully recomputed layer, which runs on a quiet tape (layers/fp8_layers.cpp).
  const auto fp8_fwd = [&](double t_bytes) {
    return 2 * mb("layernorm_fwd_fp8_t", (e + 1 + t_bytes) * t * h + 8 * t) +
           mb("cast_transpose_fp8", (3.0 + t_bytes) * t * hr) + mb("gelu_cast_transpose_fp8", (3.0 + t_bytes) * t * fr);
  };
  double fp8_quiet_saving = 0;
  if (fp8 && tp == 1) {
    // Cast (+ transpose) of every GEMM input, 4 bytes per element (bench's count). The two
    // LayerNorms write their fp8 codes and the transpose directly (layernorm_fwd_fp8_t replaces
    // layernorm_fwd and the cast). The MLP's GELU rides in FC2's input cast, GELU's backward and
    // FC1's bias gradient in FC1's grad-output cast (layers/fp8_layers.cpp): the bf16 GELU passes,
    // the GELU recompute and the zero-filled dh, d_pre and d_ln buffers of the bf16 path are gone.
    c.mem_f += fp8_fwd(1) - 2 * ln_f - mb("gelu_fwd", 2 * e * t * fr);
    fp8_quiet_saving = fp8_fwd(1) - fp8_fwd(0);
    c.mem_b += mb("cast_transpose_fp8", 4.0 * (t * h3 + 2 * t * h)) +
               mb("dgelu_cast_transpose_dbias_fp8", 6.0 * t * fr) - mb("gelu_bwd", 4 * e * t * fr) -
               mb("gelu_fwd", 2 * e * t * fr) - mb("memset", e * (2.0 * t * fr + 2.0 * t * h));
  } else if (fp8) {  // tensor-parallel pieces: plain casts of every GEMM input
    c.mem_f += mb("cast_transpose_fp8", 4.0 * (2 * t * h + t * hr + t * fr));
    c.mem_b += mb("cast_transpose_fp8", 4.0 * (t * h3 + 2 * t * h + t * fr));
  }
  // Tensor parallel: SP: 2 all-gathers + 2 reduce-scatters of [t, H] forward, the same backward;
  // without SP: 2 all-reduces each way.
  const double act = e * double(t) * h;
  if (tp > 1) {
    const double per_dir = sp ? 4 * ag_bytes(act, tp) : 2 * ar_bytes(act, tp);
    c.tp_f = coll_seconds(per_dir, tp, tp_link, 4);
    c.tp_b = c.tp_f;
    c.tp_bytes = 2 * per_dir;
  }
  // Context parallel (all-gather mode): K and V [t*cp, 2H/tp] gathered forward; backward gathers
  // them again and reduce-scatters dK, dV.
  if (l.cp > 1) {
    const double kv = ag_bytes(e * double(t) * l.cp * 2 * hr, l.cp);
    c.cp_f = coll_seconds(kv, l.cp, cp_link, 1);
    c.cp_b = 2 * c.cp_f;
    c.cp_bytes = 3 * kv;
  }
  // Recompute: selective re-runs the LayerNorms (and re-gathers their SP shards); full the forward.
  if (l.recompute == RecomputeMode::kSelective) {
    c.mem_b += 2 * ln_f + (tp > 1 ? mb("gelu_fwd", 2 * e * t * fr) : 0);
    if (sp) {
      c.tp_b += coll_seconds(2 * ag_bytes(act, tp), tp, tp_link, 2);
      c.tp_bytes += 2 * ag_bytes(act, tp);
    }
  } else if (l.recompute == RecomputeMode::kFull) {
    c.gemm_b += c.gemm_f;
    c.attn_b += c.attn_f;
    c.mem_b += c.mem_f;  // the recompute makes the transposes; the first pass did not
    c.mem_f -= fp8_quiet_saving;
    c.tp_b += c.tp_f;
    c.cp_b += c.cp_f;
    c.tp_bytes *= 1.5;
    c.cp_bytes *= 4.0 / 3.0;
  }
  return c;
}

}  // namespace

PlanResult make_plan(const PlanInput& in, const Calibration& cal) {
  PlanResult r;
  r.error = layout_error(in);
  if (!r.error.empty()) return r;
  const ModelConfig& m = in.model;
  const PlanLayout& l = in.layout;
  const int tp = l.tp, cp = l.cp, pp = l.pp, v = l.virtual_stages, mbs = l.micro_batches;
  r.dp = in.gpus / (tp * cp * pp);
  const int dp = r.dp;
  if ((tp - 1) * vocab_rows(m.vocab, tp) >= m.vocab)
    r.warnings.push_back(fmt::format(
        "tp {}: vocabulary {} in {} rows per rank leaves the last rank only pad rows; helix's "
        "Esm2Model rejects "
        "that today (layers/esm2.cpp), the plan assumes a vocabulary-parallel head that allows it",
        tp, m.vocab, vocab_rows(m.vocab, tp)));
  const double e = in.bf16 ? 2 : 4;
  const bool fp8 = in.fp8 == Fp8Mode::kDelayed;
  r.tokens_per_micro_batch = in.tokens_per_step / (int64_t(dp) * mbs);
  const int64_t t = (r.tokens_per_micro_batch + cp - 1) / cp;  // tokens per rank after CP
  const bool sp = tp > 1 && l.sequence_parallel;
  const double ts = sp ? double(t) / tp : double(t);

  // Groups: rank order tp-cp-dp-pp, a group stays inside a node when its span fits.
  const int gpn = std::max(1, cal.gpus_per_node);
  const Link nvl{cal.nvlink_gbps * 1e9, cal.nvlink_latency_us * 1e-6, true};
  const Link net{cal.network_gbps * 1e9, cal.network_latency_us * 1e-6, false};
  const Link tp_link = tp <= gpn ? nvl : net;
  const Link cp_link = tp * cp <= gpn ? nvl : net;
  const Link dp_link = tp * cp * dp <= gpn ? nvl : net;  // the dp x cp group spans tp*cp*dp ranks
  const Link pp_link = tp * cp * dp * pp <= gpn ? nvl : net;
  const auto where = [](const Link& k) { return k.nvlink ? "nvlink" : "network"; };
  r.comm_placement = fmt::format("tp {}, cp {}, dp {}, pp {}", where(tp_link), where(cp_link),
                                 where(dp_link), where(pp_link));

  MicroBatchCost lc = layer_cost(in, cal, t, tp_link, cp_link);
  // A measured whole layer at this shard shape (helix_bench_layer_slice) rescales the layer's
  // compute: factor = measured fwd+bwd / the component model at the measured tokens and lengths.
  for (const LayerRow& row : cal.layers) {
    if (row.hidden != m.hidden || row.heads != m.heads || row.ffn != m.ffn || row.tp != tp)
      continue;
    PlanInput ri = in;
    ri.seq_len = row.seq_len;
    ri.fp8 = Fp8Mode::kOff;
    ri.layout.recompute = RecomputeMode::kNone;
    const MicroBatchCost rc = layer_cost(ri, cal, row.tokens, tp_link, cp_link);
    const double model_s = rc.gemm_f + rc.gemm_b + rc.attn_f + rc.attn_b + rc.mem_f + rc.mem_b;
    r.layer_factor = row.fwd_bwd_ms * 1e-3 / model_s;
    for (double* x : {&lc.gemm_f, &lc.gemm_b, &lc.attn_f, &lc.attn_b, &lc.mem_f, &lc.mem_b})
      *x *= r.layer_factor;
    break;
  }
  const double act_layer = layer_activation_bytes(m, t, l, in.bf16);
  // One layer's full activations (the recompute of a layer under full recompute) and the largest
  // backward transient: the MLP's dGELU and d-pre [t, F/tp], four [t, H] gradient buffers.
  PlanLayout none = l;
  none.recompute = RecomputeMode::kNone;
  const double act_layer_full = layer_activation_bytes(m, t, none, in.bf16);
  const double bwd_transient = e * (2.0 * t * (m.ffn / tp) + 4.0 * t * m.hidden);
  const int64_t vr = vocab_rows(m.vocab, tp);
  const double head_act =
      e * 3.0 * t * m.hidden + (e + 4) * double(t) * vr;  // LM head: x, pre, LN out; logits
  const PipelineShape shape{pp, v, mbs};
  const std::vector<int> split = plan_layer_split(in);

  double max_mem = -1;
  double slowest = -1;
  for (int s = 0; s < pp; ++s) {
    StagePlan st;
    if (pp > 1) st.layer_ranges = pipeline_layer_ranges(split, pp, s);
    for (const auto& [lo, hi] : st.layer_ranges) st.layers += hi - lo;
    if (pp == 1) st.layers = m.layers;
    st.first = s == 0;
    st.last = s == pp - 1;
    st.param_elements = stage_param_elements(m, tp, st.layers, st.first, st.last, pp > 1);
    const double pe = double(st.param_elements);
    // Persistent parameter, gradient and optimizer bytes: zero_memory_bytes (the formula that
    // ZeroSync's flat buffers follow, their padding included) over this stage's units, ZeRO
    // sharding over dp x cp (docs/fsdp.md: cp ranks hold the same parameters); a pipeline stage's
    // units are its own (esm2_zero_unit_numels with the stage's layer ranges).
    const double zs = double(dp) * cp;
    const double d1 = l.zero >= 1 ? zs : 1, d2 = l.zero >= 2 ? zs : 1;
    ZeroMemoryParams zp;
    zp.stage = l.zero;
    zp.dp = dp * cp;
    zp.compute_bytes = in.bf16 ? 2 : 4;
    zp.unit_numels = esm2_zero_unit_numels(m, tp, st.layer_ranges);
    const ZeroMemory zm = zero_memory_bytes(zp);
    // In f32 runs stages 0 and 3 keep no separate master (the model copy, or its shard, is it);
    // otherwise the optimizer bytes are the master (4 bytes) and the two moments (8) per element.
    const bool copy_is_master = !in.bf16 && (l.zero == 0 || l.zero == 3);
    MemoryBytes& mem = st.memory;
    mem.master = copy_is_master ? double(zm.params) : double(zm.optimizer) / 3;
    const int64_t layer_matmul = 4LL * m.hidden * m.hidden / tp + 2LL * m.hidden * m.ffn / tp;
    mem.model_copy =
        (copy_is_master ? 0 : double(zm.params)) + (fp8 ? double(layer_matmul) * st.layers : 0);
    mem.grads = double(zm.grads);
    mem.optimizer = double(zm.optimizer) - (copy_is_master ? 0 : mem.master);
    // Activations: micro-batches (chunks) in flight on this stage under the schedule.
    const double in_flight = pipeline_in_flight(shape, s);
    mem.activations = in_flight * st.layers * act_layer;
    if (l.recompute == RecomputeMode::kFull) mem.activations += act_layer_full;
    if (st.last) mem.activations += head_act;
    mem.workspace = bwd_transient;
    // ZeRO transients (docs/fsdp.md): stage 2 fills full gradient buffers during the step and
    // reduce-scatters them at its end; stage 3 holds a layer's gathered weights from its forward
    // to its backward unless --recompute full (then the running and the prefetched layer's), and,
    // with gradient accumulation, every layer's full gradient from its first backward to the last.
    const double layer_elems = double(stage_param_elements(m, tp, 1, false, false, false));
    if (l.zero == 2 && zs > 1) mem.comm_buffers += 4 * (pe - std::ceil(pe / zs));
    if (l.zero == 3 && zs > 1) {
      const bool all_weights = l.recompute != RecomputeMode::kFull;
      mem.comm_buffers += e * (all_weights ? pe - std::ceil(pe / zs) : 2 * layer_elems);
      mem.comm_buffers += 4 * (mbs > 1 ? pe - std::ceil(pe / zs) : 2 * layer_elems);
    }
    if (pp > 1)
      mem.comm_buffers += 4 * e * ts * m.hidden;  // send/recv of activations and their grads
    if (cp > 1)
      mem.comm_buffers += 4 * e * double(t) * cp * 2 * m.hidden / tp;  // gathered K/V and dK/dV
    if (mem.total() > max_mem) {
      max_mem = mem.total();
      r.worst_stage = s;
    }

    // Time of one micro-batch through this stage (all its chunks).
    const double L = st.layers;
    double f = L * (lc.gemm_f + lc.attn_f + lc.mem_f + lc.tp_f + lc.cp_f);
    double b = L * (lc.gemm_b + lc.attn_b + lc.mem_b + lc.tp_b + lc.cp_b);
    const bool fp8h = false;  // the LM head stays bf16
    const auto g = [&](GemmPass p, int64_t mm, int64_t nn, int64_t kk) {
      return cal.gemm_seconds(p, mm, nn, kk, fp8h);
    };
    const auto mbnd = [&](const char* op, double bytes) {
      return bytes / cal.memory_bound_rate(op);
    };
    const int64_t h = m.hidden;
    if (st.first) {
      f += mbnd("embedding_fwd", e * ts * h);
      b += mbnd("embedding_bwd", e * ts * h);
    }
    if (st.last) {
      f += g(GemmPass::kFwd, t, h, h) + g(GemmPass::kFwd, t, vr, h) +
           mbnd("layernorm_fwd", 2 * (2 * e * ts * h)) + mbnd("gelu_fwd", 2 * e * t * h);
      b += g(GemmPass::kDgrad, t, h, h) + g(GemmPass::kWgrad, h, h, t) +
           g(GemmPass::kDgrad, t, h, vr) + g(GemmPass::kWgrad, vr, h, t) +
           mbnd("layernorm_bwd", 2 * (4 * e * ts * h)) + mbnd("gelu_bwd", 4 * e * t * h) +
           mbnd("cross_entropy_fwd_bwd", (2 * e + 4) * double(t) * vr);
    }
    // Pipeline: each chunk receives its input and sends its output (forward), and the reverse in
    // backward.
    double pp_bytes = 0;
    if (pp > 1) {
      const double msg = e * ts * h;
      const double sends = 2.0 * v;  // per micro-batch, forward and backward each
      f += sends / 2 * (msg / pp_link.bytes_per_s + pp_link.latency_s);
      b += sends / 2 * (msg / pp_link.bytes_per_s + pp_link.latency_s);
      pp_bytes = sends * msg * mbs;
    }
    st.fwd_seconds = f;
    st.bwd_seconds = b;
    // Optimizer: AdamW 30 bytes per element it updates (6 f32 streams, the f32 grad, the bf16
    // copy), grad-norm 4, zeroing the gradients 4 (bench counts).
    const double opt_elems = std::ceil(pe / d1);
    st.optimizer_seconds = mbnd("adamw", 30 * opt_elems) +
                           mbnd("grad_norm", 4 * std::ceil(pe / d2)) +
                           mbnd("memset", 4 * std::ceil(pe / d2));
    if (f + b > slowest) {
      slowest = f + b;
      r.time.gemm = L * (lc.gemm_f + lc.gemm_b);
      r.time.attention = L * (lc.attn_f + lc.attn_b);
      r.time.memory_bound = L * (lc.mem_f + lc.mem_b);
      r.time.tp_comm = L * (lc.tp_f + lc.tp_b);
      r.time.cp_comm = L * (lc.cp_f + lc.cp_b);
      r.time.pp_comm =
          pp > 1 ? 2.0 * v * (e * ts * h / pp_link.bytes_per_s + pp_link.latency_s) : 0;
      r.comm.pp = pp_bytes;
    }
    r.stages.push_back(st);
  }
  r.memory = r.stages[r.worst_stage].memory;
  r.capacity_bytes = cal.memory_gib * double(1ull << 30);
  r.reserved_bytes = cal.reserved_gib * double(1ull << 30);
  r.fits = r.memory.total() + r.reserved_bytes <= r.capacity_bytes;

  // Per-step communication of the busiest stage (tp, cp per micro-batch and layer).
  const StagePlan* sl = &r.stages[0];
  for (const StagePlan& st : r.stages)
    if (st.fwd_seconds + st.bwd_seconds > sl->fwd_seconds + sl->bwd_seconds) sl = &st;
  r.comm.tp = lc.tp_bytes * sl->layers * mbs;
  r.comm.cp = lc.cp_bytes * sl->layers * mbs;
  // Data parallel (gradients summed over dp x cp), as docs/fsdp.md describes each stage: zero 0
  // all-reduces DP buckets during the last micro-batch's backward; zero 1 all-reduces the full flat
  // gradients after backward and all-gathers the bf16 copies after the update; zero 2
  // reduce-scatters after backward and all-gathers the copies; zero 3 reduce-scatters each layer's
  // gradient right after its last backward (overlapped) and all-gathers the weights before every
  // micro-batch's forward (and again before its backward under --recompute full), prefetched.
  const double pe = double(sl->param_elements);
  double dp_exposed = 0;
  // Communication hidden behind compute still costs `comm_overlap_slowdown` of its time (NCCL
  // kernels take SMs and memory bandwidth from the compute they overlap).
  const double slow = cal.comm_overlap_slowdown;
  const auto behind = [slow](double comm, double window) {
    return std::max(0.0, comm - window) + slow * std::min(comm, window);
  };
  const int g = dp * cp;
  if (g > 1) {
    const double grad = 4 * pe, copy = e * pe;
    const double bwd = sl->bwd_seconds;
    const double fwd = sl->fwd_seconds;
    const double rs = ag_bytes(grad, g), ag = ag_bytes(copy, g), ar = ar_bytes(grad, g);
    const double t_rs = coll_seconds(rs, g, dp_link, 1), t_ag = coll_seconds(ag, g, dp_link, 1);
    const double t_ar = coll_seconds(ar, g, dp_link, 1);
    if (l.zero == 0) {
      r.comm.dp = ar;
      dp_exposed = behind(t_ar, bwd);
    } else if (l.zero == 1) {
      r.comm.dp = ar + ag;
      dp_exposed = t_ar + t_ag;
    } else if (l.zero == 2) {
      r.comm.dp = rs + ag;
      dp_exposed = t_rs + t_ag;
    } else {
      const int gathers = l.recompute == RecomputeMode::kFull ? 2 : 1;
      r.comm.dp = rs + mbs * gathers * ag;
      dp_exposed = behind(t_rs, bwd) + mbs * behind(t_ag, fwd) +
                   (gathers == 2 ? mbs * behind(t_ag, bwd) : 0.0);
    }
  }
  double slow_fb = 0, opt = 0;
  for (const StagePlan& st : r.stages) {
    slow_fb = std::max(slow_fb, st.fwd_seconds + st.bwd_seconds);
    opt = std::max(opt, st.optimizer_seconds);
  }
  r.bubble_fraction = pipeline_bubble_fraction(shape);
  r.time.pipeline = pipeline_step_units(shape) * slow_fb;
  r.time.bubble = r.time.pipeline * r.bubble_fraction;
  r.time.dp_exposed = dp_exposed;
  r.time.optimizer = opt;
  r.time.host = cal.host_step_ms * 1e-3;
  r.time.total = r.time.pipeline + r.time.dp_exposed + r.time.optimizer + r.time.host;

  const double tokens = double(r.tokens_per_micro_batch) * mbs * dp;
  r.model_flops = plan_model_flops(m, tokens, in.seq_len);
  r.hardware_flops = r.model_flops;
  if (l.recompute == RecomputeMode::kFull)
    r.hardware_flops +=
        2.0 * m.layers * (4.0 * m.hidden * m.hidden + 2.0 * m.hidden * m.ffn) * tokens +
        4.0 * m.hidden * m.layers * in.seq_len * tokens;
  r.tokens_per_second = tokens / r.time.total;
  r.mfu = r.model_flops / (r.time.total * in.gpus * cal.bf16_peak_tflops * 1e12);
  return r;
}

}  // namespace helix
