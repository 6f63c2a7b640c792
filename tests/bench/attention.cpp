// helix_bench_attention: packed-THD attention forward and forward+backward TFLOP/s on protein-like
// batches (log-normal lengths, median 300, clipped to [8, 1024], about 64k tokens) and long
// sequences (16 x 4096, 4 x 16384 tokens), head dims 64 (H = 20, ESM-2 650M) and 128 (H = 40, ESM-2
// 15B), bidirectional unless --causal. One JSON line per case on stdout. The lengths (fixed seed)
// are written to --lengths-out so that examples/bench/attention_torch.py runs PyTorch on the same.
// FLOPs: 4 * H * D * sum(s^2) forward, 2.5x that backward (fwd+bwd = 3.5x), halved for causal.
//   helix_bench_attention [--lengths-out FILE] [--iters N] [--warmup N] [--causal]
//                         [--deterministic] [--cases protein,long4k,long16k] [--dims 64,128]
//                         [--bwd-tiling default|keys64|keys128|tiled2d|wgmma[,...]]
//                         [--fwd-tiling default|rows16|rows32|wgmma[,...]]
// With several tilings every combination is timed on the same data, one JSON line each (rows16 and
// rows32 differ at D = 128 only: at other head dims they run only when listed first).
#include "kernels/attention/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/device.h"
#include "core/random.h"
#include "core/tensor.h"

#if HELIX_WITH_CUDA
#include <cuda_runtime.h>

#include "core/cuda_check.h"
#endif

