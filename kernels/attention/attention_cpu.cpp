// CPU reference of packed-THD attention and the LSE merge: plain loops with double accumulation,
// one (sequence, head) pair per task on a few threads. Same semantics as the CUDA kernels (see
// attention.h), including zeroed gap rows and -inf LSE for queries that see no key.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <thread>
#include <vector>

#include "kernels/attention/attention.h"

namespace helix::detail {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Runs fn(i) for every i in [0, n) on up to hardware_concurrency threads (tasks are independent).
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  const int64_t threads = std::min<int64_t>(n, std::max(1u, std::thread::hardware_concurrency()));
  if (threads <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int64_t i = next++; i < n; i = next++) fn(i);
    });
  }
  for (auto& th : pool) th.join();
}

struct Seq {
  int64_t q0, k0;  // first row of the sequence in q and in k/v
  int64_t lq, lk;  // true lengths
};

std::vector<Seq> sequences(const ThdAttentionLayout& b) {
  const auto& cq = b.cu_seqlens_q.host;
  const auto& ck = b.cu_seqlens_kv.host;
  const auto& oq = b.cu_seqlens_q_padded.defined() ? b.cu_seqlens_q_padded.host : cq;
  const auto& ok = b.cu_seqlens_kv_padded.defined() ? b.cu_seqlens_kv_padded.host : ck;
  std::vector<Seq> s(cq.size() - 1);
  for (size_t i = 0; i + 1 < cq.size(); ++i)
    s[i] = {oq[i], ok[i], cq[i + 1] - cq[i], ck[i + 1] - ck[i]};
  return s;
}

std::vector<float> floats_of(const Tensor& t) {
  return t.defined() ? t.to_floats() : std::vector<float>();
}

// Last key a query sees (exclusive bound): causal masks align at the bottom right.
int64_t key_end(int64_t row, const Seq& s, bool causal) {
  return causal ? std::clamp<int64_t>(row + s.lk - s.lq + 1, 0, s.lk) : s.lk;
}

// Outputs are bf16, or f32 in CPU f32 runs: one rounding from the double result (through float,
// as a bf16 output always was).
void store(const Tensor& t, int64_t i, double v) {
  if (t.dtype() == DType::kF32)
    t.data<float>()[i] = static_cast<float>(v);
  else
    t.data<bf16_t>()[i] = bf16_t::from_float(static_cast<float>(v));
}

void zero_rows(const Tensor& x, int64_t row_elems, int64_t begin, int64_t end) {
  for (int64_t i = begin * row_elems; i < end * row_elems; ++i) store(x, i, 0.0);
}

}  // namespace

void thd_attention_fwd_cpu(const ThdAttentionFwdParams& p) {
  const int64_t tq = p.q.dim(0), h = p.q.dim(1), d = p.q.dim(2);
  const bool causal = p.mask == AttentionMask::kCausal;
  const double scale = p.softmax_scale;
  const std::vector<float> q = floats_of(p.q), k = floats_of(p.k), v = floats_of(p.v);
  float* lse = p.lse.data<float>();
  for (auto [b, e] : thd_gap_rows(p.layout.cu_seqlens_q, p.layout.cu_seqlens_q_padded, tq)) {
    zero_rows(p.o, h * d, b, e);
    for (int64_t hh = 0; hh < h; ++hh)
      std::fill(lse + hh * tq + b, lse + hh * tq + e, -std::numeric_limits<float>::infinity());
  }
  const std::vector<Seq> seqs = sequences(p.layout);
  parallel_for(static_cast<int64_t>(seqs.size()) * h, [&](int64_t task) {
    const Seq& s = seqs[task / h];
    const int64_t hh = task % h;
    std::vector<double> score(s.lk), acc(d);
    for (int64_t r = 0; r < s.lq; ++r) {
      const float* qr = &q[((s.q0 + r) * h + hh) * d];
      const int64_t kend = key_end(r, s, causal);
      double mx = kNegInf;
      for (int64_t j = 0; j < kend; ++j) {
        const float* kj = &k[((s.k0 + j) * h + hh) * d];
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) dot += double(qr[c]) * kj[c];
        score[j] = dot * scale;
        mx = std::max(mx, score[j]);
      }
      std::fill(acc.begin(), acc.end(), 0.0);
      double sum = 0;
      for (int64_t j = 0; j < kend; ++j) {
        const double e = std::exp(score[j] - mx);
        sum += e;
        const float* vj = &v[((s.k0 + j) * h + hh) * d];
        for (int64_t c = 0; c < d; ++c) acc[c] += e * vj[c];
      }
      const int64_t orow = ((s.q0 + r) * h + hh) * d;
      for (int64_t c = 0; c < d; ++c) store(p.o, orow + c, kend > 0 ? static_cast<float>(acc[c] / sum) : 0.f);
      lse[hh * tq + s.q0 + r] = kend > 0 ? static_cast<float>(mx + std::log(sum))
                                         : -std::numeric_limits<float>::infinity();
    }
  });
}

