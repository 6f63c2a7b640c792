#pragma once
// Test helpers for packed-THD attention: random packed problems (padding between sequences, NaN in
// every row that belongs to no sequence, so that reading one shows), an exact fp64 attention
// (softmax from scratch, D = rowsum(P * dP): independent of the kernels' formulation) and a naive
// bf16 attention that rounds where a plain PyTorch bf16 implementation rounds (FlashAttention's
// test rule compares the kernel's error against that naive error).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

#include "core/random.h"
#include "core/tensor.h"
#include "kernels/attention/attention.h"

namespace helix::attn_test {

inline void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t)
    pool.emplace_back([&] {
      for (int64_t i = next++; i < n; i = next++) fn(i);
    });
  for (auto& th : pool) th.join();
}

inline float bf16_round(double x) { return bf16_t::from_float(static_cast<float>(x)).to_float(); }

struct Problem {
  std::vector<int32_t> len_q, len_kv, off_q, off_kv;  // per sequence (off: first row)
  int64_t tq = 0, tk = 0;
  int heads = 0, dim = 0;
  float scale = 0.f;
  AttentionMask mask = AttentionMask::kBidirectional;
  ThdAttentionLayout layout;            // on the problem's device
  Tensor q, k, v, d_o;                  // bf16 on the problem's device; gap rows are NaN
  std::vector<float> hq, hk, hv, hdo;   // host copies (same values)
  std::vector<char> q_valid, kv_valid;  // per row: belongs to a sequence
};

// Gap after sequence i: `padded` adds (3 i + 1) % 5 rows; 2 extra rows follow the last sequence.
inline Problem make_problem(const std::vector<int32_t>& len_q, const std::vector<int32_t>& len_kv,
                            int heads, int dim, AttentionMask mask, bool padded, uint64_t seed,
                            Device device) {
  Problem p;
  p.len_q = len_q;
  p.len_kv = len_kv;
  p.heads = heads;
  p.dim = dim;
  p.mask = mask;
  p.scale = static_cast<float>(1.0 / std::sqrt(double(dim)));
  const size_t b = len_q.size();
  std::vector<int32_t> cu_q(b + 1, 0), cu_kv(b + 1, 0), pad_q(b + 1, 0), pad_kv(b + 1, 0);
  for (size_t i = 0; i < b; ++i) {
    cu_q[i + 1] = cu_q[i] + len_q[i];
    cu_kv[i + 1] = cu_kv[i] + len_kv[i];
    const int gap = padded ? static_cast<int>((3 * i + 1) % 5) : 0;
    pad_q[i + 1] = pad_q[i] + len_q[i] + gap;
    pad_kv[i + 1] = pad_kv[i] + len_kv[i] + (padded ? static_cast<int>((2 * i) % 3) : 0);
  }
  p.off_q.assign(pad_q.begin(), pad_q.end() - 1);
  p.off_kv.assign(pad_kv.begin(), pad_kv.end() - 1);
  p.tq = pad_q[b] + 2;
  p.tk = pad_kv[b] + 2;
  p.layout.cu_seqlens_q = CuSeqlens::make(cu_q, device);
  p.layout.cu_seqlens_kv = CuSeqlens::make(cu_kv, device);
  if (padded) {
    p.layout.cu_seqlens_q_padded = CuSeqlens::make(pad_q, device);
    p.layout.cu_seqlens_kv_padded = CuSeqlens::make(pad_kv, device);
  }
  p.layout.max_seqlen_q = len_q.empty() ? 0 : *std::max_element(len_q.begin(), len_q.end());
  p.layout.max_seqlen_kv = len_kv.empty() ? 0 : *std::max_element(len_kv.begin(), len_kv.end());
  p.q_valid.assign(p.tq, 0);
  p.kv_valid.assign(p.tk, 0);
  for (size_t i = 0; i < b; ++i) {
    std::fill_n(p.q_valid.begin() + p.off_q[i], len_q[i], 1);
    std::fill_n(p.kv_valid.begin() + p.off_kv[i], len_kv[i], 1);
  }
  auto make = [&](int64_t rows, uint64_t sub, const std::vector<char>& valid,
                  std::vector<float>& host) {
    Tensor t = Tensor::empty({rows, heads, dim}, DType::kBF16);
    fill_normal(t, seed, sub, 0.f, 1.f);
    bf16_t* x = t.data<bf16_t>();
    for (int64_t r = 0; r < rows; ++r)
      if (!valid[r])
        for (int64_t e = 0; e < int64_t{heads} * dim; ++e)
          x[r * heads * dim + e] = bf16_t{0x7FC0};  // NaN
    host = t.to_floats();
    return device.is_cpu() ? t : t.to(device);
  };
  p.q = make(p.tq, 1, p.q_valid, p.hq);
  p.k = make(p.tk, 2, p.kv_valid, p.hk);
  p.v = make(p.tk, 3, p.kv_valid, p.hv);
  p.d_o = make(p.tq, 4, p.q_valid, p.hdo);
  return p;
}