namespace helix {
namespace {

// What every case runs with (from the command line).
struct BenchOptions {
  AttentionMask mask = AttentionMask::kBidirectional;
  AttentionBwdMode mode = AttentionBwdMode::kAtomic;
  std::vector<std::pair<std::string, AttentionBwdTiling>> bwd_tilings = {
      {"default", AttentionBwdTiling::kDefault}};
  std::vector<std::pair<std::string, AttentionFwdTiling>> fwd_tilings = {
      {"default", AttentionFwdTiling::kDefault}};
  int warmup = 3, iters = 10;
};

struct Case {
  std::string name;
  std::vector<int32_t> lengths;
};

// Protein-like lengths: log-normal with median 300 (sigma 0.6), clipped to [8, 1024], drawn until
// the next one would pass 65536 tokens. Fixed seed: both sides of the comparison read the file.
std::vector<int32_t> protein_lengths(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(std::log(300.0), 0.6);
  std::vector<int32_t> lens;
  int64_t total = 0;
  for (;;) {
    const int32_t len =
        static_cast<int32_t>(std::clamp(std::lround(std::exp(normal(rng))), 8L, 1024L));
    if (total + len > 65536) break;
    lens.push_back(len);
    total += len;
  }
  return lens;
}

std::vector<Case> all_cases() {
  return {{"protein", protein_lengths(1234)},
          {"long4k", std::vector<int32_t>(16, 4096)},
          {"long16k", std::vector<int32_t>(4, 16384)}};
}

int heads_for(int dim) { return dim == 64 ? 20 : 40; }

void write_lengths(const std::string& path, const std::vector<Case>& cases) {
  FILE* f = std::fopen(path.c_str(), "w");
  HELIX_CHECK(f != nullptr, "--lengths-out: cannot write {}", path);
  std::fprintf(f, "{\"heads\": {\"64\": %d, \"128\": %d}, \"cases\": {", heads_for(64),
               heads_for(128));
  for (size_t c = 0; c < cases.size(); ++c) {
    std::fprintf(f, "%s\"%s\": [", c ? ", " : "", cases[c].name.c_str());
    for (size_t i = 0; i < cases[c].lengths.size(); ++i)
      std::fprintf(f, "%s%d", i ? ", " : "", cases[c].lengths[i]);
    std::fprintf(f, "]");
  }
  std::fprintf(f, "}}\n");
  std::fclose(f);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

#if HELIX_WITH_CUDA
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median milliseconds of `f` over `iters` runs (each timed with events) after `warmup` runs.
double time_ms(const std::function<void()>& f, const Stream& s, int warmup, int iters) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    Event start(s.device()), end(s.device());
    start.record(s);
    f();
    end.record(s);
    end.synchronize();
    ms.push_back(start.elapsed_ms(end));
  }
  return median(ms);
}

// One timed configuration of one case.
struct Result {
  const Case* c = nullptr;
  int dim = 0, heads = 0, max_seqlen = 0;
  int64_t tokens = 0;
  std::string bwd_tiling, fwd_tiling;
  double fwd_ms = 0, fwdbwd_ms = 0, flops = 0;  // flops: forward FLOPs
};

void print_result(const Result& r, const BenchOptions& opt, const std::string& device_name) {
  std::printf(
      "{\"impl\": \"helix\", \"case\": \"%s\", \"mask\": \"%s\", \"head_dim\": %d, \"heads\": %d, "
      "\"seqs\": %zu, \"tokens\": %lld, \"max_seqlen\": %d, \"bwd_mode\": \"%s\", "
      "\"bwd_tiling\": \"%s\", \"fwd_tiling\": \"%s\", "
      "\"fwd_ms\": %.4f, \"fwd_tflops\": %.2f, \"fwdbwd_ms\": %.4f, \"fwdbwd_tflops\": %.2f, "
      "\"device\": \"%s\"}\n",
      r.c->name.c_str(), opt.mask == AttentionMask::kCausal ? "causal" : "bidirectional", r.dim,
      r.heads, r.c->lengths.size(), static_cast<long long>(r.tokens), r.max_seqlen,
      opt.mode == AttentionBwdMode::kAtomic ? "atomic" : "deterministic", r.bwd_tiling.c_str(),
      r.fwd_tiling.c_str(), r.fwd_ms, r.flops / r.fwd_ms * 1e-9, r.fwdbwd_ms,
      3.5 * r.flops / r.fwdbwd_ms * 1e-9, device_name.c_str());
  std::fflush(stdout);
}

void run_case(const Case& c, int dim, const BenchOptions& opt, const std::string& device_name) {
  const AttentionMask mask = opt.mask;
  const AttentionBwdMode mode = opt.mode;
  const int warmup = opt.warmup, iters = opt.iters;
  const Device dev = Device::cuda();
  const Stream s = Stream::create(dev);
  const int heads = heads_for(dim);
  int64_t tokens = 0;
  for (int32_t l : c.lengths) tokens += l;
  ThdAttentionLayout layout;
  layout.cu_seqlens_q = CuSeqlens::from_lengths(c.lengths, dev);
  layout.cu_seqlens_kv = layout.cu_seqlens_q;
  layout.max_seqlen_q = layout.max_seqlen_kv =
      *std::max_element(c.lengths.begin(), c.lengths.end());
  auto make = [&](uint64_t sub) {
    Tensor t = Tensor::empty({tokens, heads, dim}, DType::kBF16, dev, s);
    fill_normal(t, 42, sub, 0.f, 1.f, s);
    return t;
  };
  ThdAttentionFwdParams f;
  f.q = make(1);
  f.k = make(2);
  f.v = make(3);
  f.layout = layout;
  f.softmax_scale = static_cast<float>(1.0 / std::sqrt(double(dim)));
  f.mask = mask;
  f.o = Tensor::empty({tokens, heads, dim}, DType::kBF16, dev, s);
  f.lse = Tensor::empty({heads, tokens}, DType::kF32, dev, s);
  ThdAttentionBwdParams b;
  b.q = f.q;
  b.k = f.k;
  b.v = f.v;
  b.o = f.o;
  b.d_o = make(4);
  b.lse = f.lse;
  b.layout = layout;
  b.softmax_scale = f.softmax_scale;
  b.mask = mask;
  b.mode = mode;
  b.d_q = Tensor::empty({tokens, heads, dim}, DType::kBF16, dev, s);
  b.d_k = Tensor::empty({tokens, heads, dim}, DType::kBF16, dev, s);
  b.d_v = Tensor::empty({tokens, heads, dim}, DType::kBF16, dev, s);

  const double flops = thd_attention_fwd_flops(layout, heads, dim, mask);
  for (const auto& [bwd_name, bwd_tiling] : opt.bwd_tilings) {
    for (size_t fi = 0; fi < opt.fwd_tilings.size(); ++fi) {
      const auto& [fwd_name, fwd_tiling] = opt.fwd_tilings[fi];
      const bool rows_only = fwd_tiling == AttentionFwdTiling::kRows16 ||
                             fwd_tiling == AttentionFwdTiling::kRows32;
      if (fi > 0 && dim != 128 && rows_only) continue;
      f.tiling = fwd_tiling;
      b.tiling = bwd_tiling;
      Result r;
      r.c = &c;
      r.dim = dim;
      r.heads = heads;
      r.max_seqlen = layout.max_seqlen_q;
      r.tokens = tokens;
      r.bwd_tiling = bwd_name;
      r.fwd_tiling = fwd_name;
      r.flops = flops;
      r.fwd_ms = time_ms([&] { thd_attention_fwd(f, s); }, s, warmup, iters);
      r.fwdbwd_ms = time_ms(
          [&] {
            thd_attention_fwd(f, s);
            thd_attention_bwd(b, s);
          },
          s, warmup, iters);
      print_result(r, opt, device_name);
    }
  }
}

#endif

int bench_main(int argc, char** argv) {
  std::string lengths_out, case_list = "protein,long4k,long16k", dim_list = "64,128";
  BenchOptions opt;
  int& iters = opt.iters;
  int& warmup = opt.warmup;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      HELIX_CHECK(i + 1 < argc, "{}: expected a value", a);
      return argv[++i];
    };
    if (a == "--lengths-out")
      lengths_out = next();
    else if (a == "--iters")
      iters = std::atoi(next().c_str());
    else if (a == "--warmup")
      warmup = std::atoi(next().c_str());
    else if (a == "--cases")
      case_list = next();
    else if (a == "--dims")
      dim_list = next();
    else if (a == "--causal")
      opt.mask = AttentionMask::kCausal;
    else if (a == "--deterministic")
      opt.mode = AttentionBwdMode::kDeterministic;
    else if (a == "--bwd-tiling") {
      opt.bwd_tilings.clear();
      for (const std::string& name : split(next())) {
        const AttentionBwdTiling t = name == "keys64"    ? AttentionBwdTiling::kKeys64
                                     : name == "keys128" ? AttentionBwdTiling::kKeys128
                                     : name == "tiled2d" ? AttentionBwdTiling::kTiled2D
                                     : name == "wgmma"   ? AttentionBwdTiling::kWgmma
                                                         : AttentionBwdTiling::kDefault;
        HELIX_CHECK(name == "default" || t != AttentionBwdTiling::kDefault,
                    "--bwd-tiling: expected default, keys64, keys128, tiled2d or wgmma, got {}",
                    name);
        opt.bwd_tilings.emplace_back(name, t);
      }
      HELIX_CHECK(!opt.bwd_tilings.empty(), "--bwd-tiling: expected at least one tiling");
    } else if (a == "--fwd-tiling") {
      opt.fwd_tilings.clear();
      for (const std::string& name : split(next())) {
        const AttentionFwdTiling t = name == "rows16"   ? AttentionFwdTiling::kRows16
                                     : name == "rows32" ? AttentionFwdTiling::kRows32
                                     : name == "wgmma"  ? AttentionFwdTiling::kWgmma
                                                        : AttentionFwdTiling::kDefault;
        HELIX_CHECK(name == "default" || t != AttentionFwdTiling::kDefault,
                    "--fwd-tiling: expected default, rows16, rows32 or wgmma, got {}", name);
        opt.fwd_tilings.emplace_back(name, t);
      }
      HELIX_CHECK(!opt.fwd_tilings.empty(), "--fwd-tiling: expected at least one tiling");
    } else {
      HELIX_FAIL("unknown argument {} (see the header of tests/bench/attention.cpp)", a);
    }
  }
  HELIX_CHECK(iters >= 1 && warmup >= 0, "--iters: expected >= 1, got {}", iters);
  const std::vector<Case> cases = all_cases();
  if (!lengths_out.empty()) write_lengths(lengths_out, cases);
  if (!cuda_available()) {
    std::fprintf(stderr, "helix_bench_attention: needs a CUDA GPU: %s\n",
                 cuda_unavailable_reason().c_str());
    return 2;
  }
#if HELIX_WITH_CUDA
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  for (const std::string& name : split(case_list)) {
    const auto it =
        std::find_if(cases.begin(), cases.end(), [&](const Case& c) { return c.name == name; });
    HELIX_CHECK(it != cases.end(), "--cases: expected protein, long4k or long16k, got {}", name);
    for (const std::string& d : split(dim_list)) {
      const int dim = std::atoi(d.c_str());
      HELIX_CHECK(dim == 64 || dim == 128, "--dims: expected 64 or 128, got {}", d);
      run_case(*it, dim, opt, prop.name);
    }
  }
#endif
  return 0;
}

}  // namespace
}  // namespace helix

int main(int argc, char** argv) {
  try {
    return helix::bench_main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "helix_bench_attention: %s\n", e.what());
    return 1;
  }
}
