// Cross-entropy: parameter checks, CPU reference (fp32 math, double accumulation of the sums) and
// the public functions that dispatch on the logits' device.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/cross_entropy/cross_entropy.h"

namespace helix {
namespace {

// ---- checks (shared by the CPU and CUDA paths) --------------------------------------------------
void check_same_device(const char* op, const Tensor& ref, const Tensor& t, const char* name) {
  if (!t.defined()) return;
  HELIX_CHECK(t.device() == ref.device(), "{}: expected {} on {}, got {}", op, name,
              ref.device().str(), t.str());
  HELIX_CHECK(t.is_contiguous(), "{}: expected a contiguous {}, got {}", op, name, t.str());
}

void check_logits_labels(const char* op, const Tensor& logits, const Tensor& labels) {
  HELIX_CHECK(logits.defined() && logits.ndim() == 2, "{}: expected logits [T, V], got {}", op,
              logits.str());
  HELIX_CHECK(logits.dtype() == DType::kF32 || logits.dtype() == DType::kBF16,
              "{}: expected f32 or bf16 logits, got {}", op, logits.str());
  HELIX_CHECK(logits.dim(1) >= 1, "{}: expected at least one vocabulary column, got {}", op,
              logits.str());
  HELIX_CHECK(logits.is_contiguous(), "{}: expected contiguous logits, got {}", op, logits.str());
  HELIX_CHECK(labels.defined() && labels.dtype() == DType::kI32 && labels.ndim() == 1 &&
                  labels.dim(0) == logits.dim(0),
              "{}: expected labels i32[{}], got {}", op, logits.dim(0), labels.str());
  check_same_device(op, logits, labels, "labels");
}

void check_f32_vector(const char* op, const Tensor& logits, const Tensor& t, int64_t n,
                      const char* name) {
  HELIX_CHECK(t.defined() && t.dtype() == DType::kF32 && t.ndim() == 1 && t.dim(0) == n,
              "{}: expected {} f32[{}], got {}", op, name, n, t.str());
  check_same_device(op, logits, t, name);
}

void check_outputs(const char* op, const Tensor& logits, const Tensor& loss_sum,
                   const Tensor& count, const Tensor& dlogits, const Tensor& row_loss) {
  check_f32_vector(op, logits, loss_sum, 1, "loss_sum");
  HELIX_CHECK(count.defined() && (count.dtype() == DType::kI32 || count.dtype() == DType::kF32) &&
                  count.numel() == 1,
              "{}: expected count i32[1] or f32[1], got {}", op, count.str());
  check_same_device(op, logits, count, "count");
  if (dlogits.defined()) {
    HELIX_CHECK(dlogits.shape() == logits.shape() && dlogits.dtype() == logits.dtype(),
                "{}: expected dlogits {}{}, got {}", op, dtype_name(logits.dtype()),
                logits.shape().str(), dlogits.str());
    check_same_device(op, logits, dlogits, "dlogits");
  }
  if (row_loss.defined()) check_f32_vector(op, logits, row_loss, logits.dim(0), "row_loss");
}

void check_parts(const char* op, const Tensor& logits, const Tensor& t, int64_t parts,
                 const char* name) {
  HELIX_CHECK(t.defined() && t.dtype() == DType::kF32 && t.ndim() == 2 && t.dim(0) == parts &&
                  t.dim(1) == logits.dim(0),
              "{}: expected {} f32[{}, {}], got {}", op, name, parts, logits.dim(0), t.str());
  check_same_device(op, logits, t, name);
}

// ---- CPU reference ------------------------------------------------------------------------------
template <typename T>
float load(const T* x, int64_t i) {
  if constexpr (std::is_same_v<T, bf16_t>)
    return x[i].to_float();
  else
    return x[i];
}
template <typename T>
void store(T* x, int64_t i, float v) {
  if constexpr (std::is_same_v<T, bf16_t>)
    x[i] = bf16_t::from_float(v);
  else
    x[i] = v;
}

// Max and sum of exp(x - max) of one row (NaN logits make the sum NaN).
template <typename T>
void row_stats(const T* x, int64_t cols, float& max, double& sumexp) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < cols; ++j) m = std::max(m, load(x, j));  // ignores NaN
  double s = 0;
  for (int64_t j = 0; j < cols; ++j) s += std::exp(load(x, j) - m);
  max = m;
  sumexp = s;
}

