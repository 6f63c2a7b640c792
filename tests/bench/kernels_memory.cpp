// helix_bench_kernels_memory: achieved memory bandwidth of the memory-bound ops of an ESM-2
// training step (ESM-2 650M and 3B shapes at 16384 packed tokens), each called as the layers call
// it (bf16 activations, f32 statistics and weight gradients, accumulate flags of the autograd
// contract), against a device-to-device cudaMemcpyAsync measured in the same run. Prints a table
// and, at the end, one JSON line per op.
//   helix_bench_kernels_memory [tokens=16384] [iterations=20]
//
// Method. Every op is run 5 times (warm-up), then `iterations` times between two CUDA events on one
// stream; time = mean per run. bytes = the minimum the op must move: each input element read once,
// each output element written once, read-modify-write (accumulated) outputs counted twice; scratch
// buffers of an implementation (partial sums, sort keys) are not counted. The formula of each op is
// given beside its case below (T tokens, C hidden, F ffn, H heads, D = 64 head dim, V = 33 vocab,
// b sequences, P parameters; bf16 = 2 bytes, f32 and i32 = 4, fp8 = 1).
//   GB/s  = bytes / time / 1e9
//   copy  = 2 * n / t_copy / 1e9 for one cudaMemcpyAsync (device to device) of n = bytes / 2 (the
//           copy then moves as many bytes as the op), n capped at 2 GiB (copy bandwidth is flat
//           long before that); each size is measured once per run
//   ratio = GB/s / copy (issue 3's goal: >= 0.8 at large sizes)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/device.h"
#include "core/random.h"
#include "core/tensor.h"
#include "kernels/adamw/adamw.h"
#include "kernels/axpy/axpy.h"
#include "kernels/cast/cast.h"
#include "kernels/cross_entropy/cross_entropy.h"
#include "kernels/embedding/embedding.h"
#include "kernels/gelu/gelu.h"
#include "kernels/grad_norm/grad_norm.h"
#include "kernels/layernorm/layernorm.h"
#include "kernels/qkv/qkv.h"
#include "kernels/rotary/rotary.h"
#include "layers/esm2.h"
#include "layers/model_config.h"

#if HELIX_WITH_CUDA
#include "core/cuda_check.h"

namespace helix {
namespace {

constexpr int64_t kBf16 = 2, kF32 = 4, kI32 = 4, kFp8 = 1;
constexpr int kWarmup = 5;
constexpr size_t kMaxCopyBytes = size_t(2) << 30;

// Mean milliseconds of f over `iters` back-to-back runs on s (after kWarmup runs).
double time_ms(const std::function<void()>& f, const Stream& s, int iters) {
  for (int i = 0; i < kWarmup; ++i) f();
  Event start(s.device()), end(s.device());
  start.record(s);
  for (int i = 0; i < iters; ++i) f();
  end.record(s);
  end.synchronize();
  return start.elapsed_ms(end) / iters;
}

// The reference: device-to-device copies of prefixes of two 2 GiB buffers, one bandwidth per size.
class CopyReference {
 public:
  CopyReference(const Stream& s, int iters)
      : s_(s),
        iters_(iters),
        src_(Tensor::zeros({int64_t(kMaxCopyBytes)}, DType::kU8, s.device(), s)),
        dst_(Tensor::zeros({int64_t(kMaxCopyBytes)}, DType::kU8, s.device(), s)) {}

  // GB/s (2 * n / time) of a copy of n = op_bytes / 2 bytes (16-byte multiple, capped).
  double gbps(int64_t op_bytes) {
    const size_t n = std::clamp<size_t>((size_t(op_bytes) / 2 + 15) / 16 * 16, 16, kMaxCopyBytes);
    auto it = cache_.find(n);
    if (it != cache_.end()) return it->second;
    const cudaStream_t st = static_cast<cudaStream_t>(s_.handle());
    const double ms = time_ms(
        [&] {
          CUDA_CHECK(
              cudaMemcpyAsync(dst_.data_ptr(), src_.data_ptr(), n, cudaMemcpyDeviceToDevice, st));
        },
        s_, iters_);
    const double g = 2.0 * double(n) / (ms * 1e-3) / 1e9;
    cache_.emplace(n, g);
    return g;
  }

