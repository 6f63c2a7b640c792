#include "launch/metrics.h"

#include <cmath>

#include "core/error.h"
#include "core/json.h"

namespace helix {

double EvalMetrics::perplexity() const { return std::exp(loss); }

MetricsWriter::MetricsWriter(const std::string& path, bool append) : path_(path) {
  out_.open(path, append ? std::ios::app : std::ios::trunc);
  HELIX_CHECK(out_.good(), "cannot open metrics file '{}' for writing", path);
}

void MetricsWriter::write(const StepMetrics& m) {
  if (!out_.is_open()) return;
  Json j;
  j["kind"] = "train";
  j["step"] = m.step;
  j["loss"] = std::isfinite(m.loss) ? Json(m.loss) : Json();
  j["grad_norm"] = std::isfinite(m.grad_norm) ? Json(m.grad_norm) : Json();
  j["lr"] = m.lr;
  j["tokens"] = m.tokens;
  j["step_seconds"] = m.step_seconds;
  j["tokens_per_second"] = m.tokens_per_second();
  j["tflops"] = m.tflops();
  j["mfu"] = m.mfu();
  j["mem_current_bytes"] = m.mem_current;
  j["mem_peak_bytes"] = m.mem_peak;
  j["skipped"] = m.skipped;
  j["skipped_total"] = m.skipped_total;
  out_ << j.dump() << '\n';
  out_.flush();
  HELIX_CHECK(out_.good(), "error writing metrics file '{}'", path_);
}

void MetricsWriter::write(const EvalMetrics& m) {
  if (!out_.is_open()) return;
  Json j;
  j["kind"] = "eval";
  j["step"] = m.step;
  j["loss"] = std::isfinite(m.loss) ? Json(m.loss) : Json();
  j["perplexity"] = std::isfinite(m.perplexity()) ? Json(m.perplexity()) : Json();
  j["tokens"] = m.tokens;
  out_ << j.dump() << '\n';
  out_.flush();
}

std::string progress_line(const StepMetrics& m, int64_t total_steps) {
  std::string s = fmt::format("step {}/{} loss {:.4f} gnorm {:.3f} lr {:.2e} | {:.0f} tok/s ", m.step, total_steps,
                              m.loss, m.grad_norm, m.lr, m.tokens_per_second());
  s += m.tflops() >= 1.0 ? fmt::format("{:.1f} TFLOP/s", m.tflops()) : fmt::format("{:.1f} GFLOP/s", m.tflops() * 1e3);
  if (m.peak_flops > 0) s += fmt::format(" MFU {:.1f}%", 100.0 * m.mfu());
  s += fmt::format(" | mem {:.2f}/{:.2f} GiB", m.mem_current / 1073741824.0, m.mem_peak / 1073741824.0);
  if (m.skipped) s += fmt::format(" | SKIPPED (non-finite), {} so far", m.skipped_total);
  return s;
}

double device_peak_bf16_flops(int cc, int sm_count) {
  // Dense bf16 FLOPs per SM per clock: Hopper 4096 (wgmma), Ampere 2048; boost clocks as published.
  if (cc == 90) return 4096.0 * sm_count * 1.83e9;  // H100 SXM: 132 SMs -> 989 TFLOP/s
  if (cc == 80) return 2048.0 * sm_count * 1.41e9;
  if (cc == 89) return 1024.0 * sm_count * 2.52e9;
  return 0;
}

}  // namespace helix
