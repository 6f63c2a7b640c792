// Public cast functions: validation shared by both devices, then dispatch to the CPU reference
// (cast_cpu.cpp) or the CUDA kernels (cast.cu).
#include "kernels/cast/cast.h"

#include "core/error.h"

namespace helix {
namespace {

void check_in_out(const Tensor& in, const Tensor& out, const char* op) {
  HELIX_CHECK(in.defined() && out.defined(), "{}: expected in and out to be defined", op);
  HELIX_CHECK(in.dtype() == DType::kF32 || in.dtype() == DType::kBF16,
              "{}: expected in f32 or bf16, got {}", op, in.str());
  HELIX_CHECK(in.is_contiguous() && out.is_contiguous(),
              "{}: expected contiguous tensors, got {} and {}", op, in.str(), out.str());
  HELIX_CHECK(in.device() == out.device(), "{}: expected in and out on one device, got {} and {}",
              op, in.str(), out.str());
}

void check_scalar(const Tensor& t, const Tensor& in, const char* name, const char* op) {
  HELIX_CHECK(t.dtype() == DType::kF32 && t.numel() == 1, "{}: expected {} f32 [1], got {}", op,
              name, t.str());
  HELIX_CHECK(t.device() == in.device(), "{}: expected {} on {}, got {}", op, name,
              in.device().str(), t.str());
}

void check_scale_amax(const Tensor& scale, const Tensor& amax, const Tensor& in, const char* op) {
  HELIX_CHECK(scale.defined(), "{}: expected scale (f32 [1])", op);
  check_scalar(scale, in, "scale", op);
  if (amax.defined()) check_scalar(amax, in, "amax", op);
}

[[maybe_unused]] void check_stream(const Tensor& t, const Stream& stream, const char* op) {
  HELIX_CHECK(stream.device() == t.device(), "{}: expected a stream on {}, got one on {}", op,
              t.device().str(), stream.device().str());
}

}  // namespace

void cast_fp8(const CastFp8Params& p, const Stream& stream) {
  check_in_out(p.in, p.out, "cast_fp8");
  HELIX_CHECK(dtype_is_fp8(p.out.dtype()), "cast_fp8: expected out e4m3 or e5m2, got {}",
              p.out.str());
  HELIX_CHECK(p.out.shape() == p.in.shape(), "cast_fp8: expected out of shape {}, got {}",
              p.in.shape().str(), p.out.str());
  check_scale_amax(p.scale, p.amax, p.in, "cast_fp8");
  if (p.in.is_cpu()) return detail::cast_fp8_cpu(p);
#if HELIX_WITH_CUDA
  check_stream(p.in, stream, "cast_fp8");
  detail::cast_fp8_cuda(p, stream);
#else
  HELIX_FAIL("cast_fp8: CUDA tensors given, but helix was built without CUDA");
#endif
}

void cast_transpose_fp8(const CastTransposeFp8Params& p, const Stream& stream) {
  const char* op = "cast_transpose_fp8";
  check_in_out(p.in, p.out, op);
  HELIX_CHECK(p.in.ndim() == 2, "{}: expected in 2-D [M, N], got {}", op, p.in.str());
  const int64_t m = p.in.dim(0), n = p.in.dim(1);
  HELIX_CHECK(dtype_is_fp8(p.out.dtype()), "{}: expected out e4m3 or e5m2, got {}", op,
              p.out.str());
  HELIX_CHECK(p.out.shape() == p.in.shape(), "{}: expected out of shape {}, got {}", op,
              p.in.shape().str(), p.out.str());
  HELIX_CHECK(!p.out_t.defined() || (p.out_t.dtype() == p.out.dtype() && p.out_t.ndim() == 2 && p.out_t.dim(0) == n &&
                  p.out_t.dim(1) == m && p.out_t.is_contiguous() &&
                  p.out_t.device() == p.in.device()),
              "{}: expected out_t {}[{}, {}] on {}, got {}", op, dtype_name(p.out.dtype()), n, m,
              p.in.device().str(), p.out_t.str());
  check_scale_amax(p.scale, p.amax, p.in, op);
  if (p.act == CastActivation::kGeluGrad) {
    HELIX_CHECK(p.pre.defined() && p.pre.dtype() == p.in.dtype() && p.pre.shape() == p.in.shape() &&
                    p.pre.is_contiguous() && p.pre.device() == p.in.device(),
                "{}: expected pre {}{} on {} (the GELU input of kGeluGrad), got {}", op, dtype_name(p.in.dtype()),
                p.in.shape().str(), p.in.device().str(), p.pre.str());
  } else {
    HELIX_CHECK(!p.pre.defined(), "{}: expected no pre without kGeluGrad, got {}", op, p.pre.str());
  }
  if (p.dbias.defined()) {
    HELIX_CHECK(p.dbias.dtype() == DType::kF32 && p.dbias.ndim() == 1 && p.dbias.dim(0) == n &&
                    p.dbias.is_contiguous() && p.dbias.device() == p.in.device(),
                "{}: expected dbias f32[{}] on {}, got {}", op, n, p.in.device().str(), p.dbias.str());
  }
  if (p.in.is_cpu()) return detail::cast_transpose_fp8_cpu(p);
#if HELIX_WITH_CUDA
  check_stream(p.in, stream, op);
  detail::cast_transpose_fp8_cuda(p, stream);
#else
  HELIX_FAIL("cast_transpose_fp8: CUDA tensors given, but helix was built without CUDA");
#endif
}

void cast(const CastParams& p, const Stream& stream) {
  check_in_out(p.in, p.out, "cast");
  const bool ok = (p.in.dtype() == DType::kF32 && p.out.dtype() == DType::kBF16) ||
                  (p.in.dtype() == DType::kBF16 && p.out.dtype() == DType::kF32);
  HELIX_CHECK(ok, "cast: expected f32 -> bf16 or bf16 -> f32, got {} -> {}", p.in.str(),
              p.out.str());
  HELIX_CHECK(p.out.shape() == p.in.shape(), "cast: expected out of shape {}, got {}",
              p.in.shape().str(), p.out.str());
  if (p.in.is_cpu()) return detail::cast_cpu(p);
#if HELIX_WITH_CUDA
  check_stream(p.in, stream, "cast");
  detail::cast_cuda(p, stream);
#else
  HELIX_FAIL("cast: CUDA tensors given, but helix was built without CUDA");
#endif
}

}  // namespace helix