 private:
  Stream s_;
  int iters_;
  Tensor src_, dst_;  // [2 GiB] u8
  std::map<size_t, double> cache_;
};

struct Result {
  std::string model, op, shape;
  int64_t bytes = 0;
  double ms = 0, gbps = 0, copy_gbps = 0;
};

class Bench {
 public:
  Bench(const Stream& s, int iters) : s_(s), iters_(iters), copy_(s, iters) {}

  void run(const std::string& model, const std::string& op, const std::string& shape, int64_t bytes,
           const std::function<void()>& f) {
    Result r{model, op, shape, bytes};
    r.ms = time_ms(f, s_, iters_);
    r.gbps = double(bytes) / (r.ms * 1e-3) / 1e9;
    r.copy_gbps = copy_.gbps(bytes);
    std::printf("%-5s %-24s %-26s %10.2f %10.1f %8.0f %8.0f %6.2f\n", r.model.c_str(), r.op.c_str(),
                r.shape.c_str(), double(bytes) / 1e6, r.ms * 1e3, r.gbps, r.copy_gbps,
                r.gbps / r.copy_gbps);
    std::fflush(stdout);
    results_.push_back(r);
  }

  void print_json() const {
    for (const Result& r : results_)
      std::printf(
          "{\"bench\": \"kernels_memory\", \"model\": \"%s\", \"op\": \"%s\", \"shape\": \"%s\", "
          "\"bytes\": %lld, \"us\": %.3f, \"gbps\": %.1f, \"copy_gbps\": %.1f, \"ratio\": %.3f}\n",
          r.model.c_str(), r.op.c_str(), r.shape.c_str(), (long long)r.bytes, r.ms * 1e3, r.gbps,
          r.copy_gbps, r.gbps / r.copy_gbps);
  }

