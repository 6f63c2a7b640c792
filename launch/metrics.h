#pragma once
// Training metrics: one JSONL record per step (and per evaluation) for plots and tooling, and the
// human progress line. MFU is model FLOPs per second over the device's dense bf16 peak.
#include <cstdint>
#include <fstream>
#include <string>

namespace helix {

struct StepMetrics {
  int64_t step = 0;
  double loss = 0;          // mean masked-LM loss over the step's labelled tokens
  double grad_norm = 0;     // global norm before clipping
  double lr = 0;
  int64_t tokens = 0;       // real (unpadded) tokens in the step, all ranks
  double step_seconds = 0;
  double model_flops = 0;   // ModelConfig::train_flops of the step, all ranks
  double peak_flops = 0;    // sum over ranks of the device peak; 0 = unknown (no MFU)
  int64_t mem_current = 0;  // bytes, this rank's device allocator
  int64_t mem_peak = 0;
  bool skipped = false;     // non-finite loss or gradient: update not applied
  int64_t skipped_total = 0;

  double tokens_per_second() const { return step_seconds > 0 ? tokens / step_seconds : 0; }
  double tflops() const { return step_seconds > 0 ? model_flops / step_seconds / 1e12 : 0; }
  double mfu() const { return peak_flops > 0 && step_seconds > 0 ? model_flops / step_seconds / peak_flops : 0; }
};

struct EvalMetrics {
  int64_t step = 0;
  double loss = 0;
  int64_t tokens = 0;  // labelled tokens evaluated
  double perplexity() const;
};

class MetricsWriter {
 public:
  MetricsWriter() = default;
  explicit MetricsWriter(const std::string& path, bool append = false);
  bool is_open() const { return out_.is_open(); }
  void write(const StepMetrics& m);
  void write(const EvalMetrics& m);

 private:
  std::ofstream out_;
  std::string path_;
};

std::string progress_line(const StepMetrics& m, int64_t total_steps);

// Dense bf16 tensor-core peak of a CUDA device by compute capability and SM count (H100 SXM: 989e12);
// 0 when unknown.
double device_peak_bf16_flops(int compute_capability, int sm_count);

}  // namespace helix
