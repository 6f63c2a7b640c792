// Embedding CUDA kernels. Forward: per-segment token-dropout denominators (one block per segment,
// integer counts), then a row gather with kVec-element vectors. Backward, deterministic and free of
// float atomics:
//   1. keys[t] = ids[t] (V for mask tokens under token dropout and for out-of-range ids, which sort
//      last and are dropped), per-token gradient scale;
//   2. CUB stable radix sort of (key, token) pairs: each id's tokens contiguous, in token order;
//   3. run bounds per id (binary search), pieces per id = ceil(run / kPieceRows), exclusive scan;
//   4. one block per (piece, column chunk) sums its <= kPieceRows rows in order into a partial row;
//   5. one block per (id, column chunk) adds its pieces' partial rows in order into dtable (+=).
// Every sum has a fixed order given the ids, so two runs give the same bits.
#include <algorithm>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "core/cuda_check.h"
#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/common/thd.h"
#include "kernels/embedding/embedding.h"
#include "kernels/embedding/token_dropout.h"

namespace helix {
namespace {

using elem::load_floats;
using elem::store_floats;

constexpr int kPieceRows = 128;   // rows one block of the backward sums before writing a partial
constexpr int kColThreads = 128;  // threads across columns in the backward kernels
constexpr int kRowBlockThreads = 256;

// Grid: b + 1 blocks (the last one the padding tail past cu[b]) of 256 threads: count the segment's
// mask tokens and write its denominator.
__global__ void segment_denoms_kernel(const int32_t* ids, int64_t T, const int32_t* cu,
                                      int num_seqs, int32_t mask_id, float* denoms) {
  __shared__ int64_t red[kRowBlockThreads / 32];
  const int s = blockIdx.x;
  const int64_t start = cu[s], end = s < num_seqs ? cu[s + 1] : T;
  int64_t n = 0;
  for (int64_t t = start + threadIdx.x; t < end; t += blockDim.x) n += ids[t] == mask_id;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) n += __shfl_xor_sync(0xFFFFFFFFu, n, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t masked = 0;
    for (int w = 0; w < kRowBlockThreads / 32; ++w) masked += red[w];
    denoms[s] = token_dropout::denom(masked, end - start);
  }
}

struct FwdArgs {
  const int32_t* ids;  // [T]
  const void* table;   // [V, C]
  void* out;           // [T, C]
  int64_t tokens, vocab;
  int cols;
  const float* denoms;        // [b + 1] or null (no token dropout)
  const int32_t* cu_seqlens;  // [b + 1] or null
  int num_seqs;
  int32_t mask_id;
};

// Grid: ceil(T / rows_per_block) blocks of (threads_per_row, rows_per_block); the threads of a row
// step through its C / kVec vectors.
template <typename W, typename O, int kVec>
__global__ void embedding_fwd_kernel(FwdArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (t >= a.tokens) return;
  const int32_t id = a.ids[t];
  const int nvec = a.cols / kVec;
  O* out = static_cast<O*>(a.out) + t * a.cols;
  if (id < 0 || id >= a.vocab) {  // cannot be reported from here: poison the row
    float nan[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) nan[e] = __int_as_float(0x7FFFFFFF);
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) store_floats(out + j * kVec, nan);
    return;
  }
  const W* row = static_cast<const W*>(a.table) + static_cast<int64_t>(id) * a.cols;
  const bool dropout = a.denoms != nullptr;
  const bool masked = dropout && id == a.mask_id;
  const float denom = dropout ? a.denoms[thd::sequence_of(a.cu_seqlens, a.num_seqs, t)] : 1.f;
  for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
    float v[kVec];
    if (masked) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[e] = 0.f;
    } else {
      load_floats(row + j * kVec, v);
      if (dropout) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[e] = token_dropout::apply<W>(v[e], denom);
      }
    }
    store_floats(out + j * kVec, v);
  }
}