 private:
  Stream s_;
  int iters_;
  CopyReference copy_;
  std::vector<Result> results_;
};

std::string dims(std::initializer_list<int64_t> d) {
  std::string s = "[";
  for (int64_t x : d) s += (s.size() > 1 ? ", " : "") + std::to_string(x);
  return s + "]";
}

Tensor rand_dev(const Shape& shape, DType dtype, uint64_t seed, const Stream& s) {
  Tensor t = Tensor::empty(shape, dtype, s.device(), s);
  fill_uniform(t, seed, 0, -1.0f, 1.0f, s);
  return t;
}

// A packed batch of protein-like sequences: log-normal lengths (median 300) clipped to [8, 1024],
// the last one cut so that they sum to exactly `tokens`. Token ids: amino acids 4..23 and 12% mask
// tokens (32); labels: 15% of the tokens carry a class in [0, 33), the rest ignore_index -100.
struct Batch {
  Tensor cu_seqlens;  // [b+1] i32 on the device
  Tensor ids;         // [T] i32
  Tensor labels;      // [T] i32
  int64_t seqs = 0;
};

Batch make_batch(int64_t tokens, int vocab, int mask_id, Device dev) {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> len_dist(std::log(300.0), 0.6);
  std::vector<int32_t> cu{0};
  while (cu.back() < tokens) {
    const int64_t len = std::clamp<int64_t>(std::llround(std::exp(len_dist(rng))), 8, 1024);
    cu.push_back(static_cast<int32_t>(std::min<int64_t>(cu.back() + len, tokens)));
  }
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int32_t> ids(static_cast<size_t>(tokens)), labels(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    ids[size_t(t)] = u(rng) < 0.12 ? mask_id : 4 + static_cast<int32_t>(rng() % 20);
    labels[size_t(t)] = u(rng) < 0.15 ? static_cast<int32_t>(rng() % uint64_t(vocab)) : -100;
  }
  Batch b;
  b.seqs = int64_t(cu.size()) - 1;
  b.cu_seqlens = Tensor::from_vector(cu, {int64_t(cu.size())}, dev);
  b.ids = Tensor::from_vector(ids, {tokens}, dev);
  b.labels = Tensor::from_vector(labels, {tokens}, dev);
  return b;
}

// The activation ops of one transformer layer, the embedding and the loss.
void bench_activations(Bench& bench, const ModelConfig& cfg, const std::string& model, int64_t T,
                       const Stream& s) {
  const Device dev = s.device();
  const int64_t C = cfg.hidden, F = cfg.ffn, H = cfg.heads, D = cfg.head_dim(), V = cfg.vocab;
  const Batch batch = make_batch(T, cfg.vocab, cfg.mask_token_id, dev);
  const std::string tc = dims({T, C}), tf = dims({T, F});

  // LayerNorm (layers/layernorm_linear.cpp): bf16 x, y and gamma/beta (the model copy), f32 stats.
  {
    Tensor x = rand_dev({T, C}, DType::kBF16, 1, s), res = rand_dev({T, C}, DType::kBF16, 2, s);
    Tensor gamma = rand_dev({C}, DType::kBF16, 3, s), beta = rand_dev({C}, DType::kBF16, 4, s);
    Tensor y = Tensor::empty({T, C}, DType::kBF16, dev, s);
    Tensor res_out = Tensor::empty({T, C}, DType::kBF16, dev, s);
    Tensor mean = Tensor::empty({T}, DType::kF32, dev, s);
    Tensor rstd = Tensor::empty({T}, DType::kF32, dev, s);
    LayerNormFwdParams f;
    f.x = x;
    f.gamma = gamma;
    f.beta = beta;
    f.y = y;
    f.mean = mean;
    f.rstd = rstd;
    // read x, write y: 2*T*C*2; write mean, rstd: T*2*4; read gamma, beta: 2*C*2
    bench.run(model, "layernorm_fwd", tc, 2 * T * C * kBf16 + 2 * T * kF32 + 2 * C * kBf16,
              [&] { layernorm_fwd(f, s); });
    LayerNormFwdParams fr = f;
    fr.residual = res;
    fr.residual_out = res_out;
    // read x, residual; write residual_out, y: 4*T*C*2; mean, rstd: T*2*4; gamma, beta: 2*C*2
    bench.run(model, "layernorm_fwd_residual", tc, 4 * T * C * kBf16 + 2 * T * kF32 + 2 * C * kBf16,
              [&] { layernorm_fwd(fr, s); });
    // The FP8 path's LayerNorm (layers/fp8_layers.cpp): fp8 codes and their transpose from one pass
    // (it replaces layernorm_fwd + cast_transpose_fp8 on [T, C]). read x: T*C*2; write y, y_t:
    // 2*T*C*1; mean, rstd: T*2*4; gamma, beta: 2*C*2; scale, amax: 3*4
    LayerNormFwdParams f8 = f;
    f8.y = Tensor::empty({T, C}, DType::kE4M3, dev, s);
    f8.y_t = Tensor::empty({C, T}, DType::kE4M3, dev, s);
    f8.y_scale = Tensor::from_floats({1.0f}, {1}, DType::kF32, dev);
    f8.y_amax = Tensor::zeros({1}, DType::kF32, dev, s);
    f8.accumulate_amax = true;
    bench.run(model, "layernorm_fwd_fp8_t", tc, T * C * (kBf16 + 2 * kFp8) + 2 * T * kF32 + 2 * C * kBf16 + 3 * kF32,
              [&] { layernorm_fwd(f8, s); });
    LayerNormBwdParams b;
    b.x = x;
    b.gamma = gamma;
    b.mean = mean;
    b.rstd = rstd;
    b.dy = rand_dev({T, C}, DType::kBF16, 5, s);
    b.dx = Tensor::zeros({T, C}, DType::kBF16, dev, s);
    b.accumulate_dx = true;
    b.dgamma = Tensor::zeros({C}, DType::kF32, dev, s);
    b.dbeta = Tensor::zeros({C}, DType::kF32, dev, s);
    // read x, dy: 2*T*C*2; dx += (read + write): 2*T*C*2; read mean, rstd: T*2*4; read gamma:
    // C*2; dgamma, dbeta += (read + write): 2*2*C*4
    bench.run(model, "layernorm_bwd", tc,
              4 * T * C * kBf16 + 2 * T * kF32 + C * kBf16 + 4 * C * kF32,
              [&] { layernorm_bwd(b, s); });
  }

  // GELU on the FC1 output (layers/layernorm_mlp.cpp): bf16; backward accumulates into a zeroed dx.
  {
    Tensor pre = rand_dev({T, F}, DType::kBF16, 6, s),
           h = Tensor::empty({T, F}, DType::kBF16, dev, s);
    // read x, write y: 2*T*F*2
    bench.run(model, "gelu_fwd", tf, 2 * T * F * kBf16,
              [&] { gelu_fwd(GeluFwdParams{.x = pre, .y = h}, s); });
    Tensor dh = rand_dev({T, F}, DType::kBF16, 7, s),
           dpre = Tensor::zeros({T, F}, DType::kBF16, dev, s);
    // read x, dy: 2*T*F*2; dx += (read + write): 2*T*F*2
    bench.run(model, "gelu_bwd", tf, 4 * T * F * kBf16, [&] {
      gelu_bwd(GeluBwdParams{.x = pre, .dy = dh, .dx = dpre, .accumulate_dx = true}, s);
    });
  }

  // Rotary in place on q and k [T, H, D] (layers/attention.cpp), positions from cu_seqlens.
  {
    Tensor q = rand_dev({T, H, D}, DType::kBF16, 8, s), k = rand_dev({T, H, D}, DType::kBF16, 9, s);
    const std::string shape = "q,k " + dims({T, H, D});
    // q, k read and written in place: 2*2*T*H*D*2; read cu_seqlens: (b+1)*4
    const int64_t bytes = 4 * T * H * D * kBf16 + (batch.seqs + 1) * kI32;
    RotaryPositions pos{.cu_seqlens = batch.cu_seqlens};
    bench.run(model, "rotary_fwd", shape, bytes,
              [&] { rotary_fwd(RotaryFwdParams{.q = q, .k = k, .pos = pos}, s); });
    bench.run(model, "rotary_bwd", shape, bytes,
              [&] { rotary_bwd(RotaryBwdParams{.dq = q, .dk = k, .pos = pos}, s); });
  }

  // Embedding with ESM-2 token dropout (layers/embedding.cpp): bf16 table and out, f32 dtable.
  {
    Tensor table = rand_dev({V, C}, DType::kBF16, 10, s),
           out = Tensor::empty({T, C}, DType::kBF16, dev, s);
    const EmbeddingTokenDropout td{
        .enabled = true, .mask_token_id = cfg.mask_token_id, .cu_seqlens = batch.cu_seqlens};
    // read ids: T*4; read table: V*C*2; write out: T*C*2; read cu_seqlens: (b+1)*4
    bench.run(
        model, "embedding_fwd", dims({T, C}) + " V=" + std::to_string(V),
        T * kI32 + V * C * kBf16 + T * C * kBf16 + (batch.seqs + 1) * kI32, [&] {
          embedding_fwd(
              EmbeddingFwdParams{.ids = batch.ids, .table = table, .out = out, .token_dropout = td},
              s);
        });
    Tensor dout = rand_dev({T, C}, DType::kBF16, 11, s),
           dtable = Tensor::zeros({V, C}, DType::kF32, dev, s);
    // read ids: T*4; read dout: T*C*2; dtable += (read + write): 2*V*C*4; cu_seqlens: (b+1)*4
    bench.run(model, "embedding_bwd", dims({T, C}) + " V=" + std::to_string(V),
              T * kI32 + T * C * kBf16 + 2 * V * C * kF32 + (batch.seqs + 1) * kI32, [&] {
                embedding_bwd(
                    EmbeddingBwdParams{
                        .ids = batch.ids, .dout = dout, .dtable = dtable, .token_dropout = td},
                    s);
              });
  }

  // Masked-LM cross-entropy (layers/masked_lm_loss.cpp): the forward computes the loss only, the
  // backward the fused loss and gradient.
  {
    Tensor logits = rand_dev({T, V}, DType::kBF16, 12, s),
           dlogits = Tensor::empty({T, V}, DType::kBF16, dev, s);
    Tensor loss = Tensor::empty({1}, DType::kF32, dev, s),
           count = Tensor::empty({1}, DType::kF32, dev, s);
    CrossEntropyParams p;
    p.logits = logits;
    p.labels = batch.labels;
    p.loss_sum = loss;
    p.count = count;
    // read logits: T*V*2; read labels: T*4; write loss, count: 2*4
    bench.run(model, "cross_entropy_fwd", dims({T, V}), T * V * kBf16 + T * kI32 + 2 * kF32,
              [&] { cross_entropy_fwd_bwd(p, s); });
    CrossEntropyParams pb = p;
    pb.dlogits = dlogits;
    pb.grad_scale = 1.0f / float(T);
    // read logits: T*V*2; read labels: T*4; write dlogits: T*V*2; write loss, count: 2*4
    bench.run(model, "cross_entropy_fwd_bwd", dims({T, V}), 2 * T * V * kBf16 + T * kI32 + 2 * kF32,
              [&] { cross_entropy_fwd_bwd(pb, s); });
  }

  // QKV split / join (layers/attention.cpp): [T, 3C] <-> three [T, C].
  {
    Tensor qkv = rand_dev({T, 3 * C}, DType::kBF16, 13, s);
    Tensor q = Tensor::empty({T, C}, DType::kBF16, dev, s),
           k = Tensor::empty({T, C}, DType::kBF16, dev, s),
           v = Tensor::empty({T, C}, DType::kBF16, dev, s);
    // read qkv: 3*T*C*2; write q, k, v: 3*T*C*2
    bench.run(model, "qkv_split", dims({T, 3 * C}), 6 * T * C * kBf16, [&] {
      qkv_split({qkv, q, k, v}, s);
    });
    // read dq, dk, dv: 3*T*C*2; dqkv += (read + write): 2*3*T*C*2
    bench.run(model, "qkv_join_grad", dims({T, 3 * C}), 9 * T * C * kBf16, [&] {
      qkv_join_grad({q, k, v, qkv}, s);
    });
    // The same with the rotary fused in (as layers/attention.cpp calls them): + cu_seqlens (b+1)*4.
    const QkvRotary rot{.head_dim = D, .pos = {.cu_seqlens = batch.cu_seqlens}};
    bench.run(model, "qkv_split_rotary", dims({T, 3 * C}), 6 * T * C * kBf16 + (batch.seqs + 1) * kI32,
              [&] { qkv_split({.qkv = qkv, .q = q, .k = k, .v = v, .rotary = rot}, s); });
    bench.run(model, "qkv_join_grad_rotary", dims({T, 3 * C}), 9 * T * C * kBf16 + (batch.seqs + 1) * kI32,
              [&] { qkv_join_grad({.dq = q, .dk = k, .dv = v, .dqkv = qkv, .rotary = rot}, s); });
  }

  // axpy: the residual-gradient pass-through y += x (layers/layernorm_mlp.cpp), bf16 [T, C].
  {
    Tensor x = rand_dev({T, C}, DType::kBF16, 14, s), y = rand_dev({T, C}, DType::kBF16, 15, s);
    // read x: T*C*2; y += (read + write): 2*T*C*2
    bench.run(model, "axpy", tc, 3 * T * C * kBf16, [&] { axpy(1.0f, x, y, s); });
  }

  // Casts on [T, C] and [T, F]: fp8 (e4m3, scale in, amax accumulated) from bf16, the fp8
  // cast-transpose, and bf16 <-> f32.
  for (const int64_t n : {C, F}) {
    const std::string shape = dims({T, n});
    Tensor in = rand_dev({T, n}, DType::kBF16, 16, s), in32 = rand_dev({T, n}, DType::kF32, 17, s);
    Tensor out = Tensor::empty({T, n}, DType::kE4M3, dev, s),
           out_t = Tensor::empty({n, T}, DType::kE4M3, dev, s);
    Tensor scale = Tensor::from_floats({1.0f}, {1}, DType::kF32, dev);
    Tensor amax = Tensor::zeros({1}, DType::kF32, dev, s);
    // read in: T*n*2; write out: T*n*1; read scale, amax read-modify-write: 3*4
    bench.run(model, "cast_fp8", shape, T * n * (kBf16 + kFp8) + 3 * kF32, [&] {
      cast_fp8(CastFp8Params{.in = in, .out = out, .scale = scale, .amax = amax}, s);
    });
    // read in: T*n*2; write out, out_t: 2*T*n*1; scale, amax: 3*4
    bench.run(model, "cast_transpose_fp8", shape, T * n * (kBf16 + 2 * kFp8) + 3 * kF32, [&] {
      cast_transpose_fp8(
          CastTransposeFp8Params{.in = in, .out = out, .out_t = out_t, .scale = scale, .amax = amax,
                                 .act = CastActivation::kNone, .pre = {}, .dbias = {}},
          s);
    });
    // The FP8 MLP's fused casts (layers/fp8_layers.cpp): GELU forward into the cast; GELU backward
    // with the bias gradient. read in (and pre): T*n*2 each; write out, out_t: 2*T*n*1; the dbias
    // partial sums (T/64 rows of n f32, written then read) and dbias read-modify-write.
    Tensor pre = rand_dev({T, n}, DType::kBF16, 18, s);
    Tensor dbias = Tensor::zeros({n}, DType::kF32, dev, s);
    bench.run(model, "gelu_cast_transpose_fp8", shape, T * n * (kBf16 + 2 * kFp8) + 3 * kF32, [&] {
      cast_transpose_fp8(CastTransposeFp8Params{.in = in, .out = out, .out_t = out_t, .scale = scale, .amax = amax,
                                                .act = CastActivation::kGelu, .pre = {}, .dbias = {}},
                         s);
    });
    bench.run(model, "dgelu_cast_transpose_dbias_fp8", shape,
              T * n * (2 * kBf16 + 2 * kFp8) + 2 * (T / 64) * n * kF32 + 2 * n * kF32 + 3 * kF32, [&] {
                cast_transpose_fp8(CastTransposeFp8Params{.in = in, .out = out, .out_t = out_t, .scale = scale,
                                                          .amax = amax, .act = CastActivation::kGeluGrad, .pre = pre,
                                                          .dbias = dbias},
                                   s);
              });
    Tensor o32 = Tensor::empty({T, n}, DType::kF32, dev, s),
           o16 = Tensor::empty({T, n}, DType::kBF16, dev, s);
    // read T*n*2, write T*n*4 (and the reverse for f32 -> bf16)
    bench.run(model, "cast_bf16_f32", shape, T * n * (kBf16 + kF32),
              [&] { cast(CastParams{.in = in, .out = o32}, s); });
    bench.run(model, "cast_f32_bf16", shape, T * n * (kF32 + kBf16),
              [&] { cast(CastParams{.in = in32, .out = o16}, s); });
  }
}

// AdamW and the gradient norm over every parameter of the model, the lists built as
// layers/optimizer.cpp builds them: f32 master, f32 gradient and moments, the bf16 model copy,
// weight decay per the model's mask; the clip coefficient and the non-finite flag on the device.
void bench_optimizer(Bench& bench, const ModelConfig& cfg, const std::string& model,
                     const Stream& s) {
  const Device dev = s.device();
  Esm2Model m(cfg, Esm2Options{.device = dev, .compute = DType::kBF16});
  std::vector<AdamWTensor> adam;
  std::vector<Tensor> grads;
  int64_t params = 0, adam_bytes = 0;
  uint64_t seed = 100;
  for (Parameter& p : m.params().all()) {
    AdamWTensor t;
    t.param = p.master;
    t.grad = rand_dev(p.master.shape(), DType::kF32, seed++, s);
    t.exp_avg = Tensor::zeros(p.master.shape(), DType::kF32, dev, s);
    t.exp_avg_sq = Tensor::zeros(p.master.shape(), DType::kF32, dev, s);
    if (!p.shares_master()) t.param_bf16 = p.var.data();
    t.apply_weight_decay = p.decay;
    const int64_t n = p.master.numel();
    params += n;
    // param, exp_avg, exp_avg_sq read and written: 3*2*4; grad read: 4; bf16 copy written: 2
    adam_bytes += n * (6 * kF32 + kF32 + (t.param_bf16.defined() ? kBf16 : 0));
    grads.push_back(t.grad);
    adam.push_back(std::move(t));
  }
  const std::string shape = std::to_string(adam.size()) + " tensors, P=" + std::to_string(params);
  const AdamWTensorList adam_list(std::move(adam));
  const GradNormTensorList norm_list(std::move(grads));
  Tensor clip = Tensor::from_floats({1.0f}, {1}, DType::kF32, dev);
  Tensor flag = Tensor::zeros({1}, DType::kF32, dev, s);
  Tensor sumsq = Tensor::empty({1}, DType::kF32, dev, s);
  // read every gradient: P*4; write sumsq: 4
  bench.run(model, "grad_norm", shape, params * kF32 + kF32, [&] {
    grad_norm_sumsq(GradNormParams{.grads = &norm_list, .sumsq = sumsq, .nonfinite_flag = flag}, s);
  });
  AdamWParams a;
  a.tensors = &adam_list;
  a.lr = 1e-4;
  a.beta1 = 0.9;
  a.beta2 = 0.98;
  a.eps = 1e-8;
  a.weight_decay = 0.01;
  a.step = 1;
  a.grad_scale_tensor = clip;
  a.nonfinite_flag = flag;
  // per element 30 bytes (above): P*(6*4 + 4 + 2); clip coefficient and flag: 2*4
  bench.run(model, "adamw", shape, adam_bytes + 2 * kF32, [&] { adamw_step(a, s); });
}

}  // namespace
}  // namespace helix

