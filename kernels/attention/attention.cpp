// Public entry points of packed-THD attention and the LSE merge: validation of every input (shapes,
// dtypes, devices, alignment, and the cu_seqlens values through their host copies), then dispatch
// to the CPU reference or the CUDA kernels by the operands' device.
#include "kernels/attention/attention.h"

#include <cmath>
#include <cstdint>
#include <string_view>

namespace helix {

CuSeqlens CuSeqlens::make(const std::vector<int32_t>& values, Device device) {
  CuSeqlens c;
  c.host = values;
  c.device = Tensor::from_vector(values, {static_cast<int64_t>(values.size())}, device);
  return c;
}

CuSeqlens CuSeqlens::from_lengths(const std::vector<int32_t>& lengths, Device device,
                                  int multiple) {
  HELIX_CHECK(multiple >= 1, "CuSeqlens::from_lengths: expected multiple >= 1, got {}", multiple);
  std::vector<int32_t> cu(lengths.size() + 1, 0);
  for (size_t i = 0; i < lengths.size(); ++i) {
    HELIX_CHECK(lengths[i] >= 0, "CuSeqlens::from_lengths: expected lengths >= 0, got {} at {}",
                lengths[i], i);
    const int64_t padded = (int64_t{lengths[i]} + multiple - 1) / multiple * multiple;
    HELIX_CHECK(cu[i] + padded <= INT32_MAX, "CuSeqlens::from_lengths: total exceeds int32");
    cu[i + 1] = static_cast<int32_t>(cu[i] + padded);
  }
  return make(cu, device);
}

CuSeqlens CuSeqlens::wrap(const Tensor& device, const Tensor& host_copy) {
  HELIX_CHECK(host_copy.defined() && host_copy.is_cpu() && host_copy.dtype() == DType::kI32,
              "CuSeqlens::wrap: expected an i32 CPU tensor as the host copy, got {}",
              host_copy.str());
  CuSeqlens c;
  c.host = host_copy.to_vector<int32_t>();
  c.device = device;
  return c;
}

namespace detail {

std::vector<std::pair<int64_t, int64_t>> thd_gap_rows(const CuSeqlens& cu, const CuSeqlens& padded,
                                                      int64_t total_rows) {
  const std::vector<int32_t>& off = padded.defined() ? padded.host : cu.host;
  const int b = cu.batch();
  std::vector<std::pair<int64_t, int64_t>> gaps;
  for (int i = 0; i < b; ++i) {
    const int64_t begin = int64_t{off[i]} + (cu.host[i + 1] - cu.host[i]);
    const int64_t end = i + 1 < b ? int64_t{off[i + 1]} : total_rows;
    if (end > begin) gaps.emplace_back(begin, end);
  }
  if (b == 0 && total_rows > 0) gaps.emplace_back(0, total_rows);
  return gaps;
}

}  // namespace detail

namespace {

constexpr int kMaxGridYZ = 65535;  // gridDim.y (heads) and gridDim.z (sequences)

// A [rows, H, D] bf16 attention operand: dtype, rank, shape, device, contiguity, 16-byte alignment
// (the kernels move 16-byte chunks with cp.async).
void check_operand(const Tensor& t, std::string_view name, int64_t rows, int64_t heads, int64_t dim,
                   Device device, DType dtype) {
  HELIX_CHECK(t.defined(), "{}: expected a tensor, got an undefined one", name);
  // bf16 everywhere; f32 as well on the CPU (f32 reference runs of the model); one dtype for all.
  HELIX_CHECK(t.dtype() == dtype, "{}: expected dtype {}{}, got {}", name, dtype_name(dtype),
              name == "q" ? "" : " (as q)", dtype_name(t.dtype()));
  HELIX_CHECK(t.ndim() == 3, "{}: expected a [T, H, D] tensor, got {}", name, t.shape().str());
  if (rows >= 0) {
    HELIX_CHECK(t.dim(0) == rows && t.dim(1) == heads && t.dim(2) == dim,
                "{}: expected shape [{}, {}, {}], got {}", name, rows, heads, dim, t.shape().str());
  }
  HELIX_CHECK(t.device() == device, "{}: expected a tensor on {}, got {}", name, device.str(),
              t.device().str());
  HELIX_CHECK(t.is_contiguous(), "{}: expected a contiguous tensor", name);
  if (t.numel() > 0) {
    const auto addr = reinterpret_cast<uintptr_t>(t.data_ptr());
    HELIX_CHECK(addr % 16 == 0,
                "{}: expected a 16-byte aligned data pointer, got address {} ({} mod 16)", name,
                addr, addr % 16);
  }
}

void check_lse(const Tensor& t, std::string_view name, int64_t heads, int64_t rows, Device device) {
  HELIX_CHECK(t.defined(), "{}: expected a tensor, got an undefined one", name);
  HELIX_CHECK(t.dtype() == DType::kF32, "{}: expected dtype f32, got {}", name,
              dtype_name(t.dtype()));
  HELIX_CHECK(t.ndim() == 2 && t.dim(0) == heads && t.dim(1) == rows,
              "{}: expected shape [{}, {}] ([H, T]), got {}", name, heads, rows, t.shape().str());
  HELIX_CHECK(t.device() == device, "{}: expected a tensor on {}, got {}", name, device.str(),
              t.device().str());
  HELIX_CHECK(t.is_contiguous(), "{}: expected a contiguous tensor", name);
}

// One cu_seqlens: host copy monotonic from 0, device copy of the same size, i32, on `device`.
void check_cu(const CuSeqlens& cu, std::string_view name, int batch, Device device) {
  HELIX_CHECK(cu.host.size() >= 2, "{}: expected at least 2 entries ([b+1], b >= 1), got {}", name,
              cu.host.size());
  if (batch >= 0) {
    HELIX_CHECK(cu.batch() == batch,
                "{}: expected {} entries (b = {} sequences, as cu_seqlens_q), got {}", name,
                batch + 1, batch, cu.host.size());
  }
  HELIX_CHECK(cu.batch() <= kMaxGridYZ, "{}: expected at most {} sequences, got {}", name,
              kMaxGridYZ, cu.batch());
  HELIX_CHECK(cu.device.defined(),
              "{}: the device copy is undefined (build it with CuSeqlens::make)", name);
  HELIX_CHECK(cu.device.dtype() == DType::kI32, "{}: expected dtype i32, got {}", name,
              dtype_name(cu.device.dtype()));
  HELIX_CHECK(cu.device.ndim() == 1 && cu.device.dim(0) == static_cast<int64_t>(cu.host.size()),
              "{}: expected the device copy of shape [{}] like the host copy, got {}", name,
              cu.host.size(), cu.device.shape().str());
  HELIX_CHECK(cu.device.device() == device, "{}: expected the device copy on {}, got {}", name,
              device.str(), cu.device.device().str());
  HELIX_CHECK(cu.host[0] == 0, "{}: expected entry 0 to be 0, got {}", name, cu.host[0]);
  for (size_t i = 0; i + 1 < cu.host.size(); ++i) {
    HELIX_CHECK(cu.host[i + 1] >= cu.host[i],
                "{}: expected non-decreasing offsets, got entry {} = {} after entry {} = {}", name,
                i + 1, cu.host[i + 1], i, cu.host[i]);
  }
}

// One side (q or kv) of the batch: true lengths, optional padded offsets, row count, max_seqlen.
void check_side(const CuSeqlens& cu, const CuSeqlens& padded, int max_seqlen, int64_t rows,
                std::string_view side, std::string_view tensor, int batch, Device device) {
  const std::string cu_name = fmt::format("cu_seqlens_{}", side);
  const std::string pad_name = fmt::format("cu_seqlens_{}_padded", side);
  check_cu(cu, cu_name, batch, device);
  int32_t longest = 0;
  int longest_at = 0;
  for (int i = 0; i < cu.batch(); ++i) {
    const int32_t len = cu.host[i + 1] - cu.host[i];
    if (len > longest) longest = len, longest_at = i;
  }
  if (padded.defined()) {
    check_cu(padded, pad_name, cu.batch(), device);
    for (int i = 0; i < cu.batch(); ++i) {
      const int32_t len = cu.host[i + 1] - cu.host[i];
      const int32_t plen = padded.host[i + 1] - padded.host[i];
      HELIX_CHECK(plen >= len,
                  "{}: expected sequence {} to span at least its true length {} ({}), got {} rows",
                  pad_name, i, len, cu_name, plen);
    }
    HELIX_CHECK(padded.host.back() <= rows,
                "{}: expected offsets within {} ({} rows), got a last offset of {}", pad_name,
                tensor, rows, padded.host.back());
  } else {
    HELIX_CHECK(cu.host.back() <= rows,
                "{}: expected offsets within {} ({} rows), got a last offset of {}", cu_name,
                tensor, rows, cu.host.back());
  }
  HELIX_CHECK(
      max_seqlen >= longest,
      "max_seqlen_{}: expected at least the longest sequence ({} tokens, sequence {}), got {}",
      side, longest, longest_at, max_seqlen);
}

void check_common(const Tensor& q, const Tensor& k, const Tensor& v,
                  const ThdAttentionLayout& layout, float softmax_scale) {
  HELIX_CHECK(q.defined() && q.ndim() == 3, "q: expected a [Tq, H, D] tensor, got {}", q.str());
  const Device dev = q.device();
  const int64_t heads = q.dim(1), dim = q.dim(2);
  if (dev.is_cuda()) {
    HELIX_CHECK(dim == 16 || dim == 24 || dim == 32 || dim == 64 || dim == 128,
                "q: expected head dim 16, 24, 32, 64 or 128 on CUDA, got {}", dim);
  } else {
    HELIX_CHECK(dim >= 1 && dim <= 256, "q: expected head dim 1 to 256, got {}", dim);
  }
  HELIX_CHECK(heads >= 1 && heads <= kMaxGridYZ, "q: expected 1 to {} heads, got {}", kMaxGridYZ,
              heads);
  const DType dt = q.dtype() == DType::kF32 && dev.is_cpu() ? DType::kF32 : DType::kBF16;
  check_operand(q, "q", -1, heads, dim, dev, dt);
  HELIX_CHECK(k.defined() && k.ndim() == 3, "k: expected a [Tk, H, D] tensor, got {}", k.str());
  check_operand(k, "k", k.dim(0), heads, dim, dev, dt);
  check_operand(v, "v", k.dim(0), heads, dim, dev, dt);
  HELIX_CHECK(std::isfinite(softmax_scale) && softmax_scale > 0.f,
              "softmax_scale: expected a positive finite value, got {}", softmax_scale);
  check_side(layout.cu_seqlens_q, layout.cu_seqlens_q_padded, layout.max_seqlen_q, q.dim(0), "q",
             "q", -1, dev);
  check_side(layout.cu_seqlens_kv, layout.cu_seqlens_kv_padded, layout.max_seqlen_kv, k.dim(0),
             "kv", "k", layout.cu_seqlens_q.batch(), dev);
}

void validate_fwd(const ThdAttentionFwdParams& p) {
  check_common(p.q, p.k, p.v, p.layout, p.softmax_scale);
  check_operand(p.o, "o", p.q.dim(0), p.q.dim(1), p.q.dim(2), p.q.device(), p.q.dtype());
  check_lse(p.lse, "lse", p.q.dim(1), p.q.dim(0), p.q.device());
}

void validate_bwd(const ThdAttentionBwdParams& p) {
  check_common(p.q, p.k, p.v, p.layout, p.softmax_scale);
  const Device dev = p.q.device();
  const int64_t tq = p.q.dim(0), tk = p.k.dim(0), h = p.q.dim(1), d = p.q.dim(2);
  check_operand(p.o, "o", tq, h, d, dev, p.q.dtype());
  check_operand(p.d_o, "d_o", tq, h, d, dev, p.q.dtype());
  check_lse(p.lse, "lse", h, tq, dev);
  if (p.d_lse.defined()) check_lse(p.d_lse, "d_lse", h, tq, dev);
  check_operand(p.d_q, "d_q", tq, h, d, dev, p.q.dtype());
  check_operand(p.d_k, "d_k", tk, h, d, dev, p.q.dtype());
  check_operand(p.d_v, "d_v", tk, h, d, dev, p.q.dtype());
}

// Merge operands: [T, H, D] bf16 or f32, all of one shape and device.
void check_merge_out(const Tensor& t, std::string_view name, const Tensor& like) {
  HELIX_CHECK(t.defined(), "{}: expected a tensor, got an undefined one", name);
  HELIX_CHECK(t.dtype() == DType::kBF16 || t.dtype() == DType::kF32,
              "{}: expected dtype bf16 or f32, got {}", name, dtype_name(t.dtype()));
  HELIX_CHECK(t.ndim() == 3, "{}: expected a [T, H, D] tensor, got {}", name, t.shape().str());
  HELIX_CHECK(t.shape() == like.shape(), "{}: expected shape {} (as outs[0]), got {}", name,
              like.shape().str(), t.shape().str());
  HELIX_CHECK(t.device() == like.device(), "{}: expected a tensor on {}, got {}", name,
              like.device().str(), t.device().str());
  HELIX_CHECK(t.is_contiguous(), "{}: expected a contiguous tensor", name);
}

void check_merge_parts(const std::vector<Tensor>& outs, const std::vector<Tensor>& lses) {
  const size_t n = outs.size();
  HELIX_CHECK(n >= 1 && n <= static_cast<size_t>(kMaxLseMergeParts),
              "lse_merge: expected 1 to {} partial outputs, got {}", kMaxLseMergeParts, n);
  HELIX_CHECK(lses.size() == n, "lse_merge: expected {} lses (one per partial output), got {}", n,
              lses.size());
  HELIX_CHECK(outs[0].defined() && outs[0].ndim() == 3,
              "outs[0]: expected a [T, H, D] tensor, got {}", outs[0].str());
  const int64_t t = outs[0].dim(0), h = outs[0].dim(1);
  for (size_t i = 0; i < n; ++i) {
    check_merge_out(outs[i], fmt::format("outs[{}]", i), outs[0]);
    HELIX_CHECK(outs[i].dtype() == outs[0].dtype(),
                "outs[{}]: expected dtype {} (as outs[0]), got {}", i, dtype_name(outs[0].dtype()),
                dtype_name(outs[i].dtype()));
    check_lse(lses[i], fmt::format("lses[{}]", i), h, t, outs[0].device());
  }
}

}  // namespace

void thd_attention_fwd(const ThdAttentionFwdParams& p, const Stream& stream) {
  validate_fwd(p);
  if (p.q.is_cpu()) {
    detail::thd_attention_fwd_cpu(p);
    return;
  }
#if HELIX_WITH_CUDA
  detail::thd_attention_fwd_cuda(p, stream);
#else
  HELIX_FAIL("thd_attention_fwd: q is {}, but helix was built without CUDA", p.q.str());
#endif
}

void thd_attention_bwd(const ThdAttentionBwdParams& p, const Stream& stream) {
  validate_bwd(p);
  if (p.q.is_cpu()) {
    detail::thd_attention_bwd_cpu(p);
    return;
  }
#if HELIX_WITH_CUDA
  detail::thd_attention_bwd_cuda(p, stream);
#else
  HELIX_FAIL("thd_attention_bwd: q is {}, but helix was built without CUDA", p.q.str());
#endif
}

void lse_merge_fwd(const LseMergeFwdParams& p, const Stream& stream) {
  check_merge_parts(p.outs, p.lses);
  check_merge_out(p.out, "out", p.outs[0]);
  check_lse(p.lse, "lse", p.outs[0].dim(1), p.outs[0].dim(0), p.outs[0].device());
  if (p.out.is_cpu()) {
    detail::lse_merge_fwd_cpu(p);
    return;
  }
#if HELIX_WITH_CUDA
  detail::lse_merge_fwd_cuda(p, stream);
#else
  HELIX_FAIL("lse_merge_fwd: out is {}, but helix was built without CUDA", p.out.str());
#endif
}

void lse_merge_bwd(const LseMergeBwdParams& p, const Stream& stream) {
  check_merge_parts(p.outs, p.lses);
  const Tensor& like = p.outs[0];
  const int64_t t = like.dim(0), h = like.dim(1);
  check_merge_out(p.d_out, "d_out", like);
  if (p.d_lse.defined()) check_lse(p.d_lse, "d_lse", h, t, like.device());
  HELIX_CHECK(p.d_outs.size() == p.outs.size() && p.d_lses.size() == p.outs.size(),
              "lse_merge_bwd: expected {} d_outs and d_lses (one per partial), got {} and {}",
              p.outs.size(), p.d_outs.size(), p.d_lses.size());
  for (size_t i = 0; i < p.outs.size(); ++i) {
    check_merge_out(p.d_outs[i], fmt::format("d_outs[{}]", i), like);
    HELIX_CHECK(p.d_outs[i].dtype() == like.dtype(),
                "d_outs[{}]: expected dtype {} (as outs), got {}", i, dtype_name(like.dtype()),
                dtype_name(p.d_outs[i].dtype()));
    check_lse(p.d_lses[i], fmt::format("d_lses[{}]", i), h, t, like.device());
  }
  if (like.is_cpu()) {
    detail::lse_merge_bwd_cpu(p);
    return;
  }
#if HELIX_WITH_CUDA
  detail::lse_merge_bwd_cuda(p, stream);
#else
  HELIX_FAIL("lse_merge_bwd: d_out is {}, but helix was built without CUDA", p.d_out.str());
#endif
}

double thd_attention_fwd_flops(const ThdAttentionLayout& layout, int heads, int head_dim,
                               AttentionMask mask) {
  double pairs = 0;
  const auto& q = layout.cu_seqlens_q.host;
  const auto& kv = layout.cu_seqlens_kv.host;
  for (size_t i = 0; i + 1 < q.size() && i + 1 < kv.size(); ++i)
    pairs += double(q[i + 1] - q[i]) * double(kv[i + 1] - kv[i]);
  const double flops = 4.0 * heads * head_dim * pairs;
  return mask == AttentionMask::kCausal ? 0.5 * flops : flops;
}

}  // namespace helix