void thd_attention_bwd_cpu(const ThdAttentionBwdParams& p) {
  const int64_t tq = p.q.dim(0), tk = p.k.dim(0), h = p.q.dim(1), d = p.q.dim(2);
  const bool causal = p.mask == AttentionMask::kCausal;
  const double scale = p.softmax_scale;
  const std::vector<float> q = floats_of(p.q), k = floats_of(p.k), v = floats_of(p.v);
  const std::vector<float> o = floats_of(p.o), d_o = floats_of(p.d_o), d_lse = floats_of(p.d_lse);
  const float* lse = p.lse.data<float>();
  const Tensor &dq = p.d_q, &dk = p.d_k, &dv = p.d_v;
  for (auto [b, e] : thd_gap_rows(p.layout.cu_seqlens_q, p.layout.cu_seqlens_q_padded, tq))
    zero_rows(dq, h * d, b, e);
  for (auto [b, e] : thd_gap_rows(p.layout.cu_seqlens_kv, p.layout.cu_seqlens_kv_padded, tk)) {
    zero_rows(dk, h * d, b, e);
    zero_rows(dv, h * d, b, e);
  }
  const std::vector<Seq> seqs = sequences(p.layout);
  parallel_for(static_cast<int64_t>(seqs.size()) * h, [&](int64_t task) {
    const Seq& s = seqs[task / h];
    const int64_t hh = task % h;
    std::vector<double> dk_acc(s.lk * d, 0.0), dv_acc(s.lk * d, 0.0), dq_acc(d);
    for (int64_t r = 0; r < s.lq; ++r) {
      const int64_t row = (s.q0 + r) * h + hh;
      const float* qr = &q[row * d];
      const float* dor = &d_o[row * d];
      const double lse_r = lse[hh * tq + s.q0 + r];
      // D_r = dO . O - dLSE: the row term of the softmax backward (dLSE adds P * dLSE to dS).
      double delta = 0;
      for (int64_t c = 0; c < d; ++c) delta += double(dor[c]) * o[row * d + c];
      if (!d_lse.empty()) delta -= d_lse[hh * tq + s.q0 + r];
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
      const int64_t kend = std::isinf(lse_r) && lse_r < 0 ? 0 : key_end(r, s, causal);
      for (int64_t j = 0; j < kend; ++j) {
        const float* kj = &k[((s.k0 + j) * h + hh) * d];
        const float* vj = &v[((s.k0 + j) * h + hh) * d];
        double dot = 0, dp = 0;
        for (int64_t c = 0; c < d; ++c) {
          dot += double(qr[c]) * kj[c];
          dp += double(dor[c]) * vj[c];
        }
        const double prob = std::exp(dot * scale - lse_r);
        const double ds = prob * (dp - delta);
        for (int64_t c = 0; c < d; ++c) {
          dq_acc[c] += ds * kj[c];
          dk_acc[j * d + c] += ds * qr[c];
          dv_acc[j * d + c] += prob * dor[c];
        }
      }
      for (int64_t c = 0; c < d; ++c) store(dq, row * d + c, float(dq_acc[c] * scale));
    }
    for (int64_t j = 0; j < s.lk; ++j) {
      const int64_t row = (s.k0 + j) * h + hh;
      for (int64_t c = 0; c < d; ++c) {
        store(dk, row * d + c, float(dk_acc[j * d + c] * scale));
        store(dv, row * d + c, float(dv_acc[j * d + c]));
      }
    }
  });
}

