// Cross-entropy CUDA kernels. One thread group per row (a warp when V <= 1024, else a block of 256
// or 1024 threads) runs an online max / sum-exp over its columns, merges the partial pairs in a
// fixed butterfly order (every thread ends with the same bits), then writes the row's loss and, in
// the same kernel, its gradient. Ignored rows skip the logits entirely. A one-block kernel then
// sums the row losses and counts the labels in a fixed order: deterministic, no atomics.
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "core/cuda_check.h"
#include "kernels/cross_entropy/cross_entropy.h"

namespace helix {
namespace {

enum class Mode { kFused, kStats, kFinish };

template <typename T>
struct RowArgs {
  const T* logits = nullptr;           // [rows, cols]
  T* dlogits = nullptr;                // [rows, cols] or nullptr (loss only); may equal logits
  const int32_t* labels = nullptr;     // [rows]
  float* row_loss = nullptr;           // [rows] (fused, finish)
  float* row_max = nullptr;            // [rows] (stats)
  float* row_sumexp = nullptr;         // [rows] (stats)
  float* row_target = nullptr;         // [rows] (stats)
  const float* part_max = nullptr;     // [parts, rows] (finish)
  const float* part_sumexp = nullptr;  // [parts, rows] (finish)
  const float* part_target = nullptr;  // [parts, rows] (finish)
  int64_t parts = 1;
  int64_t rows = 0, cols = 0, vocab_start = 0, vocab_size = 0;
  float grad_scale = 1.0f;
  int32_t ignore_index = -100;
};

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16_t v) { return v.to_float(); }
template <typename T>
__device__ __forceinline__ T from_f(float v) {
  if constexpr (std::is_same_v<T, bf16_t>)
    return bf16_t::from_float(v);
  else
    return v;
}

// Adds x to the running (max m, sum s of exp(. - m)). -inf logits add nothing; NaN poisons s.
__device__ __forceinline__ void online_add(float& m, float& s, float x) {
  if (x > m) {
    s = __fadd_rn(__fmul_rn(s, expf(m - x)), 1.0f);
    m = x;
  } else if (x != -INFINITY) {
    s = __fadd_rn(s, expf(x - m));
  }
}

// Merges two (max, sum-exp) pairs. Exactly commutative (no fma contraction), so both partners of a
// butterfly step get the same bits.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty: s and s2 are 0
  s = __fadd_rn(__fmul_rn(s, expf(m - mm)), __fmul_rn(s2, expf(m2 - mm)));
  m = mm;
}

// Every thread of the row's group ends with the group's merged pair. kGroup == 32: the group is a
// warp. Otherwise the group is the whole block (blockDim.x == kGroup): warps merge by butterfly,
// then every thread merges the per-warp pairs in warp order.
template <int kGroup>
__device__ __forceinline__ void group_merge(float& m, float& s) {
  for (int off = 16; off > 0; off >>= 1)
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  if constexpr (kGroup > 32) {
    constexpr int kWarps = kGroup / 32;
    __shared__ float wm[kWarps], ws[kWarps];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
      wm[warp] = m;
      ws[warp] = s;
    }
    __syncthreads();
    m = wm[0];
    s = ws[0];
    for (int w = 1; w < kWarps; ++w) merge(m, s, wm[w], ws[w]);
  }
}