// Grid: ceil(T / 256) blocks of 256 threads: sort keys, token indices and per-token scales.
__global__ void make_keys_kernel(const int32_t* ids, int64_t T, int64_t V, const float* denoms,
                                 const int32_t* cu, int num_seqs, int32_t mask_id, int32_t* keys,
                                 int32_t* tokens, float* scales) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  const int32_t id = ids[t];
  const bool dropout = denoms != nullptr;
  const bool keep = id >= 0 && id < V && !(dropout && id == mask_id);
  keys[t] = keep ? id : static_cast<int32_t>(V);
  tokens[t] = static_cast<int32_t>(t);
  scales[t] = dropout ? token_dropout::grad_scale(denoms[thd::sequence_of(cu, num_seqs, t)]) : 1.f;
}

__device__ __forceinline__ int64_t lower_bound(const int32_t* sorted, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Grid: ceil((V + 1) / 256) blocks of 256 threads. run_start[v] = first sorted position of id v
// (run_start[V] = end of the kept tokens); pieces[v] = ceil(run length / kPieceRows), pieces[V] =
// 0.
__global__ void run_bounds_kernel(const int32_t* sorted_keys, int64_t T, int64_t V,
                                  int32_t* run_start, int32_t* pieces) {
  const int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (v > V) return;
  const int64_t begin = lower_bound(sorted_keys, T, v);
  run_start[v] = static_cast<int32_t>(begin);
  if (v == V) {
    pieces[v] = 0;
    return;
  }
  const int64_t end = lower_bound(sorted_keys, T, v + 1);
  pieces[v] = static_cast<int32_t>((end - begin + kPieceRows - 1) / kPieceRows);
}

// Grid: (upper bound on pieces, ceil(C / (kColThreads * kVec))) blocks of kColThreads threads.
// Block x finds its id v (the largest with piece_start[v] <= x), sums dout * scale over the piece's
// rows in sorted (= token) order and writes partial row x.
template <typename O, int kVec>
__global__ void piece_sums_kernel(const int32_t* sorted_tokens, const int32_t* run_start,
                                  const int32_t* piece_start, const float* scales, const O* dout,
                                  int64_t V, int cols, float* partial) {
  const int64_t piece = blockIdx.x;
  if (piece >= piece_start[V]) return;
  int64_t lo = 0, hi = V;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (piece_start[mid] <= piece)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t v = lo;
  const int64_t r0 = run_start[v] + (piece - piece_start[v]) * kPieceRows;
  const int64_t r1 = min(r0 + kPieceRows, static_cast<int64_t>(run_start[v + 1]));
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (j >= cols / kVec) return;
  float acc[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) acc[e] = 0.f;
#pragma unroll 4
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = sorted_tokens[r];
    const float s = scales[t];
    float d[kVec];
    load_floats(dout + t * cols + j * kVec, d);
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] += d[e] * s;
  }
  store_floats(partial + piece * cols + j * kVec, acc);
}

// Grid: (V, ceil(C / (kColThreads * kVec))) blocks of kColThreads threads: dtable[v] += the pieces
// of id v, added in piece order.
template <int kVec>
__global__ void reduce_pieces_kernel(const int32_t* piece_start, const float* partial, int cols,
                                     float* dtable) {
  const int64_t v = blockIdx.x;
  const int64_t p0 = piece_start[v], p1 = piece_start[v + 1];
  const int j = blockIdx.y * blockDim.x + threadIdx.x;
  if (p0 == p1 || j >= cols / kVec) return;
  float acc[kVec], part[kVec];
  load_floats(partial + p0 * cols + j * kVec, acc);
  for (int64_t p = p0 + 1; p < p1; ++p) {
    load_floats(partial + p * cols + j * kVec, part);
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[e] += part[e];
  }
  float* out = dtable + v * cols + j * kVec;
  float cur[kVec];
  load_floats(out, cur);
#pragma unroll
  for (int e = 0; e < kVec; ++e) cur[e] += acc[e];
  store_floats(out, cur);
}

// Per-segment denominators on the device, or an undefined tensor without token dropout.
Tensor segment_denoms(const Tensor& ids, const EmbeddingTokenDropout& td, const Stream& stream) {
  if (!td.enabled) return Tensor();
  const int64_t segments = td.cu_seqlens.dim(0);  // b + 1
  Tensor denoms = Tensor::empty({segments}, DType::kF32, ids.device(), stream);
  segment_denoms_kernel<<<static_cast<unsigned>(segments), kRowBlockThreads, 0,
                          static_cast<cudaStream_t>(stream.handle())>>>(
      ids.data<int32_t>(), ids.dim(0), td.cu_seqlens.data<int32_t>(),
      static_cast<int>(segments - 1), td.mask_token_id, denoms.data<float>());
  HELIX_LAUNCH_CHECK();
  return denoms;
}

