// helix_bench_layer_slice: calibration for `helix plan`. For each case (a model's layer, or the
// slice of it one GPU runs under tensor parallelism tp: heads/tp, ffn/tp), at T packed tokens of
// protein-like lengths, it times
//   * the layer's GEMMs through gemm() exactly as layers/linear.cpp calls them (forward, dgrad into
//     a bf16 gradient with beta 1, wgrad into an f32 gradient with beta 1),
//   * THD attention forward and forward+backward on the slice's heads (kernels/attention),
//   * for tp = 1 the whole transformer layer forward + backward through the same nodes and tape
//     that Esm2Model builds (layers/esm2.cpp), including the autograd and memory-bound work,
// and writes a calibration JSON (`gemm`, `attention`, `layers` rows) that `helix plan` merges with
// --calibration-extra. TFLOP/s = 2MNK / time (GEMMs); attention as docs/perf/attention.md counts.
//   helix_bench_layer_slice [--out FILE] [--tokens T] [--iters N] [--cases a,b,...] [--cpu-smoke]
// Cases: esm2-150m, esm2-650m, esm2-3b, esm2-15b (tp 1) and esm3-98b-tp8, esm3-98b-tp4 (the 98B
// configuration's per-GPU slices). --cpu-smoke runs a tiny case on the CPU (checks the harness and
// the JSON; its rates mean nothing). Without a GPU and without --cpu-smoke it says so and exits 0.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/device.h"
#include "core/json.h"
#include "core/random.h"
#include "core/tensor.h"
#include "core/thd_batch.h"
#include "kernels/attention/attention.h"
#include "kernels/gemm/gemm.h"
#include "layers/attention.h"
#include "layers/layernorm_linear.h"
#include "layers/layernorm_mlp.h"
#include "layers/linear.h"