// Grid: kGroup == 32: blocks of 256 threads, one warp per row (8 rows per block);
//       kGroup == 256 or 1024: one block of kGroup threads per row.
// Thread `lane` of a row touches columns lane, lane + kGroup, ... in both passes, so dlogits may
// alias logits: each element is read and then written by the same thread; the target logit is read
// before the group merge, which every thread passes before any write.
template <typename T, int kGroup, Mode kMode>
__global__ void __launch_bounds__(kGroup == 32 ? 256 : kGroup) rows_kernel(RowArgs<T> a) {
  const int64_t row = kGroup == 32 ? int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32
                                   : int64_t(blockIdx.x);
  const int lane = kGroup == 32 ? threadIdx.x % 32 : threadIdx.x;
  if (row >= a.rows) return;  // the whole group leaves together
  const T* x = a.logits + row * a.cols;
  const int32_t label = a.labels[row];
  const bool ignored = label == a.ignore_index;
  const bool valid = !ignored && label >= 0 && label < a.vocab_size;
  const int64_t local = int64_t(label) - a.vocab_start;  // label's column in this shard
  const bool mine = valid && local >= 0 && local < a.cols;

  if constexpr (kMode != Mode::kStats) {
    if (ignored) {  // no loss, zero gradient, logits never read
      if (lane == 0) a.row_loss[row] = 0.0f;
      if (a.dlogits != nullptr) {
        T* dx = a.dlogits + row * a.cols;
        for (int64_t j = lane; j < a.cols; j += kGroup) dx[j] = from_f<T>(0.0f);
      }
      return;
    }
  }

  float row_m, row_s, target;
  if constexpr (kMode == Mode::kFinish) {
    float mm = -INFINITY;
    for (int64_t r = 0; r < a.parts; ++r) mm = fmaxf(mm, a.part_max[r * a.rows + row]);
    float ss = 0.0f, tg = 0.0f;
    for (int64_t r = 0; r < a.parts; ++r) {
      const float mr = a.part_max[r * a.rows + row];
      if (mr != -INFINITY)
        ss = __fadd_rn(ss, __fmul_rn(a.part_sumexp[r * a.rows + row], expf(mr - mm)));
      tg = __fadd_rn(tg, a.part_target[r * a.rows + row]);
    }
    row_m = mm;
    row_s = ss;
    target = tg;
  } else {
    const bool in_shard = !ignored && local >= 0 && local < a.cols;  // stats: any in-range label
    target = in_shard ? to_f(x[local]) : 0.0f;                       // read before the merge
    float m = -INFINITY, s = 0.0f;
    for (int64_t j = lane; j < a.cols; j += kGroup) online_add(m, s, to_f(x[j]));
    group_merge<kGroup>(m, s);
    if constexpr (kMode == Mode::kStats) {
      if (lane == 0) {
        a.row_max[row] = m;
        a.row_sumexp[row] = s;
        a.row_target[row] = target;
      }
      return;
    }
    row_m = m;
    row_s = s;
  }

  if (lane == 0) a.row_loss[row] = valid ? __fadd_rn(__fsub_rn(row_m, target), logf(row_s)) : NAN;
  if (a.dlogits == nullptr) return;
  T* dx = a.dlogits + row * a.cols;
  for (int64_t j = lane; j < a.cols; j += kGroup) {
    float g = NAN;
    if (valid) {
      const float prob = __fdiv_rn(expf(to_f(x[j]) - row_m), row_s);
      g = __fmul_rn(__fsub_rn(prob, (mine && j == local) ? 1.0f : 0.0f), a.grad_scale);
    }
    dx[j] = from_f<T>(g);
  }
}

// Grid: one block of 1024 threads. Thread i sums the rows i, i + 1024, ... in double, then warps
// reduce by butterfly and thread 0 adds the 32 warp sums in order: a fixed order, deterministic.
template <typename C>
__global__ void __launch_bounds__(1024)
    sum_rows_kernel(const float* row_loss, const int32_t* labels, int64_t rows,
                    int32_t ignore_index, float* loss_sum, C* count) {
  __shared__ double wacc[32];
  __shared__ long long wcnt[32];
  double acc = 0.0;
  long long n = 0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) {
    acc += row_loss[i];
    n += labels[i] != ignore_index ? 1 : 0;
  }
  for (int off = 16; off > 0; off >>= 1) {
    acc += __shfl_xor_sync(0xffffffffu, acc, off);
    n += __shfl_xor_sync(0xffffffffu, n, off);
  }
  if (threadIdx.x % 32 == 0) {
    wacc[threadIdx.x / 32] = acc;
    wcnt[threadIdx.x / 32] = n;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    long long total_n = 0;
    for (int w = 0; w < int(blockDim.x / 32); ++w) {
      total += wacc[w];
      total_n += wcnt[w];
    }
    *loss_sum = static_cast<float>(total);
    *count = static_cast<C>(total_n);
  }
}

// ---- launchers ----------------------------------------------------------------------------------
template <typename T, Mode kMode>
void launch_rows(const RowArgs<T>& a, cudaStream_t st) {
  if (a.rows == 0) return;
  HELIX_CHECK(a.rows <= int64_t(0x7fffffff), "cross_entropy: expected at most 2^31-1 rows, got {}",
              a.rows);
  if (a.cols <= 1024) {
    const unsigned grid = static_cast<unsigned>((a.rows + 7) / 8);
    rows_kernel<T, 32, kMode><<<grid, 256, 0, st>>>(a);
  } else if (a.cols <= 16384) {
    rows_kernel<T, 256, kMode><<<static_cast<unsigned>(a.rows), 256, 0, st>>>(a);
  } else {
    rows_kernel<T, 1024, kMode><<<static_cast<unsigned>(a.rows), 1024, 0, st>>>(a);
  }
  HELIX_LAUNCH_CHECK();
}