void check_sizes(const char* op, const Tensor& ids, const EmbeddingTokenDropout& td, int64_t C) {
  HELIX_CHECK(ids.dim(0) < (int64_t{1} << 31), "{}: expected T < 2^31, got ids {}", op, ids.str());
  HELIX_CHECK(C < (int64_t{1} << 31), "{}: expected C < 2^31, got {}", op, C);
  HELIX_CHECK(!td.enabled || td.cu_seqlens.dim(0) < (int64_t{1} << 31),
              "{}: too many sequences in {}", op, td.cu_seqlens.str());
}

}  // namespace

void detail::embedding_fwd_cuda(const EmbeddingFwdParams& p, const Stream& stream) {
  const int64_t T = p.ids.dim(0), V = p.table.dim(0), C = p.table.dim(1);
  check_sizes("embedding_fwd", p.ids, p.token_dropout, C);
  if (T == 0 || C == 0) return;
  const EmbeddingTokenDropout& td = p.token_dropout;
  const Tensor denoms = segment_denoms(p.ids, td, stream);
  FwdArgs args{p.ids.data<int32_t>(),
               p.table.data_ptr(),
               p.out.data_ptr(),
               T,
               V,
               static_cast<int>(C),
               denoms.defined() ? denoms.data<float>() : nullptr,
               td.enabled ? td.cu_seqlens.data<int32_t>() : nullptr,
               td.enabled ? static_cast<int>(td.cu_seqlens.dim(0) - 1) : 0,
               td.mask_token_id};
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  elem::visit_f32_bf16(p.table.dtype(), "embedding_fwd", "table", [&](auto wt) {
    using W = decltype(wt);
    elem::visit_f32_bf16(p.out.dtype(), "embedding_fwd", "out", [&](auto ot) {
      using O = decltype(ot);
      constexpr int kVec = 16 / sizeof(W);
      const bool vec_ok = C % kVec == 0 && checks::aligned_to(p.table, 16) &&
                          checks::aligned_to(p.out, kVec * sizeof(O));
      const int vec = vec_ok ? kVec : 1;
      const int64_t nvec = C / vec;
      const int tpr = static_cast<int>(std::min<int64_t>(kRowBlockThreads, (nvec + 31) / 32 * 32));
      const int rpb = kRowBlockThreads / tpr;
      const dim3 block(tpr, rpb);
      const unsigned grid = static_cast<unsigned>((T + rpb - 1) / rpb);
      if (vec_ok)
        embedding_fwd_kernel<W, O, kVec><<<grid, block, 0, st>>>(args);
      else
        embedding_fwd_kernel<W, O, 1><<<grid, block, 0, st>>>(args);
      HELIX_LAUNCH_CHECK();
    });
  });
}