namespace helix {
namespace {

struct SliceCase {
  std::string name;
  int hidden, heads, ffn, tp;
};

const SliceCase kCases[] = {
    {"esm2-150m", 640, 20, 2560, 1},
    {"esm2-650m", 1280, 20, 5120, 1},
    {"esm2-3b", 2560, 40, 10240, 1},
    {"esm2-15b", 5120, 40, 20480, 1},
    {"esm3-98b-tp8", 6144, 96, 24576, 8},
    {"esm3-98b-tp4", 6144, 96, 24576, 4},
    {"tiny", 64, 4, 128, 1},
};

// Protein-like lengths: log-normal (median 300, sigma 0.6) clipped to [8, 1024], drawn with a fixed
// LCG until T tokens are filled (the last one cut to fit), as tests/bench/attention.cpp draws them.
std::vector<int> protein_lengths(int64_t tokens) {
  uint64_t s = 12345;
  const auto uniform = [&s] {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return (double((s >> 11) & ((1ull << 53) - 1)) + 0.5) / double(1ull << 53);
  };
  std::vector<int> lens;
  int64_t left = tokens;
  while (left > 0) {
    const double z = std::sqrt(-2 * std::log(uniform())) * std::cos(2 * M_PI * uniform());
    int len = static_cast<int>(std::lround(300.0 * std::exp(0.6 * z)));
    len = std::max(8, std::min(1024, len));
    len = static_cast<int>(std::min<int64_t>(len, left));
    lens.push_back(len);
    left -= len;
  }
  return lens;
}

ThdBatch batch_of(const std::vector<int>& lens, Device d) {
  std::vector<int32_t> cu{0};
  for (int l : lens) cu.push_back(cu.back() + l);
  ThdBatch b;
  const int64_t t = cu.back();
  b.tokens = Tensor::zeros({t}, DType::kI32).to(d);
  b.labels = Tensor::zeros({t}, DType::kI32).to(d);
  b.cu_seqlens = Tensor::from_vector<int32_t>(cu, Shape{int64_t(cu.size())});
  b.cu_seqlens_padded = b.cu_seqlens.clone();
  b.max_seqlen = *std::max_element(lens.begin(), lens.end());
  b.num_tokens = t;
  return b.to(d);
}

Tensor random(const Shape& shape, DType dtype, uint64_t seed, const Stream& s, float scale = 1.0f) {
  Tensor t = Tensor::empty(shape, dtype, s.device(), s);
  fill_uniform(t, seed, 0, -scale, scale, s);
  return t;
}

double time_ms(const std::function<void()>& f, const Stream& s, int iters) {
  for (int i = 0; i < 2; ++i) f();
  Event start(s.device()), end(s.device());
  start.record(s);
  for (int i = 0; i < iters; ++i) f();
  end.record(s);
  end.synchronize();
  return start.elapsed_ms(end) / iters;
}

struct Linear {
  const char* name;
  int64_t out, in;
};

void bench_case(const SliceCase& c, int64_t tokens, int iters, const Stream& s,
                Json::Array& gemm_rows, Json::Array& attn_rows, Json::Array& layer_rows) {
  const int64_t t = tokens, h = c.hidden, hr = h / c.tp, fr = c.ffn / c.tp, heads = c.heads / c.tp,
                d = h / c.heads;
  const DType bf = DType::kBF16;
  std::printf("%s (tp %d): T=%lld, hidden %lld, %lld heads of %lld per GPU, ffn %lld per GPU\n",
              c.name.c_str(), c.tp, (long long)t, (long long)h, (long long)heads, (long long)d,
              (long long)fr);
  // GEMMs of the slice, as layers/linear.cpp runs them.
  const Linear linears[] = {
      {"qkv", 3 * hr, h}, {"out_proj", h, hr}, {"fc1", fr, h}, {"fc2", h, fr}};
  for (const Linear& l : linears) {
    Tensor x = random({t, l.in}, bf, 1, s), w = random({l.out, l.in}, bf, 2, s, 0.02f);
    Tensor y = Tensor::empty({t, l.out}, bf, s.device(), s), dy = random({t, l.out}, bf, 3, s);
    Tensor dx = Tensor::zeros({t, l.in}, bf, s.device(), s),
           dw = Tensor::zeros({l.out, l.in}, DType::kF32, s.device(), s);
    GemmParams fwd{.a = x, .b = w, .c = y, .op_b = GemmOp::kTranspose};
    GemmParams dgrad{.a = dy, .b = w, .c = dx, .beta = 1.0f};
    GemmParams wgrad{.a = dy, .b = x, .c = dw, .op_a = GemmOp::kTranspose, .beta = 1.0f};
    const std::pair<const char*, GemmParams*> passes[] = {
        {"fwd", &fwd}, {"dgrad", &dgrad}, {"wgrad", &wgrad}};
    for (auto [pass, p] : passes) {
      const GemmShape g = gemm_shape(*p);
      const double ms = time_ms([&] { gemm(*p, s); }, s, iters);
      const double tflops = 2.0 * g.m * g.n * g.k / (ms * 1e-3) / 1e12;
      std::printf("  gemm %-8s %-5s M %6lld N %6lld K %6lld  %8.3f ms  %7.1f TFLOP/s\n", l.name,
                  pass, (long long)g.m, (long long)g.n, (long long)g.k, ms, tflops);
      Json::Object row;
      row["source"] = c.name + " " + l.name + " " + pass;
      row["pass"] = pass;
      row["m"] = g.m;
      row["n"] = g.n;
      row["k"] = g.k;
      row["bf16_tflops"] = tflops;
      gemm_rows.push_back(Json(std::move(row)));
    }
  }
  // Attention on the slice's heads.
  const std::vector<int> lens = protein_lengths(t);
  double sum_sq = 0;
  for (int l : lens) sum_sq += double(l) * l;
  const double seq_len = sum_sq / double(t);
  const ThdBatch batch = batch_of(lens, s.device());
  {
    const AttentionInputs ai = AttentionInputs::from_batch(batch, int(heads), int(d));
    ThdAttentionFwdParams f;
    f.q = random({t, heads, d}, bf, 4, s);
    f.k = random({t, heads, d}, bf, 5, s);
    f.v = random({t, heads, d}, bf, 6, s);
    f.layout = ai.seqlens;
    f.softmax_scale = ai.softmax_scale;
    f.o = Tensor::empty({t, heads, d}, bf, s.device(), s);
    f.lse = Tensor::empty({heads, t}, DType::kF32, s.device(), s);
    ThdAttentionBwdParams b;
    b.q = f.q;
    b.k = f.k;
    b.v = f.v;
    b.o = f.o;
    b.d_o = random({t, heads, d}, bf, 7, s);
    b.lse = f.lse;
    b.layout = f.layout;
    b.softmax_scale = f.softmax_scale;
    b.d_q = Tensor::empty({t, heads, d}, bf, s.device(), s);
    b.d_k = Tensor::empty({t, heads, d}, bf, s.device(), s);
    b.d_v = Tensor::empty({t, heads, d}, bf, s.device(), s);
    const double fwd_ms = time_ms([&] { thd_attention_fwd(f, s); }, s, iters);
    const double fb_ms = time_ms(
        [&] {
          thd_attention_fwd(f, s);
          thd_attention_bwd(b, s);
        },
        s, iters);
    const double fwd_flops = 4.0 * double(heads) * double(d) * sum_sq;
    Json::Object row;
    row["source"] = c.name;
    row["head_dim"] = d;
    row["heads"] = heads;
    row["seq_len"] = seq_len;
    row["fwd_tflops"] = fwd_flops / (fwd_ms * 1e-3) / 1e12;
    row["fwd_bwd_tflops"] = 3.5 * fwd_flops / (fb_ms * 1e-3) / 1e12;
    std::printf(
        "  attention %lld heads of %lld, sum s^2/T %.0f: fwd %.3f ms (%.1f TFLOP/s), fwd+bwd %.3f "
        "ms (%.1f)\n",
        (long long)heads, (long long)d, seq_len, fwd_ms, row["fwd_tflops"].as_double(), fb_ms,
        row["fwd_bwd_tflops"].as_double());
    attn_rows.push_back(Json(std::move(row)));
  }
  if (c.tp != 1)
    return;  // the TP graph's layer needs its communicators: GEMM and attention rows only
  // The whole layer, as Esm2Model::forward's single-device segment builds it.
  const float eps = 1e-5f;
  auto attn = std::make_shared<const AttentionInputs>(
      AttentionInputs::from_batch(batch, int(heads), int(d)));
  const auto param = [&](const Shape& shape, uint64_t seed, float scale) {
    return Var::leaf(random(shape, bf, seed, s, scale), true, DType::kF32);
  };
  const auto ones = [&](int64_t n) {
    Tensor g = Tensor::empty({n}, bf, s.device(), s);
    fill_uniform(g, 9, 0, 0.9f, 1.1f, s);
    return Var::leaf(g, true, DType::kF32);
  };
  Var ln1w = ones(h), ln1b = param({h}, 10, 0.01f), wqkv = param({3 * h, h}, 11, 0.02f),
      bqkv = param({3 * h}, 12, 0.01f);
  Var wo = param({h, h}, 13, 0.02f), bo = param({h}, 14, 0.01f), ln2w = ones(h),
      ln2b = param({h}, 15, 0.01f);
  Var w1 = param({c.ffn, h}, 16, 0.02f), b1 = param({c.ffn}, 17, 0.01f),
      w2 = param({h, c.ffn}, 18, 0.02f);
  Var b2 = param({h}, 19, 0.01f);
  Tensor x0 = random({t, h}, bf, 20, s), dy = random({t, h}, bf, 21, s);
  const auto step = [&] {
    TapeOptions to;
    to.stream = s;
    Tape tape(to);
    Var x = Var::leaf(x0, true);
    Var qkv = tape.apply1(std::make_shared<LayerNormLinearNode>(eps), {x, ln1w, ln1b, wqkv, bqkv});
    Var a = tape.apply1(std::make_shared<AttentionNode>(attn), {qkv});
    Var hh = tape.apply1(std::make_shared<LinearResidualNode>(), {a, wo, bo, x});
    Var y = tape.apply1(std::make_shared<LayerNormMlpNode>(eps), {hh, ln2w, ln2b, w1, b1, w2, b2});
    tape.backward({y}, {dy});
  };
  const double ms = time_ms(step, s, iters);
  std::printf("  layer forward+backward (fused single-GPU graph): %.3f ms\n", ms);
  Json::Object row;
  row["name"] = c.name;
  row["hidden"] = h;
  row["heads"] = c.heads;
  row["ffn"] = c.ffn;
  row["tp"] = c.tp;
  row["tokens"] = t;
  row["seq_len"] = seq_len;
  row["fwd_bwd_ms"] = ms;
  layer_rows.push_back(Json(std::move(row)));
}

int run(int argc, char** argv) {
  std::string out = "layer_slice.json",
              cases = "esm2-150m,esm2-650m,esm2-3b,esm2-15b,esm3-98b-tp8,esm3-98b-tp4";
  int64_t tokens = 16384;
  int iters = 10;
  bool cpu_smoke = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "helix_bench_layer_slice: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--out")
      out = value();
    else if (a == "--tokens")
      tokens = std::atoll(value().c_str());
    else if (a == "--iters")
      iters = std::atoi(value().c_str());
    else if (a == "--cases")
      cases = value();
    else if (a == "--cpu-smoke")
      cpu_smoke = true;
    else {
      std::fprintf(stderr,
                   "helix_bench_layer_slice: unknown option '%s' (--out, --tokens, --iters, "
                   "--cases, --cpu-smoke)\n",
                   a.c_str());
      return 2;
    }
  }
  if (tokens < 16 || iters < 1) {
    std::fprintf(stderr, "helix_bench_layer_slice: expected --tokens >= 16 and --iters >= 1\n");
    return 2;
  }
  Stream s;
  if (cpu_smoke) {
    cases = "tiny";
    tokens = std::min<int64_t>(tokens, 256);
    iters = 1;
  } else if (cuda_device_count() == 0) {
    std::printf(
        "helix_bench_layer_slice: no GPU (%s); nothing measured (--cpu-smoke checks the harness)\n",
        cuda_unavailable_reason().c_str());
    return 0;
  } else {
    s = Stream::cuda_default(0);
  }
  Json::Array gemm_rows, attn_rows, layer_rows;
  std::stringstream list(cases);
  for (std::string name; std::getline(list, name, ',');) {
    const SliceCase* c = nullptr;
    for (const SliceCase& k : kCases)
      if (k.name == name) c = &k;
    if (!c) {
      std::fprintf(stderr, "helix_bench_layer_slice: --cases: unknown case '%s'\n", name.c_str());
      return 2;
    }
    bench_case(*c, tokens, iters, s, gemm_rows, attn_rows, layer_rows);
  }
  Json::Object root;
  root["name"] = cpu_smoke ? "cpu smoke (not a calibration)" : "helix_bench_layer_slice";
  root["about"] =
      "measured by tests/bench/layer_slice.cpp; merge with helix plan --calibration-extra";
  root["tokens"] = tokens;
  root["gemm"] = Json(std::move(gemm_rows));
  root["attention"] = Json(std::move(attn_rows));
  root["layers"] = Json(std::move(layer_rows));
  std::ofstream f(out);
  f << Json(std::move(root)).dump(1) << "\n";
  if (!f.good()) {
    std::fprintf(stderr, "helix_bench_layer_slice: cannot write '%s'\n", out.c_str());
    return 1;
  }
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace
}  // namespace helix

int main(int argc, char** argv) {
  try {
    return helix::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "helix_bench_layer_slice: %s\n", e.what());
    return 1;
  }
}