void check_labels_cpu(const char* op, const Tensor& labels, int64_t vocab_size,
                      int32_t ignore_index) {
  const int32_t* y = labels.data<int32_t>();
  for (int64_t t = 0; t < labels.numel(); ++t) {
    HELIX_CHECK(y[t] == ignore_index || (y[t] >= 0 && y[t] < vocab_size),
                "{}: expected labels in [0, {}) or ignore_index {}, got {} at row {}", op,
                vocab_size, ignore_index, y[t], t);
  }
}

// Everything after the row statistics: loss sum, count, optional per-row loss and gradient of the
// columns [vocab_start, vocab_start + cols), given each row's max m, sum-exp s (relative to m) and
// target logit.
struct CpuFinish {
  const Tensor& logits;
  const Tensor& labels;
  const std::vector<float>& max;
  const std::vector<double>& sumexp;
  const std::vector<double>& target;
  const Tensor& loss_sum;
  const Tensor& count;
  const Tensor& dlogits;
  const Tensor& row_loss;
  int64_t vocab_start;
  float grad_scale;
  int32_t ignore_index;
};

template <typename T>
void finish_cpu(const CpuFinish& f) {
  const int64_t rows = f.logits.dim(0), cols = f.logits.dim(1);
  const T* x = f.logits.data<T>();
  const int32_t* y = f.labels.data<int32_t>();
  T* dx = f.dlogits.defined() ? f.dlogits.data<T>() : nullptr;
  float* rl = f.row_loss.defined() ? f.row_loss.data<float>() : nullptr;
  double acc = 0;
  int64_t n = 0;
  for (int64_t t = 0; t < rows; ++t) {
    const bool ignored = y[t] == f.ignore_index;
    const float loss =
        ignored ? 0.0f : static_cast<float>((f.max[t] - f.target[t]) + std::log(f.sumexp[t]));
    if (rl) rl[t] = loss;
    if (!ignored) {
      acc += loss;
      ++n;
    }
    if (!dx) continue;
    const int64_t local = ignored ? -1 : y[t] - f.vocab_start;
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t i = t * cols + j;
      float g = 0.0f;
      if (!ignored) {
        const float prob = static_cast<float>(std::exp(load(x, i) - f.max[t]) / f.sumexp[t]);
        g = (prob - (j == local ? 1.0f : 0.0f)) * f.grad_scale;
      }
      store(dx, i, g);
    }
  }
  f.loss_sum.data<float>()[0] = static_cast<float>(acc);
  if (f.count.dtype() == DType::kI32)
    f.count.data<int32_t>()[0] = static_cast<int32_t>(n);
  else
    f.count.data<float>()[0] = static_cast<float>(n);
}

template <typename T>
void fwd_bwd_cpu(const CrossEntropyParams& p) {
  const int64_t rows = p.logits.dim(0), cols = p.logits.dim(1);
  check_labels_cpu("cross_entropy_fwd_bwd", p.labels, cols, p.ignore_index);
  const T* x = p.logits.data<T>();
  const int32_t* y = p.labels.data<int32_t>();
  std::vector<float> max(rows);
  std::vector<double> sumexp(rows), target(rows);
  for (int64_t t = 0; t < rows; ++t) {
    row_stats(x + t * cols, cols, max[t], sumexp[t]);
    target[t] = y[t] == p.ignore_index ? 0.0 : load(x, t * cols + y[t]);
  }
  finish_cpu<T>({p.logits, p.labels, max, sumexp, target, p.loss_sum, p.count, p.dlogits,
                 p.row_loss, 0, p.grad_scale, p.ignore_index});
}

template <typename T>
void stats_cpu(const CrossEntropyStatsParams& p) {
  const int64_t rows = p.logits.dim(0), cols = p.logits.dim(1);
  const T* x = p.logits.data<T>();
  const int32_t* y = p.labels.data<int32_t>();
  for (int64_t t = 0; t < rows; ++t) {
    float m;
    double s;
    row_stats(x + t * cols, cols, m, s);
    p.row_max.data<float>()[t] = m;
    p.row_sumexp.data<float>()[t] = static_cast<float>(s);
    const int64_t local = static_cast<int64_t>(y[t]) - p.vocab_start;
    const bool mine = y[t] != p.ignore_index && local >= 0 && local < cols;
    p.row_target.data<float>()[t] = mine ? load(x, t * cols + local) : 0.0f;
  }
}

