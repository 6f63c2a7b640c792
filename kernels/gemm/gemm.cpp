// gemm(): shape and type validation shared by both devices, then dispatch to the CPU path
// (gemm_cpu.cpp: OpenBLAS, or the reference for fp8) or cuBLASLt (gemm.cu).
#include "kernels/gemm/gemm.h"

#include <cmath>
#include <cstdint>
#include <string_view>

#include "core/error.h"

namespace helix {
namespace {

std::string_view op_name(GemmOp op) { return op == GemmOp::kNone ? "kNone" : "kTranspose"; }

std::string_view epilogue_name(GemmEpilogue e) {
  switch (e) {
    case GemmEpilogue::kNone:
      return "kNone";
    case GemmEpilogue::kBias:
      return "kBias";
    case GemmEpilogue::kBiasGelu:
      return "kBiasGelu";
    case GemmEpilogue::kBiasGradA:
      return "kBiasGradA";
    case GemmEpilogue::kBiasGradB:
      return "kBiasGradB";
  }
  return "?";
}

void check_matrix(const Tensor& t, const char* name) {
  HELIX_CHECK(t.defined(), "gemm: expected tensor {} to be defined", name);
  HELIX_CHECK(t.ndim() == 2, "gemm: expected {} to be 2-D, got {}", name, t.str());
  HELIX_CHECK(t.is_contiguous(), "gemm: expected {} to be contiguous, got {}", name, t.str());
}

void check_scalar_f32(const Tensor& t, const char* name, const char* why) {
  HELIX_CHECK(t.defined(), "gemm: {} requires {} (f32 [1])", why, name);
  HELIX_CHECK(t.dtype() == DType::kF32 && t.numel() == 1, "gemm: expected {} to be f32 [1], got {}",
              name, t.str());
}

void check_vector(const Tensor& t, const char* name, int64_t len, const char* why) {
  HELIX_CHECK(t.defined(), "gemm: epilogue {} requires {}", why, name);
  HELIX_CHECK(t.ndim() == 1 && t.dim(0) == len, "gemm: expected {} of shape [{}], got {}", name,
              len, t.str());
}

bool is_input_dtype(DType t) { return t == DType::kF32 || t == DType::kBF16 || dtype_is_fp8(t); }

void check_same_device(const GemmParams& p) {
  const Device dev = p.c.device();
  const auto same = [&](const Tensor& t, const char* name) {
    if (!t.defined()) return;
    HELIX_CHECK(t.device() == dev, "gemm: expected {} on {} like c, got {}", name, dev.str(),
                t.str());
  };
  same(p.a, "a");
  same(p.b, "b");
  same(p.bias, "bias");
  same(p.pre_gelu, "pre_gelu");
  same(p.bias_grad, "bias_grad");
  same(p.a_scale_inv, "a_scale_inv");
  same(p.b_scale_inv, "b_scale_inv");
  same(p.c_scale, "c_scale");
  same(p.c_amax, "c_amax");
}

void validate_fp8(const GemmParams& p, GemmShape s) {
  const DType ta = p.a.dtype(), tb = p.b.dtype(), tc = p.c.dtype();
  HELIX_CHECK(dtype_is_fp8(ta) && dtype_is_fp8(tb),
              "gemm: expected both inputs fp8, both bf16 or both f32, got a {} and b {}",
              dtype_name(ta), dtype_name(tb));
  HELIX_CHECK(!(ta == DType::kE5M2 && tb == DType::kE5M2),
              "gemm: e5m2 x e5m2 is not supported by cuBLASLt; expected at least one e4m3 input");
  HELIX_CHECK(p.op_a == GemmOp::kNone && p.op_b == GemmOp::kTranspose,
              "gemm: fp8 needs cuBLASLt's TN layout, i.e. op_a=kNone, op_b=kTranspose (both "
              "operands K-contiguous; feed transposed copies from cast_transpose_fp8), got op_a={} "
              "op_b={}",
              op_name(p.op_a), op_name(p.op_b));
  HELIX_CHECK(s.m % 16 == 0 && s.n % 16 == 0 && s.k % 16 == 0,
              "gemm: fp8 needs M, N, K multiples of 16 (cuBLASLt leading dimensions), got M={} "
              "N={} K={}",
              s.m, s.n, s.k);
  check_scalar_f32(p.a_scale_inv, "a_scale_inv", "an fp8 a");
  check_scalar_f32(p.b_scale_inv, "b_scale_inv", "an fp8 b");
  const bool any_e5m2 = ta == DType::kE5M2 || tb == DType::kE5M2;
  HELIX_CHECK(tc == DType::kBF16 || tc == DType::kF32 || tc == DType::kE4M3 ||
                  (tc == DType::kE5M2 && any_e5m2),
              "gemm: fp8 inputs {} x {}: expected c bf16, f32, e4m3{}, got {}", dtype_name(ta),
              dtype_name(tb), any_e5m2 ? " or e5m2" : "", dtype_name(tc));
  if (dtype_is_fp8(tc)) {
    check_scalar_f32(p.c_scale, "c_scale", "an fp8 c");
    HELIX_CHECK(p.beta == 0.0f,
                "gemm: an fp8 c cannot be accumulated into; expected beta 0, got {}", p.beta);
    if (p.c_amax.defined()) check_scalar_f32(p.c_amax, "c_amax", "an fp8 c");
  } else {
    HELIX_CHECK(!p.c_scale.defined() && !p.c_amax.defined(),
                "gemm: c_scale / c_amax apply only to an fp8 c, got c {}", dtype_name(tc));
  }
  if (p.bias.defined()) {
    HELIX_CHECK(p.bias.dtype() == DType::kBF16, "gemm: cuBLASLt fp8 GEMMs take a bf16 bias, got {}",
                p.bias.str());
  }
  HELIX_CHECK(p.epilogue != GemmEpilogue::kBiasGradA && p.epilogue != GemmEpilogue::kBiasGradB,
              "gemm: cuBLASLt has no bias-gradient epilogue for fp8; got {}",
              epilogue_name(p.epilogue));
  HELIX_CHECK(p.epilogue != GemmEpilogue::kBiasGelu || !dtype_is_fp8(tc),
              "gemm: kBiasGelu needs a bf16 or f32 c, got {}", dtype_name(tc));
}

// bf16 x bf16 or f32 x f32.
void validate_float(const GemmParams& p) {
  const DType ta = p.a.dtype(), tc = p.c.dtype();
  HELIX_CHECK(ta == p.b.dtype(),
              "gemm: expected both inputs fp8, both bf16 or both f32, got a {} and b {}",
              dtype_name(ta), dtype_name(p.b.dtype()));
  if (ta == DType::kF32) {
    HELIX_CHECK(tc == DType::kF32, "gemm: f32 inputs: expected c f32, got {}", dtype_name(tc));
  } else {
    HELIX_CHECK(tc == DType::kBF16 || tc == DType::kF32,
                "gemm: bf16 inputs: expected c bf16 or f32, got {}", dtype_name(tc));
  }
  HELIX_CHECK(!p.a_scale_inv.defined() && !p.b_scale_inv.defined() && !p.c_scale.defined() &&
                  !p.c_amax.defined(),
              "gemm: scale / amax tensors apply only to fp8 GEMMs (got {} inputs)", dtype_name(ta));
  if (p.bias.defined()) {
    HELIX_CHECK(p.bias.dtype() == tc,
                "gemm: cuBLASLt {} GEMMs take a bias of the output's dtype; expected bias {}, "
                "got {}",
                dtype_name(ta), dtype_name(tc), p.bias.str());
  }
  if (p.epilogue == GemmEpilogue::kBiasGradA || p.epilogue == GemmEpilogue::kBiasGradB) {
    HELIX_CHECK(tc == DType::kF32,
                "gemm: bias-gradient epilogues write the gradient in the output's dtype; expected "
                "c f32, got {}",
                dtype_name(tc));
    HELIX_CHECK(p.alpha == 1.0f, "gemm: bias-gradient epilogues need alpha 1, got {}", p.alpha);
  }
  if (p.epilogue == GemmEpilogue::kBiasGradA) {
    HELIX_CHECK(p.op_a == GemmOp::kTranspose,
                "gemm: kBiasGradA (cuBLASLt BGRADB) reduces a stored [K, M]; expected "
                "op_a=kTranspose, got kNone");
  }
  if (p.epilogue == GemmEpilogue::kBiasGradB) {
    HELIX_CHECK(p.op_b == GemmOp::kNone,
                "gemm: kBiasGradB (cuBLASLt BGRADA) reduces b stored [K, N]; expected op_b=kNone, "
                "got kTranspose");
  }
}

}  // namespace

GemmShape gemm_shape(const GemmParams& p) {
  check_matrix(p.a, "a");
  check_matrix(p.b, "b");
  const int64_t m = p.op_a == GemmOp::kNone ? p.a.dim(0) : p.a.dim(1);
  const int64_t ka = p.op_a == GemmOp::kNone ? p.a.dim(1) : p.a.dim(0);
  const int64_t kb = p.op_b == GemmOp::kNone ? p.b.dim(0) : p.b.dim(1);
  const int64_t n = p.op_b == GemmOp::kNone ? p.b.dim(1) : p.b.dim(0);
  HELIX_CHECK(ka == kb, "gemm: inner dimensions differ: op_a({}) {} gives K={}, op_b({}) {} K={}",
              op_name(p.op_a), p.a.shape().str(), ka, op_name(p.op_b), p.b.shape().str(), kb);
  return {m, n, ka};
}

void detail::validate_gemm(const GemmParams& p, GemmShape s) {
  check_matrix(p.c, "c");
  HELIX_CHECK(s.m > 0 && s.n > 0 && s.k > 0, "gemm: expected non-empty M, N, K, got {} {} {}", s.m,
              s.n, s.k);
  HELIX_CHECK(p.c.dim(0) == s.m && p.c.dim(1) == s.n, "gemm: expected c of shape [{}, {}], got {}",
              s.m, s.n, p.c.str());
  HELIX_CHECK(is_input_dtype(p.a.dtype()) && is_input_dtype(p.b.dtype()),
              "gemm: expected f32, bf16, e4m3 or e5m2 inputs, got a {} and b {}", p.a.str(),
              p.b.str());
  HELIX_CHECK(std::isfinite(p.alpha) && std::isfinite(p.beta),
              "gemm: expected finite alpha and beta, got {} and {}", p.alpha, p.beta);
  check_same_device(p);

  // Epilogue tensors: present exactly when the epilogue uses them.
  const GemmEpilogue e = p.epilogue;
  const bool wants_bias = e == GemmEpilogue::kBias || e == GemmEpilogue::kBiasGelu;
  const bool wants_grad = e == GemmEpilogue::kBiasGradA || e == GemmEpilogue::kBiasGradB;
  if (wants_bias) {
    check_vector(p.bias, "bias", s.n, epilogue_name(e).data());
  } else {
    HELIX_CHECK(!p.bias.defined(), "gemm: bias given but epilogue is {}", epilogue_name(e));
  }
  if (e == GemmEpilogue::kBiasGelu) {
    HELIX_CHECK(p.pre_gelu.defined(), "gemm: epilogue kBiasGelu requires pre_gelu [{}, {}]", s.m,
                s.n);
    HELIX_CHECK(p.pre_gelu.shape() == p.c.shape() && p.pre_gelu.dtype() == p.c.dtype() &&
                    p.pre_gelu.is_contiguous(),
                "gemm: expected pre_gelu {}[{}, {}] (the dtype of c), got {}",
                dtype_name(p.c.dtype()), s.m, s.n, p.pre_gelu.str());
    HELIX_CHECK(!p.pre_gelu.shares_storage(p.c), "gemm: pre_gelu and c must not share storage");
    HELIX_CHECK(p.beta == 0.0f, "gemm: kBiasGelu does not accumulate; expected beta 0, got {}",
                p.beta);
  } else {
    HELIX_CHECK(!p.pre_gelu.defined(), "gemm: pre_gelu given but epilogue is {}", epilogue_name(e));
  }
  if (wants_grad) {
    const int64_t len = e == GemmEpilogue::kBiasGradA ? s.m : s.n;
    check_vector(p.bias_grad, "bias_grad", len, epilogue_name(e).data());
    HELIX_CHECK(p.bias_grad.dtype() == DType::kF32, "gemm: expected bias_grad f32, got {}",
                p.bias_grad.str());
  } else {
    HELIX_CHECK(!p.bias_grad.defined(), "gemm: bias_grad given but epilogue is {}",
                epilogue_name(e));
  }

  if (dtype_is_fp8(p.a.dtype()) || dtype_is_fp8(p.b.dtype())) {
    validate_fp8(p, s);
  } else {
    validate_float(p);
  }
}

void gemm(const GemmParams& p, const Stream& stream) {
  const GemmShape s = gemm_shape(p);
  detail::validate_gemm(p, s);
  if (p.c.is_cpu()) {
    detail::gemm_cpu(p, s);
    return;
  }
#if HELIX_WITH_CUDA
  HELIX_CHECK(stream.device() == p.c.device(), "gemm: expected a stream on {}, got one on {}",
              p.c.device().str(), stream.device().str());
  detail::gemm_cuda(p, s, stream);
#else
  HELIX_FAIL("gemm: CUDA tensors given, but helix was built without CUDA");
#endif
}

}  // namespace helix
