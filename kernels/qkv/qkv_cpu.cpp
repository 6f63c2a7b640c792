// QKV split / gradient join: validation, device dispatch and the CPU reference, with and without
// the fused rotary embedding.
#include <cstring>
#include <vector>

#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/qkv/qkv.h"
#include "kernels/rotary/rotary_math.h"

namespace helix {
namespace {

void check_shapes(const Tensor& qkv, const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  HELIX_CHECK(qkv.ndim() == 2 && qkv.dim(1) % 3 == 0, "{}: expected qkv [T, 3H], got {}", op, qkv.str());
  const int64_t t = qkv.dim(0), h = qkv.dim(1) / 3;
  for (const Tensor* x : {&q, &k, &v}) {
    HELIX_CHECK(x->numel() == t * h && x->dtype() == qkv.dtype() && x->device() == qkv.device(),
                "{}: expected [{}, {}] {} on {} for q/k/v, got {}", op, t, h, dtype_name(qkv.dtype()),
                qkv.device().str(), x->str());
  }
  HELIX_CHECK(qkv.dtype() == DType::kF32 || qkv.dtype() == DType::kBF16, "{}: expected f32 or bf16, got {}", op,
              qkv.str());
}

// The fused rotary's checks: D divides H, then every rotary check on q, k viewed as [T, H/D, D].
void check_rotary(const QkvRotary& r, const Tensor& qkv, const Tensor& q, const Tensor& k, bool backward,
                  const char* op) {
  const int64_t t = qkv.dim(0), h = qkv.dim(1) / 3, d = r.head_dim;
  HELIX_CHECK(d > 0 && h % d == 0, "{}: expected rotary head_dim > 0 dividing H = {}, got {}", op, h, d);
  checks::same_device_contiguous(op, qkv, {{&qkv, backward ? "dqkv" : "qkv"}});
  detail::rotary_validate({q.view({t, h / d, d}), k.view({t, h / d, d}), r.pos, r.base, backward ? -1.f : 1.f, op,
                           backward ? "dq" : "q", backward ? "dk" : "k"});
  if (r.pos.cu_seqlens.defined()) checks::cu_seqlens_values(op, r.pos.cu_seqlens, t);
}

template <typename T>
void add_into(T& o, T g) {
  if constexpr (std::is_same_v<T, bf16_t>) o = bf16_t::from_float(o.to_float() + g.to_float());
  else o += g;
}

// cos / sin of every frequency for every token of a CPU rotary: [T, D/2] each, as rotary_apply_cpu
// computes them.
struct CosSin {
  std::vector<float> c, s;
};
CosSin rotary_tables(const QkvRotary& r, int64_t t, float sin_sign, const char* op) {
  const int64_t half = r.head_dim / 2;
  const std::vector<float> inv_freq = rotary_inv_freq(r.head_dim, r.base);
  const int32_t* positions = r.pos.positions.defined() ? r.pos.positions.data<int32_t>() : nullptr;
  const int32_t* cu = r.pos.cu_seqlens.defined() ? r.pos.cu_seqlens.data<int32_t>() : nullptr;
  const int64_t num_seqs = cu ? r.pos.cu_seqlens.dim(0) - 1 : 0;
  CosSin cs{std::vector<float>(static_cast<size_t>(t * half)), std::vector<float>(static_cast<size_t>(t * half))};
  for (int64_t row = 0; row < t; ++row) {
    const int64_t pos = detail::rotary_cpu_position(op, positions, cu, num_seqs, row);
    for (int64_t i = 0; i < half; ++i)
      rotary::cos_sin(pos, inv_freq[i], sin_sign, &cs.c[row * half + i], &cs.s[row * half + i]);
  }
  return cs;
}

template <typename T>
void split_rotary_cpu(const QkvSplitParams& p) {
  const int64_t t = p.qkv.dim(0), h = p.qkv.dim(1) / 3, d = p.rotary.head_dim, half = d / 2;
  const CosSin cs = rotary_tables(p.rotary, t, 1.f, "qkv_split");
  const T* src = p.qkv.data<T>();
  T* dst[2] = {p.q.data<T>(), p.k.data<T>()};
  for (int64_t r = 0; r < t; ++r) {
    const float* c = cs.c.data() + r * half;
    const float* s = cs.s.data() + r * half;
    for (int j = 0; j < 2; ++j)
      for (int64_t hd = 0; hd < h; hd += d)
        for (int64_t i = 0; i < half; ++i) {
          T x1 = src[r * 3 * h + j * h + hd + i], x2 = src[r * 3 * h + j * h + hd + i + half];
          rotary::rotate_pair(x1, x2, c[i], s[i]);
          dst[j][r * h + hd + i] = x1;
          dst[j][r * h + hd + i + half] = x2;
        }
    std::memcpy(p.v.data<T>() + r * h, src + r * 3 * h + 2 * h, h * sizeof(T));
  }
}

template <typename T>
void join_cpu(const QkvJoinGradParams& p) {
  const int64_t t = p.dqkv.dim(0), h = p.dqkv.dim(1) / 3;
  T* out = p.dqkv.data<T>();
  const T* parts[3] = {p.dq.data<T>(), p.dk.data<T>(), p.dv.data<T>()};
  for (int64_t r = 0; r < t; ++r)
    for (int j = 0; j < 3; ++j)
      for (int64_t c = 0; c < h; ++c) add_into(out[r * 3 * h + j * h + c], parts[j][r * h + c]);
}

// As rotary_bwd then join_cpu: dq, dk rotated back and rounded to T, then accumulated.
template <typename T>
void join_rotary_cpu(const QkvJoinGradParams& p) {
  const int64_t t = p.dqkv.dim(0), h = p.dqkv.dim(1) / 3, d = p.rotary.head_dim, half = d / 2;
  const CosSin cs = rotary_tables(p.rotary, t, -1.f, "qkv_join_grad");
  T* out = p.dqkv.data<T>();
  const T* parts[2] = {p.dq.data<T>(), p.dk.data<T>()};
  const T* dv = p.dv.data<T>();
  for (int64_t r = 0; r < t; ++r) {
    const float* c = cs.c.data() + r * half;
    const float* s = cs.s.data() + r * half;
    for (int j = 0; j < 2; ++j)
      for (int64_t hd = 0; hd < h; hd += d)
        for (int64_t i = 0; i < half; ++i) {
          T g1 = parts[j][r * h + hd + i], g2 = parts[j][r * h + hd + i + half];
          rotary::rotate_pair(g1, g2, c[i], s[i]);
          add_into(out[r * 3 * h + j * h + hd + i], g1);
          add_into(out[r * 3 * h + j * h + hd + i + half], g2);
        }
    for (int64_t c2 = 0; c2 < h; ++c2) add_into(out[r * 3 * h + 2 * h + c2], dv[r * h + c2]);
  }
}

}  // namespace

void qkv_split(const QkvSplitParams& p, const Stream& stream) {
  check_shapes(p.qkv, p.q, p.k, p.v, "qkv_split");
  if (p.rotary.enabled()) check_rotary(p.rotary, p.qkv, p.q, p.k, false, "qkv_split");
  if (p.qkv.is_cuda()) {
#if HELIX_WITH_CUDA
    return detail::qkv_split_cuda(p, stream);
#else
    HELIX_FAIL("qkv_split: CUDA tensors in a CPU-only build");
#endif
  }
  if (p.rotary.enabled()) {
    elem::visit_f32_bf16(p.qkv.dtype(), "qkv_split", "qkv", [&](auto tag) { split_rotary_cpu<decltype(tag)>(p); });
    return;
  }
  const int64_t t = p.qkv.dim(0), h = p.qkv.dim(1) / 3, es = static_cast<int64_t>(dtype_size(p.qkv.dtype()));
  const char* src = static_cast<const char*>(p.qkv.data_ptr());
  char* dst[3] = {static_cast<char*>(p.q.data_ptr()), static_cast<char*>(p.k.data_ptr()),
                  static_cast<char*>(p.v.data_ptr())};
  for (int64_t r = 0; r < t; ++r)
    for (int j = 0; j < 3; ++j) std::memcpy(dst[j] + r * h * es, src + (r * 3 * h + j * h) * es, h * es);
}

void qkv_join_grad(const QkvJoinGradParams& p, const Stream& stream) {
  check_shapes(p.dqkv, p.dq, p.dk, p.dv, "qkv_join_grad");
  if (p.rotary.enabled()) check_rotary(p.rotary, p.dqkv, p.dq, p.dk, true, "qkv_join_grad");
  if (p.dqkv.is_cuda()) {
#if HELIX_WITH_CUDA
    return detail::qkv_join_grad_cuda(p, stream);
#else
    HELIX_FAIL("qkv_join_grad: CUDA tensors in a CPU-only build");
#endif
  }
  elem::visit_f32_bf16(p.dqkv.dtype(), "qkv_join_grad", "dqkv", [&](auto tag) {
    using T = decltype(tag);
    if (p.rotary.enabled()) join_rotary_cpu<T>(p);
    else join_cpu<T>(p);
  });
}

}  // namespace helix
