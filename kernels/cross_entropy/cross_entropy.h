#pragma once
// Softmax cross-entropy of the masked-LM head: loss sum, token count and dlogits from one pass over
// the logits (the gradient is computed in the same kernel as the loss, or skipped for evaluation).
// The per-row statistics (max, sum-exp, target logit) can also be produced and consumed separately,
// so a vocabulary-parallel head can exchange them between ranks before the finishing step.
//
// Math, for a row t whose label y_t is not ignore_index (V columns, logits x):
//   m_t        = max_j x_tj                     s_t = sum_j exp(x_tj - m_t)
//   loss_t     = (m_t - x_{t,y_t}) + log(s_t)   (= log-sum-exp - target logit)
//   dlogits_tj = (exp(x_tj - m_t) / s_t - [j == y_t]) * grad_scale
// Everything is taken relative to the row max, so large logits (|x| ~ 1e3) keep f32 precision.
// Rows labelled ignore_index add nothing to the loss sum and the count and get a zero gradient row.
// The loss sum and the count are reduced in a fixed order (no atomics): results are deterministic.
// A label outside [0, vocab) that is not ignore_index is a caller error: the CPU reference throws;
// the CUDA kernels cannot throw and instead make that row's loss and gradient NaN, so the step's
// non-finite check catches it.
//
// Vocabulary parallel (each of the tp ranks holds logits columns [vocab_start, vocab_start + V_r)):
//   1. cross_entropy_stats on every rank: per-row max m_r, sum-exp s_r (relative to m_r) and target
//      logit (0 on the ranks that do not hold the label), three f32 [T] vectors.
//   2. The parallel layer all-gathers them into [tp, T] tensors (rank order), one collective.
//      (Equivalent alternative: all-reduce MAX of m into M, rescale s_r *= exp(m_r - M), all-reduce
//      SUM of s and target, and pass [1, T] tensors.)
//   3. cross_entropy_finish on every rank merges the parts in rank order, so the loss sum and
//      the count are bitwise equal on all ranks, and writes dlogits for the rank's own columns.
// With one part (P = 1, vocab_start = 0), stats + finish give bitwise the fused op's results.
#include <cstdint>

#include "core/device.h"
#include "core/tensor.h"

namespace helix {

// Fused loss and gradient over the whole vocabulary.
struct CrossEntropyParams {
  Tensor logits;    // [T, V] bf16 or f32
  Tensor labels;    // [T] i32: class in [0, V) or ignore_index
  Tensor loss_sum;  // [1] f32 out: sum of loss_t over the non-ignored rows (overwritten)
  Tensor count;     // [1] i32 or f32 out: number of non-ignored rows (overwritten)
  Tensor dlogits;   // [T, V] dtype of logits, out; undefined = loss only (evaluation).
                    //   May be the logits tensor itself (gradient written in place).
  Tensor row_loss;  // [T] f32 out, optional: loss_t per row, 0 for ignored rows
  float grad_scale =
      1.0f;  // the caller passes 1 / (global count) for the gradient of the mean loss
  int32_t ignore_index = -100;
};
void cross_entropy_fwd_bwd(const CrossEntropyParams& p, const Stream& s);

// Step 1 of the split form: statistics of this rank's vocabulary columns.
struct CrossEntropyStatsParams {
  Tensor logits;   // [T, Vr] bf16 or f32: columns [vocab_start, vocab_start + Vr) of the vocabulary
  Tensor labels;   // [T] i32: global class ids or ignore_index
  Tensor row_max;  // [T] f32 out: m_r, max over this rank's columns
  Tensor row_sumexp;  // [T] f32 out: s_r, sum over this rank's columns of exp(x - m_r)
  Tensor row_target;  // [T] f32 out: x_{t,y_t} when y_t is one of this rank's columns, else 0
  int64_t vocab_start = 0;
  int32_t ignore_index = -100;
};
void cross_entropy_stats(const CrossEntropyStatsParams& p, const Stream& s);

// Step 3 of the split form: merge the P parts (P >= 1, in rank order), loss, count and gradient.
struct CrossEntropyFinishParams {
  Tensor logits;       // [T, Vr] bf16 or f32, as given to cross_entropy_stats
  Tensor labels;       // [T] i32
  Tensor part_max;     // [P, T] f32: row_max of every part
  Tensor part_sumexp;  // [P, T] f32: row_sumexp of every part (relative to that part's max)
  Tensor part_target;  // [P, T] f32: row_target of every part (summed)
  Tensor loss_sum;     // [1] f32 out
  Tensor count;        // [1] i32 or f32 out
  Tensor dlogits;      // [T, Vr] dtype of logits, out; undefined = loss only; may be logits itself
  Tensor row_loss;     // [T] f32 out, optional
  int64_t vocab_start = 0;
  int64_t vocab_size = 0;  // whole vocabulary (valid labels are [0, vocab_size)); 0 means Vr
  float grad_scale = 1.0f;
  int32_t ignore_index = -100;
};
void cross_entropy_finish(const CrossEntropyFinishParams& p, const Stream& s);

namespace detail {
#if HELIX_WITH_CUDA
// CUDA implementations (kernels/cross_entropy/cross_entropy.cu); params are validated by the
// caller.
void cross_entropy_fwd_bwd_cuda(const CrossEntropyParams& p, const Stream& s);
void cross_entropy_stats_cuda(const CrossEntropyStatsParams& p, const Stream& s);
void cross_entropy_finish_cuda(const CrossEntropyFinishParams& p, const Stream& s);
#endif
}  // namespace detail

}  // namespace helix
