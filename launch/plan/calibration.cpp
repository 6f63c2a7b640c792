#include "launch/plan/calibration.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>

#include "core/error.h"
#include "core/json.h"

namespace helix {

const char* gemm_pass_name(GemmPass p) {
  switch (p) {
    case GemmPass::kFwd:
      return "fwd";
    case GemmPass::kDgrad:
      return "dgrad";
    case GemmPass::kWgrad:
      return "wgrad";
  }
  return "?";
}

namespace {

GemmPass parse_pass(const std::string& s, const std::string& what) {
  if (s == "fwd") return GemmPass::kFwd;
  if (s == "dgrad") return GemmPass::kDgrad;
  if (s == "wgrad") return GemmPass::kWgrad;
  HELIX_FAIL("{}: gemm pass '{}' (expected fwd, dgrad or wgrad)", what, s);
}

double num_or(const Json& o, const std::string& key, double dflt, const std::string& what) {
  if (!o.has(key) || o.at(key).is_null()) return dflt;
  return o.at(key).as_double(what + ": " + key);
}

}  // namespace

Calibration load_calibration(const std::string& path) {
  std::ifstream f(path);
  HELIX_CHECK(f.good(), "--calibration: cannot open '{}'", path);
  std::stringstream ss;
  ss << f.rdbuf();
  const Json j = Json::parse(ss.str(), path);
  HELIX_CHECK(j.is_object(), "'{}': expected a JSON object at the top", path);
  Calibration c;
  c.path = path;
  c.name = j.has("name") ? j.at("name").as_string(path + ": name") : path;
  c.memory_gib = num_or(j, "memory_gib", 0, path);
  c.reserved_gib = num_or(j, "reserved_gib", 0, path);
  c.bf16_peak_tflops = num_or(j, "bf16_peak_tflops", 0, path);
  c.gpus_per_node = static_cast<int>(num_or(j, "gpus_per_node", 0, path));
  c.nvlink_gbps = num_or(j, "nvlink_gbps", 0, path);
  c.network_gbps = num_or(j, "network_gbps", 0, path);
  c.nvlink_latency_us = num_or(j, "nvlink_latency_us", 0, path);
  c.network_latency_us = num_or(j, "network_latency_us", 0, path);
  c.copy_gbps = num_or(j, "copy_gbps", 0, path);
  c.comm_overlap_slowdown = num_or(j, "comm_overlap_slowdown", 0, path);
  c.host_step_ms = num_or(j, "host_step_ms", 0, path);
  if (j.has("gemm")) {
    for (const Json& r : j.at("gemm").as_array(path + ": gemm")) {
      const std::string w = path + ": gemm row";
      GemmRow g;
      g.pass = parse_pass(r.at("pass", w).as_string(w), w);
      g.m = r.at("m", w).as_int(w);
      g.n = r.at("n", w).as_int(w);
      g.k = r.at("k", w).as_int(w);
      g.bf16_tflops = num_or(r, "bf16_tflops", 0, w);
      g.fp8_tflops = num_or(r, "fp8_tflops", 0, w);
      HELIX_CHECK(g.m > 0 && g.n > 0 && g.k > 0, "{}: expected positive m, n, k, got {} {} {}", w,
                  g.m, g.n, g.k);
      c.gemm.push_back(g);
    }
  }
  if (j.has("attention")) {
    for (const Json& r : j.at("attention").as_array(path + ": attention")) {
      const std::string w = path + ": attention row";
      AttentionRow a;
      a.head_dim = static_cast<int>(r.at("head_dim", w).as_int(w));
      a.fwd_tflops = num_or(r, "fwd_tflops", 0, w);
      a.fwd_bwd_tflops = num_or(r, "fwd_bwd_tflops", 0, w);
      HELIX_CHECK(a.fwd_tflops > 0 && a.fwd_bwd_tflops > 0,
                  "{}: expected positive fwd_tflops and fwd_bwd_tflops", w);
      c.attention.push_back(a);
    }
  }
  if (j.has("memory_bound_gbps")) {
    for (const auto& [k, v] : j.at("memory_bound_gbps").as_object(path))
      c.memory_bound_gbps[k] = v.as_double(path + ": memory_bound_gbps." + k);
  }
  if (j.has("layers")) {
    for (const Json& r : j.at("layers").as_array(path + ": layers")) {
      const std::string w = path + ": layers row";
      LayerRow l;
      l.name = r.has("name") ? r.at("name").as_string(w) : "";
      l.hidden = static_cast<int>(r.at("hidden", w).as_int(w));
      l.heads = static_cast<int>(r.at("heads", w).as_int(w));
      l.ffn = static_cast<int>(r.at("ffn", w).as_int(w));
      l.tp = static_cast<int>(r.at("tp", w).as_int(w));
      l.tokens = r.at("tokens", w).as_int(w);
      l.seq_len = r.at("seq_len", w).as_double(w);
      l.fwd_bwd_ms = r.at("fwd_bwd_ms", w).as_double(w);
      c.layers.push_back(l);
    }
  }
  return c;
}

void merge_calibration(Calibration& base, const Calibration& extra) {
  const auto take = [](double& dst, double src) {
    if (src > 0) dst = src;
  };
  take(base.memory_gib, extra.memory_gib);
  take(base.reserved_gib, extra.reserved_gib);
  take(base.bf16_peak_tflops, extra.bf16_peak_tflops);
  take(base.nvlink_gbps, extra.nvlink_gbps);
  take(base.network_gbps, extra.network_gbps);
  take(base.nvlink_latency_us, extra.nvlink_latency_us);
  take(base.network_latency_us, extra.network_latency_us);
  take(base.copy_gbps, extra.copy_gbps);
  take(base.comm_overlap_slowdown, extra.comm_overlap_slowdown);
  take(base.host_step_ms, extra.host_step_ms);
  if (extra.gpus_per_node > 0) base.gpus_per_node = extra.gpus_per_node;
  // Extra rows first: an exact-shape lookup finds them before the base file's.
  base.fit_cache_.clear();
  base.gemm.insert(base.gemm.begin(), extra.gemm.begin(), extra.gemm.end());
  // Attention rows of a head dim that extra measured replace base's rows of that head dim.
  std::erase_if(base.attention, [&](const AttentionRow& b) {
    return std::any_of(extra.attention.begin(), extra.attention.end(),
                       [&](const AttentionRow& e) { return e.head_dim == b.head_dim; });
  });
  base.attention.insert(base.attention.end(), extra.attention.begin(), extra.attention.end());
  for (const auto& [k, v] : extra.memory_bound_gbps) base.memory_bound_gbps[k] = v;
  base.layers.insert(base.layers.end(), extra.layers.begin(), extra.layers.end());
  base.path += "+" + extra.path;
}

std::pair<double, double> Calibration::gemm_fit(GemmPass pass, bool fp8) const {
  const int key = int(pass) * 2 + (fp8 ? 1 : 0);
  if (const auto it = fit_cache_.find(key); it != fit_cache_.end()) return it->second;
  // Least squares of time = flops * a + b over the measured rows of this pass; R = 1/a, t0 = b >=
  // 0.
  std::vector<std::pair<double, double>> pts;  // (flops, seconds)
  for (const GemmRow& r : gemm) {
    const double rate = fp8 ? r.fp8_tflops : r.bf16_tflops;
    if (r.pass != pass || rate <= 0) continue;
    const double fl = 2.0 * double(r.m) * double(r.n) * double(r.k);
    pts.emplace_back(fl, fl / (rate * 1e12));
  }
  HELIX_CHECK(!pts.empty(), "calibration '{}': no {} gemm rows for pass {} (expected at least one)",
              path, fp8 ? "fp8" : "bf16", gemm_pass_name(pass));
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (auto [x, y] : pts) sx += x, sy += y, sxx += x * x, sxy += x * y;
  const double n = double(pts.size());
  double a = sy / sx, b = 0;  // one point (or no spread): a pure rate through the origin
  const double den = n * sxx - sx * sx;
  if (pts.size() >= 2 && den > 0) {
    a = (n * sxy - sx * sy) / den;
    b = (sy - a * sx) / n;
    if (b < 0 || a <= 0) {  // a negative latency fits noise: refit through the origin
      a = sxy / sxx;
      b = 0;
    }
  }
  return fit_cache_[key] = {1.0 / a, b};
}

double Calibration::gemm_seconds(GemmPass pass, int64_t m, int64_t n, int64_t k, bool fp8) const {
  const double fl = 2.0 * double(m) * double(n) * double(k);
  for (const GemmRow& r : gemm) {
    const double rate = fp8 ? r.fp8_tflops : r.bf16_tflops;
    if (r.pass == pass && r.n == n && r.k == k && rate > 0 &&
        std::abs(double(r.m) / double(m) - 1.0) <= 0.25)
      return fl / (rate * 1e12);
  }
  const auto [rate, t0] = gemm_fit(pass, fp8);
  return fl / rate + t0;
}

namespace {
// Attention rate at `head_dim` from rows measured at head dims: the time per (query, key, head) is
// interpolated linearly in head_dim between the two measured head dims around it (exact at a
// measured one; rows at the same head dim are averaged); outside the measured range the nearest
// row's rate (FLOP/s) carries over. Different head dims run different kernels (on Hopper the wgmma
// kernels at 64 and 128, mma.sync at 16-32), so one straight line through every row fits none of
// them: with the v6 rows it put head dim 32 at 150 TFLOP/s fwd+bwd against 139 measured and 64 at
// 173 against 186. FLOPs per (query, key, head) are flops_per_dim * head_dim.
double attention_rate(const std::vector<AttentionRow>& rows, int head_dim, bool fwd_bwd,
                      const std::string& path) {
  HELIX_CHECK(!rows.empty(), "calibration '{}': no attention rows (expected at least one)", path);
  const double per_dim = fwd_bwd ? 14.0 : 4.0;  // 4 (forward) or 3.5 * 4 (forward + backward) FLOPs
  std::map<int, std::pair<double, int>> by_dim;  // head_dim -> (sum of seconds per score, rows)
  for (const AttentionRow& r : rows) {
    auto& [sum, count] = by_dim[r.head_dim];
    sum += per_dim * r.head_dim / ((fwd_bwd ? r.fwd_bwd_tflops : r.fwd_tflops) * 1e12);
    ++count;
  }
  auto seconds = [](const std::pair<double, int>& v) { return v.first / v.second; };
  const auto hi = by_dim.lower_bound(head_dim);
  if (hi == by_dim.end()) {  // above the largest measured head dim: its rate
    const auto& [d, v] = *by_dim.rbegin();
    return per_dim * d / seconds(v);
  }
  if (hi->first == head_dim || hi == by_dim.begin())  // measured, or below the smallest
    return per_dim * hi->first / seconds(hi->second);
  const auto lo = std::prev(hi);
  const double w = double(head_dim - lo->first) / (hi->first - lo->first);
  const double y = (1 - w) * seconds(lo->second) + w * seconds(hi->second);
  return per_dim * head_dim / y;
}
}  // namespace

double Calibration::attention_fwd_bwd_flops(int head_dim) const {
  return attention_rate(attention, head_dim, true, path);
}

double Calibration::attention_fwd_flops(int head_dim) const {
  return attention_rate(attention, head_dim, false, path);
}

double Calibration::memory_bound_rate(const std::string& name) const {
  const auto it = memory_bound_gbps.find(name);
  const double gbps = it != memory_bound_gbps.end() ? it->second : copy_gbps;
  HELIX_CHECK(gbps > 0, "calibration '{}': no rate for memory-bound op '{}' and no copy_gbps", path,
              name);
  return gbps * 1e9;
}

}  // namespace helix