void launch_sum(const Tensor& row_loss, const Tensor& labels, int32_t ignore_index,
                const Tensor& loss_sum, const Tensor& count, cudaStream_t st) {
  const int64_t rows = labels.numel();
  if (count.dtype() == DType::kI32) {
    sum_rows_kernel<int32_t><<<1, 1024, 0, st>>>(row_loss.data<float>(), labels.data<int32_t>(),
                                                 rows, ignore_index, loss_sum.data<float>(),
                                                 count.data<int32_t>());
  } else {
    sum_rows_kernel<float><<<1, 1024, 0, st>>>(row_loss.data<float>(), labels.data<int32_t>(), rows,
                                               ignore_index, loss_sum.data<float>(),
                                               count.data<float>());
  }
  HELIX_LAUNCH_CHECK();
}

template <typename T>
RowArgs<T> common_args(const Tensor& logits, const Tensor& labels, const Tensor& dlogits,
                       int32_t ignore_index) {
  RowArgs<T> a;
  a.logits = logits.data<T>();
  a.dlogits = dlogits.defined() ? dlogits.data<T>() : nullptr;
  a.labels = labels.data<int32_t>();
  a.rows = logits.dim(0);
  a.cols = logits.dim(1);
  a.vocab_size = a.cols;
  a.ignore_index = ignore_index;
  return a;
}

Tensor row_loss_or_scratch(const Tensor& row_loss, const Tensor& logits, const Stream& s) {
  return row_loss.defined() ? row_loss
                            : Tensor::empty(Shape{logits.dim(0)}, DType::kF32, logits.device(), s);
}

template <typename T>
void fwd_bwd(const CrossEntropyParams& p, const Stream& s) {
  cudaStream_t st = static_cast<cudaStream_t>(s.handle());
  const Tensor row_loss = row_loss_or_scratch(p.row_loss, p.logits, s);
  RowArgs<T> a = common_args<T>(p.logits, p.labels, p.dlogits, p.ignore_index);
  a.row_loss = row_loss.data<float>();
  a.grad_scale = p.grad_scale;
  launch_rows<T, Mode::kFused>(a, st);
  launch_sum(row_loss, p.labels, p.ignore_index, p.loss_sum, p.count, st);
}

template <typename T>
void stats(const CrossEntropyStatsParams& p, const Stream& s) {
  RowArgs<T> a = common_args<T>(p.logits, p.labels, Tensor(), p.ignore_index);
  a.row_max = p.row_max.data<float>();
  a.row_sumexp = p.row_sumexp.data<float>();
  a.row_target = p.row_target.data<float>();
  a.vocab_start = p.vocab_start;
  a.vocab_size = p.vocab_start + a.cols;
  launch_rows<T, Mode::kStats>(a, static_cast<cudaStream_t>(s.handle()));
}

template <typename T>
void finish(const CrossEntropyFinishParams& p, const Stream& s) {
  cudaStream_t st = static_cast<cudaStream_t>(s.handle());
  const Tensor row_loss = row_loss_or_scratch(p.row_loss, p.logits, s);
  RowArgs<T> a = common_args<T>(p.logits, p.labels, p.dlogits, p.ignore_index);
  a.row_loss = row_loss.data<float>();
  a.part_max = p.part_max.data<float>();
  a.part_sumexp = p.part_sumexp.data<float>();
  a.part_target = p.part_target.data<float>();
  a.parts = p.part_max.dim(0);
  a.vocab_start = p.vocab_start;
  a.vocab_size = p.vocab_size == 0 ? a.cols : p.vocab_size;
  a.grad_scale = p.grad_scale;
  launch_rows<T, Mode::kFinish>(a, st);
  launch_sum(row_loss, p.labels, p.ignore_index, p.loss_sum, p.count, st);
}

}  // namespace

void detail::cross_entropy_fwd_bwd_cuda(const CrossEntropyParams& p, const Stream& s) {
  if (p.logits.dtype() == DType::kF32)
    fwd_bwd<float>(p, s);
  else
    fwd_bwd<bf16_t>(p, s);
}

void detail::cross_entropy_stats_cuda(const CrossEntropyStatsParams& p, const Stream& s) {
  if (p.logits.dtype() == DType::kF32)
    stats<float>(p, s);
  else
    stats<bf16_t>(p, s);
}

void detail::cross_entropy_finish_cuda(const CrossEntropyFinishParams& p, const Stream& s) {
  if (p.logits.dtype() == DType::kF32)
    finish<float>(p, s);
  else
    finish<bf16_t>(p, s);
}

}  // namespace helix