template <typename T>
void finish_from_parts_cpu(const CrossEntropyFinishParams& p, int64_t vocab_size) {
  const int64_t rows = p.logits.dim(0), parts = p.part_max.dim(0);
  check_labels_cpu("cross_entropy_finish", p.labels, vocab_size, p.ignore_index);
  const float* pm = p.part_max.data<float>();
  const float* ps = p.part_sumexp.data<float>();
  const float* pt = p.part_target.data<float>();
  std::vector<float> max(rows);
  std::vector<double> sumexp(rows), target(rows);
  for (int64_t t = 0; t < rows; ++t) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < parts; ++r) m = std::max(m, pm[r * rows + t]);
    double s = 0, tgt = 0;
    for (int64_t r = 0; r < parts; ++r) {
      if (pm[r * rows + t] != -std::numeric_limits<float>::infinity())
        s += static_cast<double>(ps[r * rows + t]) *
             std::exp(static_cast<double>(pm[r * rows + t]) - m);
      tgt += pt[r * rows + t];
    }
    max[t] = m;
    sumexp[t] = s;
    target[t] = tgt;
  }
  finish_cpu<T>({p.logits, p.labels, max, sumexp, target, p.loss_sum, p.count, p.dlogits,
                 p.row_loss, p.vocab_start, p.grad_scale, p.ignore_index});
}

[[noreturn, maybe_unused]] void no_cuda(const char* op, const Tensor& t) {
  HELIX_FAIL("{}: got CUDA tensor {}, but helix was built without CUDA", op, t.str());
}

}  // namespace

void cross_entropy_fwd_bwd(const CrossEntropyParams& p, const Stream& s) {
  const char* op = "cross_entropy_fwd_bwd";
  check_logits_labels(op, p.logits, p.labels);
  check_outputs(op, p.logits, p.loss_sum, p.count, p.dlogits, p.row_loss);
  if (p.logits.is_cpu()) {
    if (p.logits.dtype() == DType::kF32)
      fwd_bwd_cpu<float>(p);
    else
      fwd_bwd_cpu<bf16_t>(p);
    return;
  }
#if HELIX_WITH_CUDA
  detail::cross_entropy_fwd_bwd_cuda(p, s);
#else
  no_cuda(op, p.logits);
#endif
}

void cross_entropy_stats(const CrossEntropyStatsParams& p, const Stream& s) {
  const char* op = "cross_entropy_stats";
  check_logits_labels(op, p.logits, p.labels);
  const int64_t rows = p.logits.dim(0);
  check_f32_vector(op, p.logits, p.row_max, rows, "row_max");
  check_f32_vector(op, p.logits, p.row_sumexp, rows, "row_sumexp");
  check_f32_vector(op, p.logits, p.row_target, rows, "row_target");
  HELIX_CHECK(p.vocab_start >= 0, "{}: expected vocab_start >= 0, got {}", op, p.vocab_start);
  if (p.logits.is_cpu()) {
    if (p.logits.dtype() == DType::kF32)
      stats_cpu<float>(p);
    else
      stats_cpu<bf16_t>(p);
    return;
  }
#if HELIX_WITH_CUDA
  detail::cross_entropy_stats_cuda(p, s);
#else
  no_cuda(op, p.logits);
#endif
}

void cross_entropy_finish(const CrossEntropyFinishParams& p, const Stream& s) {
  const char* op = "cross_entropy_finish";
  check_logits_labels(op, p.logits, p.labels);
  check_outputs(op, p.logits, p.loss_sum, p.count, p.dlogits, p.row_loss);
  HELIX_CHECK(p.part_max.defined() && p.part_max.ndim() == 2 && p.part_max.dim(0) >= 1,
              "{}: expected part_max f32[P, {}] with P >= 1, got {}", op, p.logits.dim(0),
              p.part_max.str());
  const int64_t parts = p.part_max.dim(0);
  check_parts(op, p.logits, p.part_max, parts, "part_max");
  check_parts(op, p.logits, p.part_sumexp, parts, "part_sumexp");
  check_parts(op, p.logits, p.part_target, parts, "part_target");
  const int64_t vocab_size = p.vocab_size == 0 ? p.logits.dim(1) : p.vocab_size;
  HELIX_CHECK(p.vocab_start >= 0 && p.vocab_start + p.logits.dim(1) <= vocab_size,
              "{}: expected columns [{}, {}) inside the vocabulary [0, {})", op, p.vocab_start,
              p.vocab_start + p.logits.dim(1), vocab_size);
  if (p.logits.is_cpu()) {
    if (p.logits.dtype() == DType::kF32)
      finish_from_parts_cpu<float>(p, vocab_size);
    else
      finish_from_parts_cpu<bf16_t>(p, vocab_size);
    return;
  }
#if HELIX_WITH_CUDA
  detail::cross_entropy_finish_cuda(p, s);
#else
  no_cuda(op, p.logits);
#endif
}

}  // namespace helix
