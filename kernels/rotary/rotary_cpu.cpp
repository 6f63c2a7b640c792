// Rotary embedding: inv_freq, parameter validation, device dispatch and the CPU reference.
#include <cmath>

#include "kernels/common/checks.h"
#include "kernels/common/elem.h"
#include "kernels/rotary/rotary.h"
#include "kernels/rotary/rotary_math.h"

namespace helix {
namespace {

constexpr int64_t kMaxHeadDim = 256;

}  // namespace

void detail::rotary_validate(const detail::RotaryApply& p) {
  const char* op = p.op;
  HELIX_CHECK(p.a.defined() || p.b.defined(), "{}: expected {} or {} (or both), got neither", op,
              p.a_name, p.b_name);
  const Tensor& ref = p.a.defined() ? p.a : p.b;
  const char* ref_name = p.a.defined() ? p.a_name : p.b_name;
  HELIX_CHECK(ref.ndim() == 3, "{}: expected {} of shape [T, heads, D], got {}", op, ref_name,
              ref.str());
  const int64_t T = ref.dim(0), D = ref.dim(2);
  elem::visit_f32_bf16(ref.dtype(), op, ref_name, [](auto) {});
  HELIX_CHECK(D > 0 && D % 2 == 0 && D <= kMaxHeadDim,
              "{}: expected an even head dim D <= {}, got {}", op, kMaxHeadDim, ref.str());
  checks::same_device_contiguous(op, ref,
                                 {{&p.a, p.a_name},
                                  {&p.b, p.b_name},
                                  {&p.pos.cu_seqlens, "cu_seqlens"},
                                  {&p.pos.positions, "positions"}});
  for (const auto& [t, name] :
       {std::pair<const Tensor*, const char*>{&p.a, p.a_name}, {&p.b, p.b_name}}) {
    if (!t->defined()) continue;
    HELIX_CHECK(t->ndim() == 3 && t->dim(0) == T && t->dim(2) == D && t->dtype() == ref.dtype(),
                "{}: expected {} {}[{}, heads, {}], got {}", op, name, dtype_name(ref.dtype()), T,
                D, t->str());
  }
  HELIX_CHECK(
      p.pos.cu_seqlens.defined() != p.pos.positions.defined(),
      "{}: expected exactly one of cu_seqlens and positions, got cu_seqlens {} and positions {}",
      op, p.pos.cu_seqlens.str(), p.pos.positions.str());
  if (p.pos.positions.defined())
    checks::shape_dtype(op, p.pos.positions, "positions", {T}, DType::kI32);
  if (p.pos.cu_seqlens.defined()) {
    const Tensor& cu = p.pos.cu_seqlens;
    HELIX_CHECK(cu.ndim() == 1 && cu.dim(0) >= 1 && cu.dtype() == DType::kI32,
                "{}: expected cu_seqlens i32 [b+1], got {}", op, cu.str());
  }
  HELIX_CHECK(p.base > 0.f, "{}: expected base > 0, got {}", op, p.base);
}

namespace {

template <typename T>
void rotate(T* x, int64_t heads, int64_t D, const float* cs, const float* sn) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    T* row = x + h * D;
    for (int64_t i = 0; i < half; ++i) rotary::rotate_pair(row[i], row[i + half], cs[i], sn[i]);
  }
}

template <typename T>
void apply_cpu(const detail::RotaryApply& p) {
  const Tensor& ref = p.a.defined() ? p.a : p.b;
  const int64_t T_ = ref.dim(0), D = ref.dim(2), half = D / 2;
  const std::vector<float> inv_freq = rotary_inv_freq(D, p.base);
  const int32_t* positions = p.pos.positions.defined() ? p.pos.positions.data<int32_t>() : nullptr;
  const int32_t* cu = p.pos.cu_seqlens.defined() ? p.pos.cu_seqlens.data<int32_t>() : nullptr;
  const int64_t num_seqs = cu ? p.pos.cu_seqlens.dim(0) - 1 : 0;
  if (cu) checks::cu_seqlens_values(p.op, p.pos.cu_seqlens, T_);
  std::vector<float> cs(static_cast<size_t>(half)), sn(static_cast<size_t>(half));
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t pos = detail::rotary_cpu_position(p.op, positions, cu, num_seqs, t);
    for (int64_t i = 0; i < half; ++i) rotary::cos_sin(pos, inv_freq[i], p.sin_sign, &cs[i], &sn[i]);
    if (p.a.defined())
      rotate(p.a.data<T>() + t * p.a.dim(1) * D, p.a.dim(1), D, cs.data(), sn.data());
    if (p.b.defined())
      rotate(p.b.data<T>() + t * p.b.dim(1) * D, p.b.dim(1), D, cs.data(), sn.data());
  }
}

void apply(const detail::RotaryApply& p, const Stream& stream) {
  detail::rotary_validate(p);
  const Tensor& ref = p.a.defined() ? p.a : p.b;
  if (ref.is_cpu()) return detail::rotary_apply_cpu(p);
#if HELIX_WITH_CUDA
  detail::rotary_apply_cuda(p, stream);
#else
  HELIX_FAIL("{}: tensors are on {}, but helix was built without CUDA", p.op, ref.device().str());
#endif
}

}  // namespace

std::vector<float> rotary_inv_freq(int64_t head_dim, float base) {
  std::vector<float> inv(static_cast<size_t>(head_dim / 2));
  for (int64_t i = 0; i < head_dim / 2; ++i) {
    // torch: arange(0, D, 2).float() / D (fp32), base ** that (fp32 pow), 1.0 / that (fp32).
    const float expo = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    const float pw =
        static_cast<float>(std::pow(static_cast<double>(base), static_cast<double>(expo)));
    inv[i] = 1.0f / pw;
  }
  return inv;
}

int64_t detail::rotary_cpu_position(const char* op, const int32_t* positions,
                                    const int32_t* cu_seqlens, int64_t num_seqs, int64_t t) {
  const int64_t pos = rotary::position_of(positions, cu_seqlens, num_seqs, t);
  HELIX_CHECK(pos >= 0 && pos < (int64_t{1} << 24),
              "{}: expected positions in [0, 2^24), got {} for token {}", op, pos, t);
  return pos;
}

void detail::rotary_apply_cpu(const RotaryApply& p) {
  const Tensor& ref = p.a.defined() ? p.a : p.b;
  elem::visit_f32_bf16(ref.dtype(), p.op, "q", [&](auto t) { apply_cpu<decltype(t)>(p); });
}

void rotary_fwd(const RotaryFwdParams& p, const Stream& stream) {
  apply({p.q, p.k, p.pos, p.base, 1.f, "rotary_fwd", "q", "k"}, stream);
}

void rotary_bwd(const RotaryBwdParams& p, const Stream& stream) {
  apply({p.dq, p.dk, p.pos, p.base, -1.f, "rotary_bwd", "dq", "dk"}, stream);
}

}  // namespace helix