inline int64_t key_end(int64_t row, int64_t lq, int64_t lk, AttentionMask mask) {
  return mask == AttentionMask::kCausal ? std::clamp<int64_t>(row + lk - lq + 1, 0, lk) : lk;
}

// Outputs of a reference, laid out like the tensors: o, dq [Tq, H, D], dk, dv [Tk, H, D], lse [H,
// Tq].
struct Ref {
  std::vector<double> o, lse, dq, dk, dv;
};

// Exact (fp64) or naive-bf16 attention forward and backward on the problem's host data.
inline Ref reference(const Problem& p, bool naive_bf16) {
  const int64_t h = p.heads, d = p.dim;
  Ref r;
  r.o.assign(p.tq * h * d, 0.0);
  r.dq.assign(p.tq * h * d, 0.0);
  r.dk.assign(p.tk * h * d, 0.0);
  r.dv.assign(p.tk * h * d, 0.0);
  r.lse.assign(h * p.tq, -std::numeric_limits<double>::infinity());
  auto rnd = [&](double x) { return naive_bf16 ? double(bf16_round(x)) : x; };
  const double scale = p.scale;
  for (size_t s = 0; s < p.len_q.size(); ++s) {
    const int64_t lq = p.len_q[s], lk = p.len_kv[s], q0 = p.off_q[s], k0 = p.off_kv[s];
    for (int64_t hh = 0; hh < h; ++hh) {
      auto qi = [&](int64_t row, int64_t c) { return double(p.hq[((q0 + row) * h + hh) * d + c]); };
      auto ki = [&](int64_t j, int64_t c) { return double(p.hk[((k0 + j) * h + hh) * d + c]); };
      auto vi = [&](int64_t j, int64_t c) { return double(p.hv[((k0 + j) * h + hh) * d + c]); };
      auto gi = [&](int64_t row, int64_t c) {
        return double(p.hdo[((q0 + row) * h + hh) * d + c]);
      };
      // Naive bf16 scales q first (q * scale rounded), as `softmax((q * scale) @ k^T)` does.
      std::vector<double> qs(lq * d);
      for (int64_t row = 0; row < lq; ++row)
        for (int64_t c = 0; c < d; ++c)
          qs[row * d + c] = naive_bf16 ? rnd(qi(row, c) * scale) : qi(row, c);
      std::vector<double> prob(lq * lk, 0.0), ds(lq * lk, 0.0);
      parallel_for(lq, [&](int64_t row) {
        const int64_t kend = key_end(row, lq, lk, p.mask);
        if (kend == 0) return;
        std::vector<double> sc(kend), dp(kend);
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < kend; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += qs[row * d + c] * ki(j, c);
          sc[j] = naive_bf16 ? rnd(dot) : dot * scale;
          mx = std::max(mx, sc[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j < kend; ++j) sum += std::exp(sc[j] - mx);
        r.lse[hh * p.tq + q0 + row] = mx + std::log(sum);
        for (int64_t j = 0; j < kend; ++j) prob[row * lk + j] = rnd(std::exp(sc[j] - mx) / sum);
        double delta = 0;
        for (int64_t j = 0; j < kend; ++j) {
          double acc = 0;
          for (int64_t c = 0; c < d; ++c) acc += gi(row, c) * vi(j, c);
          dp[j] = rnd(acc);
          delta += prob[row * lk + j] * dp[j];
        }
        for (int64_t j = 0; j < kend; ++j)
          ds[row * lk + j] = rnd(prob[row * lk + j] * (dp[j] - delta));
        for (int64_t c = 0; c < d; ++c) {
          double acc_o = 0, acc_dq = 0;
          for (int64_t j = 0; j < kend; ++j) {
            acc_o += prob[row * lk + j] * vi(j, c);
            acc_dq += ds[row * lk + j] * ki(j, c);
          }
          const int64_t e = ((q0 + row) * h + hh) * d + c;
          r.o[e] = rnd(acc_o);
          r.dq[e] = naive_bf16 ? rnd(rnd(acc_dq) * scale) : acc_dq * scale;
        }
      });
      parallel_for(lk, [&](int64_t j) {
        for (int64_t c = 0; c < d; ++c) {
          double acc_k = 0, acc_v = 0;
          for (int64_t row = 0; row < lq; ++row) {
            acc_k += ds[row * lk + j] * qs[row * d + c];
            acc_v += prob[row * lk + j] * gi(row, c);
          }
          const int64_t e = ((k0 + j) * h + hh) * d + c;
          r.dk[e] = naive_bf16 ? rnd(acc_k) : acc_k * scale;
          r.dv[e] = rnd(acc_v);
        }
      });
    }
  }
  return r;
}

// max |got - ref| over the rows that belong to a sequence ([rows, H, D] layout); NaN counts as inf.
inline double max_err(const std::vector<float>& got, const std::vector<double>& ref,
                      const std::vector<char>& valid, int64_t row_elems) {
  double e = 0;
  for (size_t r = 0; r < valid.size(); ++r) {
    if (!valid[r]) continue;
    for (int64_t i = 0; i < row_elems; ++i) {
      const double d = std::abs(double(got[r * row_elems + i]) - ref[r * row_elems + i]);
      e = std::max(e, std::isnan(d) ? std::numeric_limits<double>::infinity() : d);
    }
  }
  return e;
}
inline double max_err(const std::vector<double>& got, const std::vector<double>& ref,
                      const std::vector<char>& valid, int64_t row_elems) {
  return max_err(std::vector<float>(got.begin(), got.end()), ref, valid, row_elems);
}

// Every element of the rows that belong to no sequence is zero.
inline bool gap_rows_zero(const std::vector<float>& got, const std::vector<char>& valid,
                          int64_t row_elems) {
  for (size_t r = 0; r < valid.size(); ++r)
    if (!valid[r])
      for (int64_t i = 0; i < row_elems; ++i)
        if (got[r * row_elems + i] != 0.f) return false;
  return true;
}

inline ThdAttentionFwdParams fwd_params(const Problem& p, Tensor o, Tensor lse) {
  ThdAttentionFwdParams f;
  f.q = p.q;
  f.k = p.k;
  f.v = p.v;
  f.layout = p.layout;
  f.softmax_scale = p.scale;
  f.mask = p.mask;
  f.o = std::move(o);
  f.lse = std::move(lse);
  return f;
}

inline ThdAttentionBwdParams bwd_params(const Problem& p, const Tensor& o, const Tensor& lse,
                                        AttentionBwdMode mode, Tensor dq, Tensor dk, Tensor dv) {
  ThdAttentionBwdParams b;
  b.q = p.q;
  b.k = p.k;
  b.v = p.v;
  b.o = o;
  b.d_o = p.d_o;
  b.lse = lse;
  b.layout = p.layout;
  b.softmax_scale = p.scale;
  b.mask = p.mask;
  b.mode = mode;
  b.d_q = std::move(dq);
  b.d_k = std::move(dk);
  b.d_v = std::move(dv);
  return b;
}

}  // namespace helix::attn_test