void detail::embedding_bwd_cuda(const EmbeddingBwdParams& p, const Stream& stream) {
  const int64_t T = p.ids.dim(0), V = p.dtable.dim(0), C = p.dtable.dim(1);
  check_sizes("embedding_bwd", p.ids, p.token_dropout, C);
  if (T == 0 || C == 0) return;
  const EmbeddingTokenDropout& td = p.token_dropout;
  cudaStream_t st = static_cast<cudaStream_t>(stream.handle());
  const Device dev = p.ids.device();
  const Tensor denoms = segment_denoms(p.ids, td, stream);

  // 1. Keys, token indices, scales.
  Tensor keys = Tensor::empty({2, T}, DType::kI32, dev, stream);    // in, sorted
  Tensor tokens = Tensor::empty({2, T}, DType::kI32, dev, stream);  // in, sorted
  Tensor scales = Tensor::empty({T}, DType::kF32, dev, stream);
  int32_t* keys_in = keys.data<int32_t>();
  int32_t* keys_out = keys_in + T;
  int32_t* tok_in = tokens.data<int32_t>();
  int32_t* tok_out = tok_in + T;
  make_keys_kernel<<<static_cast<unsigned>((T + 255) / 256), 256, 0, st>>>(
      p.ids.data<int32_t>(), T, V, denoms.defined() ? denoms.data<float>() : nullptr,
      td.enabled ? td.cu_seqlens.data<int32_t>() : nullptr,
      td.enabled ? static_cast<int>(td.cu_seqlens.dim(0) - 1) : 0, td.mask_token_id, keys_in,
      tok_in, scales.data<float>());
  HELIX_LAUNCH_CHECK();

  // 2.-3. Sort by key (keys hold 0..V: end_bit bits suffice), run bounds, pieces, scan.
  int end_bit = 1;
  while ((int64_t{1} << end_bit) <= V) ++end_bit;
  Tensor run_start = Tensor::empty({V + 1}, DType::kI32, dev, stream);
  Tensor pieces = Tensor::empty({2, V + 1}, DType::kI32, dev, stream);  // counts, exclusive scan
  int32_t* piece_count = pieces.data<int32_t>();
  int32_t* piece_start = piece_count + (V + 1);
  size_t sort_bytes = 0, scan_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys_in, keys_out, tok_in,
                                             tok_out, static_cast<int>(T), 0, end_bit, st));
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, piece_count, piece_start,
                                           static_cast<int>(V + 1), st));
  Tensor temp = Tensor::empty({static_cast<int64_t>(std::max({sort_bytes, scan_bytes, size_t{1}}))},
                              DType::kU8, dev, stream);
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), sort_bytes, keys_in, keys_out, tok_in,
                                             tok_out, static_cast<int>(T), 0, end_bit, st));
  run_bounds_kernel<<<static_cast<unsigned>((V + 1 + 255) / 256), 256, 0, st>>>(
      keys_out, T, V, run_start.data<int32_t>(), piece_count);
  HELIX_LAUNCH_CHECK();
  CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.data_ptr(), scan_bytes, piece_count, piece_start,
                                           static_cast<int>(V + 1), st));

  // 4.-5. Piece sums and their ordered reduction. Pieces <= ceil(T / kPieceRows) + min(V, T).
  const int64_t max_pieces = (T + kPieceRows - 1) / kPieceRows + std::min(V, T);
  Tensor partial = Tensor::empty({max_pieces, C}, DType::kF32, dev, stream);
  elem::visit_f32_bf16(p.dout.dtype(), "embedding_bwd", "dout", [&](auto ot) {
    using O = decltype(ot);
    constexpr int kVec = 4;
    const bool vec_ok = C % kVec == 0 && checks::aligned_to(p.dout, kVec * sizeof(O)) &&
                        checks::aligned_to(p.dtable, 16);
    const int vec = vec_ok ? kVec : 1;
    const unsigned col_blocks = static_cast<unsigned>((C / vec + kColThreads - 1) / kColThreads);
    const O* dout = static_cast<const O*>(p.dout.data_ptr());
    const dim3 grid_pieces(static_cast<unsigned>(max_pieces), col_blocks);
    const dim3 grid_ids(static_cast<unsigned>(V), col_blocks);
    if (vec_ok) {
      piece_sums_kernel<O, kVec><<<grid_pieces, kColThreads, 0, st>>>(
          tok_out, run_start.data<int32_t>(), piece_start, scales.data<float>(), dout, V,
          static_cast<int>(C), partial.data<float>());
      HELIX_LAUNCH_CHECK();
      reduce_pieces_kernel<kVec><<<grid_ids, kColThreads, 0, st>>>(
          piece_start, partial.data<float>(), static_cast<int>(C), p.dtable.data<float>());
    } else {
      piece_sums_kernel<O, 1><<<grid_pieces, kColThreads, 0, st>>>(
          tok_out, run_start.data<int32_t>(), piece_start, scales.data<float>(), dout, V,
          static_cast<int>(C), partial.data<float>());
      HELIX_LAUNCH_CHECK();
      reduce_pieces_kernel<1><<<grid_ids, kColThreads, 0, st>>>(
          piece_start, partial.data<float>(), static_cast<int>(C), p.dtable.data<float>());
    }
    HELIX_LAUNCH_CHECK();
  });
}

}  // namespace helix
