// AdamW CUDA kernel: multi-tensor apply over the list's device table, one block per chunk. Every
// element goes through the same f32 operations as the CPU reference (adamw_cpu.cpp) with explicit
// round-to-nearest intrinsics, so nothing is contracted into an fma and results match bitwise.
#include <cuda_runtime.h>

#include "core/cuda_check.h"
#include "kernels/adamw/adamw.h"

namespace helix {
namespace {

constexpr int kThreads = 256;

struct Element {
  float p, g, m, v;
};

// One element's update (see adamw.h); p, m, v are updated in place, g is the scaled gradient.
__device__ __forceinline__ void update(Element& e, const detail::AdamWScalars& k, bool decay) {
  if (decay) e.p = __fmul_rn(e.p, k.decay);
  const float diff = __fsub_rn(e.g, e.m);
  e.m = k.lerp_small ? __fmaf_rn(k.lerp_w, diff, e.m) : __fmaf_rn(k.lerp_w_minus1, diff, e.g);
  e.v = __fadd_rn(__fmul_rn(e.v, k.beta2), __fmul_rn(__fmul_rn(k.one_minus_beta2, e.g), e.g));
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(e.v), k.bc2_sqrt), k.eps);
  e.p = __fadd_rn(e.p, __fdiv_rn(__fmul_rn(k.neg_step_size, e.m), denom));
}

__device__ __forceinline__ bool flag_set(const void* flag, int flag_is_f32) {
  if (flag == nullptr) return false;
  return flag_is_f32 ? *static_cast<const float*>(flag) != 0.0f
                     : *static_cast<const int32_t*>(flag) != 0;
}

// Grid: one block of kThreads threads per chunk of the table (num_chunks blocks). A block updates
// elements [begin, min(begin + chunk_size, numel)) of its tensor: float4 / 4 x bf16 accesses when
// the tensor's pointers allow (chunk starts are multiples of 4), scalar accesses for the rest.
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const detail::AdamWTensorDesc* descs, const MultiTensorChunk* chunks,
                 int64_t chunk_size, detail::AdamWScalars k, const float* scale_tensor,
                 const void* flag, int flag_is_f32) {
  if (flag_set(flag, flag_is_f32)) return;  // non-finite step: no state changes at all
  const MultiTensorChunk c = chunks[blockIdx.x];
  const detail::AdamWTensorDesc d = descs[c.tensor];
  const int64_t end = min(c.begin + chunk_size, d.numel);
  const float gs = scale_tensor ? __fmul_rn(k.grad_scale, *scale_tensor) : k.grad_scale;
  const bool decay = d.apply_weight_decay != 0;
  int64_t scalar_begin = c.begin;
  if (d.vec4) {
    const int64_t groups = (end - c.begin) / 4;
    for (int64_t i = threadIdx.x; i < groups; i += kThreads) {
      const int64_t at = c.begin + 4 * i;
      float4 p = *reinterpret_cast<const float4*>(d.param + at);
      const float4 g = *reinterpret_cast<const float4*>(d.grad + at);
      float4 m = *reinterpret_cast<const float4*>(d.exp_avg + at);
      float4 v = *reinterpret_cast<const float4*>(d.exp_avg_sq + at);
      Element e[4] = {{p.x, __fmul_rn(g.x, gs), m.x, v.x},
                      {p.y, __fmul_rn(g.y, gs), m.y, v.y},
                      {p.z, __fmul_rn(g.z, gs), m.z, v.z},
                      {p.w, __fmul_rn(g.w, gs), m.w, v.w}};
#pragma unroll
      for (int j = 0; j < 4; ++j) update(e[j], k, decay);
      p = make_float4(e[0].p, e[1].p, e[2].p, e[3].p);
      m = make_float4(e[0].m, e[1].m, e[2].m, e[3].m);
      v = make_float4(e[0].v, e[1].v, e[2].v, e[3].v);
      *reinterpret_cast<float4*>(d.param + at) = p;
      *reinterpret_cast<float4*>(d.exp_avg + at) = m;
      *reinterpret_cast<float4*>(d.exp_avg_sq + at) = v;
      if (d.param_bf16 != nullptr) {
        ushort4 b;
        b.x = bf16_t::from_float(e[0].p).bits;
        b.y = bf16_t::from_float(e[1].p).bits;
        b.z = bf16_t::from_float(e[2].p).bits;
        b.w = bf16_t::from_float(e[3].p).bits;
        *reinterpret_cast<ushort4*>(d.param_bf16 + at) = b;
      }
    }
    scalar_begin = c.begin + 4 * groups;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    Element e{d.param[i], __fmul_rn(d.grad[i], gs), d.exp_avg[i], d.exp_avg_sq[i]};
    update(e, k, decay);
    d.param[i] = e.p;
    d.exp_avg[i] = e.m;
    d.exp_avg_sq[i] = e.v;
    if (d.param_bf16 != nullptr) d.param_bf16[i] = bf16_t::from_float(e.p);
  }
}

}  // namespace

void detail::adamw_step_cuda(const AdamWParams& p, const AdamWScalars& k, const Stream& s) {
  const MultiTensorTable& table = p.tensors->table();
  HELIX_CHECK(table.defined(), "adamw_step: expected a device table for the CUDA tensor list");
  if (table.num_chunks() == 0) return;
  const float* scale = p.grad_scale_tensor.defined() ? p.grad_scale_tensor.data<float>() : nullptr;
  const void* flag = p.nonfinite_flag.defined() ? p.nonfinite_flag.data_ptr() : nullptr;
  const int flag_is_f32 =
      p.nonfinite_flag.defined() && p.nonfinite_flag.dtype() == DType::kF32 ? 1 : 0;
  adamw_kernel<<<static_cast<unsigned>(table.num_chunks()), kThreads, 0,
                 static_cast<cudaStream_t>(s.handle())>>>(
      static_cast<const AdamWTensorDesc*>(table.descs()), table.chunks(), table.chunk_size(), k,
      scale, flag, flag_is_f32);
  HELIX_LAUNCH_CHECK();
}

}  // namespace helix