namespace {
// Merged LSE of one (row, head) and the weights w_i = exp(lse_i - lse); all zero when every part
// is empty (-inf).
double merge_weights(const std::vector<const float*>& lses, int64_t idx, std::vector<double>& w) {
  double mx = kNegInf;
  for (const float* l : lses) mx = std::max<double>(mx, l[idx]);
  if (mx == kNegInf) {
    std::fill(w.begin(), w.end(), 0.0);
    return kNegInf;
  }
  double sum = 0;
  for (const float* l : lses) sum += std::exp(double(l[idx]) - mx);
  const double lse = mx + std::log(sum);
  for (size_t i = 0; i < lses.size(); ++i) w[i] = std::exp(double(lses[i][idx]) - lse);
  return lse;
}
}  // namespace

void lse_merge_fwd_cpu(const LseMergeFwdParams& p) {
  const int64_t t = p.out.dim(0), h = p.out.dim(1), d = p.out.dim(2);
  const size_t n = p.outs.size();
  std::vector<const float*> lses(n);
  for (size_t i = 0; i < n; ++i) lses[i] = p.lses[i].data<float>();
  std::vector<double> w(n);
  float* lse = p.lse.data<float>();
  for (int64_t r = 0; r < t; ++r) {
    for (int64_t hh = 0; hh < h; ++hh) {
      const double l = merge_weights(lses, hh * t + r, w);
      lse[hh * t + r] = static_cast<float>(l);
      for (int64_t c = 0; c < d; ++c) {
        const int64_t e = (r * h + hh) * d + c;
        double acc = 0;
        for (size_t i = 0; i < n; ++i)
          if (w[i] != 0) acc += w[i] * cpu_value(p.outs[i], e);
        store(p.out, e, acc);
      }
    }
  }
}

void lse_merge_bwd_cpu(const LseMergeBwdParams& p) {
  const int64_t t = p.d_out.dim(0), h = p.d_out.dim(1), d = p.d_out.dim(2);
  const size_t n = p.outs.size();
  std::vector<const float*> lses(n);
  for (size_t i = 0; i < n; ++i) lses[i] = p.lses[i].data<float>();
  const float* d_lse = p.d_lse.defined() ? p.d_lse.data<float>() : nullptr;
  std::vector<double> w(n), dot(n);
  for (int64_t r = 0; r < t; ++r) {
    for (int64_t hh = 0; hh < h; ++hh) {
      const int64_t li = hh * t + r;
      merge_weights(lses, li, w);
      double dot_merged = 0;  // d_out . out, with out = sum_i w_i out_i
      for (size_t i = 0; i < n; ++i) {
        dot[i] = 0;
        if (w[i] == 0) continue;
        for (int64_t c = 0; c < d; ++c) {
          const int64_t e = (r * h + hh) * d + c;
          dot[i] += cpu_value(p.d_out, e) * cpu_value(p.outs[i], e);
        }
        dot_merged += w[i] * dot[i];
      }
      const double g = d_lse ? d_lse[li] : 0.0;
      for (size_t i = 0; i < n; ++i) {
        p.d_lses[i].data<float>()[li] = static_cast<float>(w[i] * (dot[i] - dot_merged + g));
        for (int64_t c = 0; c < d; ++c) {
          const int64_t e = (r * h + hh) * d + c;
          store(p.d_outs[i], e, w[i] == 0 ? 0.0 : w[i] * cpu_value(p.d_out, e));  // empty part: 0
        }
      }
    }
  }
}

}  // namespace helix::detail