int main(int argc, char** argv) {
  using namespace helix;
  if (!cuda_available()) {
    std::printf("helix_bench_kernels_memory needs a CUDA GPU: %s\n",
                cuda_unavailable_reason().c_str());
    return 0;
  }
  const int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 16384;
  const int iters = argc > 2 ? std::atoi(argv[2]) : 20;
  if (tokens < 1 || iters < 1) {
    std::fprintf(stderr, "usage: helix_bench_kernels_memory [tokens=16384] [iterations=20]\n");
    return 2;
  }
  const Device dev = Device::cuda(0);
  const Stream s = Stream::create(dev);
  Bench bench(s, iters);
  std::printf(
      "Memory-bound ops of an ESM-2 training step at T=%lld tokens, mean of %d runs after %d "
      "warm-up runs.\nMB = minimum bytes moved / 1e6 (formulas in tests/bench/kernels_memory.cpp); "
      "GB/s = bytes / time;\ncopy = cudaMemcpyAsync D2D of bytes/2 (max 2 GiB) in the same run, "
      "2 * n / time; ratio = GB/s / copy.\n",
      (long long)tokens, iters, kWarmup);
  std::printf("%-5s %-24s %-26s %10s %10s %8s %8s %6s\n", "model", "op", "shape", "MB", "us",
              "GB/s", "copy", "ratio");
  const std::pair<const char*, const char*> models[] = {{"650M", "esm2-650m"}, {"3B", "esm2-3b"}};
  for (const auto& [label, name] : models) {
    const ModelConfig cfg = model_config(name);
    bench_activations(bench, cfg, label, tokens, s);
    s.synchronize();
    allocator_for(dev).empty_cache();  // room for the optimizer state (3B: about 51 GB)
    bench_optimizer(bench, cfg, label, s);
    s.synchronize();
    allocator_for(dev).empty_cache();
  }
  bench.print_json();
  return 0;
}

#else  // CPU-only build

int main() {
  std::printf("helix_bench_kernels_memory needs a CUDA build (HELIX_CUDA=ON) and a GPU\n");
  return 0;
}

#endif
