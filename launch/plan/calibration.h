#pragma once
// Rates of one GPU type for `helix plan`, read from a calibration JSON
// (examples/calibration/*.json): measured GEMM rows, attention and memory-bound rates, link
// bandwidths and memory. The design choice: the planner never hard-codes a rate; it fits a small
// model (time = FLOPs / R + t0 per GEMM pass and dtype) to the measured rows and uses a measured
// row directly where the shape matches.
#include <map>
#include <string>
#include <vector>

namespace helix {

enum class GemmPass { kFwd, kDgrad, kWgrad };

struct GemmRow {
  GemmPass pass = GemmPass::kFwd;
  int64_t m = 0, n = 0, k = 0;  // output [m, n], reduction k (cuBLAS view after transposes)
  double bf16_tflops = 0;       // 0: not measured
  double fp8_tflops = 0;        // 0: not measured
};

struct AttentionRow {
  int head_dim = 0;
  double fwd_tflops = 0;      // 4 * heads * head_dim * sum s^2 / time
  double fwd_bwd_tflops = 0;  // 3.5x the forward FLOPs / time of forward + backward
};

// Measured whole-layer times (helix_bench_layer_slice), used to check the cost model.
struct LayerRow {
  std::string name;
  int hidden = 0, heads = 0, ffn = 0, tp = 1;
  int64_t tokens = 0;
  double seq_len = 0;  // sum s^2 / sum s of the timed batch
  double fwd_bwd_ms = 0;
};

struct Calibration {
  std::string name;
  std::string path;             // file(s) it came from
  double memory_gib = 0;        // usable device memory
  double reserved_gib = 0;      // CUDA context, cuBLAS workspaces, NCCL buffers (outside tensors)
  double bf16_peak_tflops = 0;  // dense peak used for MFU
  int gpus_per_node = 8;
  double nvlink_gbps = 0;        // per-GPU bus bandwidth of NCCL collectives inside a node
  double network_gbps = 0;       // per-GPU bus bandwidth of NCCL collectives across nodes
  double nvlink_latency_us = 0;  // per collective call
  double network_latency_us = 0;
  double copy_gbps = 0;  // device-to-device copy: rate of memory-bound ops not listed
  // Share of overlapped communication time that still slows compute.
  double comm_overlap_slowdown = 0;
  double host_step_ms = 0;  // host work per step before GPU work (batch packing; data_pack bench)
  std::vector<GemmRow> gemm;
  std::vector<AttentionRow> attention;
  std::map<std::string, double>
      memory_bound_gbps;  // op name (tests/bench/kernels_memory.cpp) -> GB/s
  std::vector<LayerRow> layers;

  // Seconds of one GEMM [m, n, k] in `pass`: a measured row of the same (pass, n, k) and m within
  // 25% gives its rate; otherwise the fitted time = 2mnk / R_pass + t0_pass.
  double gemm_seconds(GemmPass pass, int64_t m, int64_t n, int64_t k, bool fp8) const;
  // The fitted (R in FLOP/s, t0 in s) of a pass; exposed for the docs and tests.
  std::pair<double, double> gemm_fit(GemmPass pass, bool fp8) const;
  // Forward + backward attention rate (FLOP/s, 3.5x forward FLOPs counted) at this head dim, from
  // the rows' time per score interpolated linearly in head dim between measured head dims (exact
  // at a measured one; the nearest row's rate outside their range).
  double attention_fwd_bwd_flops(int head_dim) const;
  double attention_fwd_flops(int head_dim) const;
  // Memory-bound rate (bytes/s) of op `name`, or the copy rate when the op is not listed.
  double memory_bound_rate(const std::string& name) const;

 private:
  friend void merge_calibration(Calibration& base, const Calibration& extra);
  mutable std::map<int, std::pair<double, double>> fit_cache_;  // pass * 2 + fp8 -> (R, t0)
};

// Reads a calibration file; every missing or malformed field is an error naming the file and field.
Calibration load_calibration(const std::string& path);
// Adds the rows of `extra` (e.g. a helix_bench_layer_slice output) to `base`: its GEMM rows are
// looked up first, its attention rows replace base's rows of the same head dims, its layer rows are
// added; scalars in extra that are non-zero replace base's.
void merge_calibration(Calibration& base, const Calibration& extra);
const char* gemm_pass_name(GemmPass p);

}  // namespace helix
