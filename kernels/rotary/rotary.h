#pragma once
// Rotary position embedding with the numerics of Hugging Face's EsmRotaryEmbedding: rotate_half
// pairs (i, i + D/2) (not interleaved), inv_freq[i] = 1 / base^(2i/D) in fp32, angle =
// fp32(position * inv_freq[i]), cos/sin of that fp32 angle, x*cos + rotate_half(x)*sin in fp32 with
// one rounding to the storage type. Design: IN PLACE on q and k [T, heads, D] (the rotation needs
// no saved input for backward, so no copies); positions either restart at each cu_seqlens boundary
// or come from an explicit int32 tensor (context parallelism). Backward rotates dq, dk back in
// place. The per-element arithmetic lives in rotary_math.h; the attention layer uses it fused into
// qkv_split / qkv_join_grad (kernels/qkv/qkv.h, QkvRotary), bit-identical to these ops.
#include <vector>

#include "core/device.h"
#include "core/tensor.h"

namespace helix {

// Where token positions come from: exactly one of the two must be defined.
struct RotaryPositions {
  // [b+1] i32 with 0 = cu[0] <= cu[1] <= ... <= cu[b] <= T: position = token index minus the
  // start of its sequence; tokens at or past cu[b] (padding) count from cu[b]. The values are
  // checked on the CPU only (reading them from a CUDA tensor would synchronise the stream).
  Tensor cu_seqlens;
  Tensor positions;  // [T] i32 in [0, 2^24): explicit positions (e.g. global ones under CP)
};

struct RotaryFwdParams {
  Tensor q;  // [T, Hq, D] f32 or bf16, rotated in place; optional (at least one of q, k)
  Tensor k;  // [T, Hk, D] q's dtype and D, rotated in place; optional
  RotaryPositions pos;
  float base = 10000.f;
};

struct RotaryBwdParams {
  Tensor dq;  // [T, Hq, D] f32 or bf16: gradient w.r.t. the rotated q, turned in place into the
              // gradient w.r.t. q (the inverse rotation); optional (at least one of dq, dk)
  Tensor dk;  // [T, Hk, D] dq's dtype and D, likewise; optional
  RotaryPositions pos;
  float base = 10000.f;
};

// Dispatch on the tensors' device; CUDA work is ordered on `stream`. D must be even and <= 256.
void rotary_fwd(const RotaryFwdParams& p, const Stream& stream);
void rotary_bwd(const RotaryBwdParams& p, const Stream& stream);

// inv_freq [D/2] as Hugging Face computes it in fp32: 1 / fp32(base ^ fp32(2i / D)).
std::vector<float> rotary_inv_freq(int64_t head_dim, float base = 10000.f);

namespace detail {
// One entry point per backend for both directions: sin_sign = +1 rotates (forward), -1 rotates
// back.
struct RotaryApply {
  Tensor a;  // [T, Ha, D]; optional
  Tensor b;  // [T, Hb, D]; optional
  RotaryPositions pos;
  float base = 10000.f;
  float sin_sign = 1.f;
  const char* op = "rotary_fwd";  // names for messages
  const char* a_name = "q";
  const char* b_name = "k";
};
// Every check of rotary_fwd/bwd (shapes, dtypes, devices, D even and <= 256, exactly one position
// source, base); also used by the rotary fused into qkv_split / qkv_join_grad.
void rotary_validate(const RotaryApply& p);
// Position of token t on the CPU (rotary::position_of), checked to lie in [0, 2^24).
int64_t rotary_cpu_position(const char* op, const int32_t* positions, const int32_t* cu_seqlens,
                            int64_t num_seqs, int64_t t);
void rotary_apply_cpu(const RotaryApply& p);
#if HELIX_WITH_CUDA
void rotary_apply_cuda(const RotaryApply& p, const Stream& stream);
#endif
}  // namespace detail

}  // namespace helix
