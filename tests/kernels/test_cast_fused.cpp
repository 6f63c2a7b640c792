// The cast-transpose's fused neighbours (GELU forward, GELU backward, bias gradient): on the CPU
// the fused op equals the unfused composition it replaces (gelu_fwd / gelu_bwd into the input's
// dtype, then cast_transpose_fp8) bit for bit, and dbias equals f64 column sums; on a GPU the fused
// kernels equal the GPU's own unfused composition bit for bit (tiled and unaligned paths), dbias
// is bitwise reproducible and matches the CPU within f32 summation error. Without out_t (a
// forward that no backward follows) out, amax and dbias are bitwise those of the call with it.
// Bad arguments throw.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/random.h"
#include "kernels/cast/cast.h"
#include "kernels/gelu/gelu.h"
#include "test_util.h"

namespace helix {
namespace {

std::vector<uint8_t> codes(const Tensor& t) {
  Tensor h = t.to(Device::cpu());
  std::vector<uint8_t> v(static_cast<size_t>(h.numel()));
  std::memcpy(v.data(), h.data_ptr(), v.size());
  return v;
}

Tensor scalar(float v, Device d = Device::cpu()) { return Tensor::from_floats({v}, {1}, DType::kF32, d); }

Tensor normal(const Shape& shape, DType dtype, uint64_t seed, float stddev, Device d = Device::cpu()) {
  Tensor f = Tensor::empty(shape, DType::kF32);
  fill_normal(f, seed, 3, 0.0f, stddev);
  return Tensor::from_floats(f.to_floats(), shape, dtype).to(d);
}

// A view at an address one element past an aligned one: the unaligned kernel path.
Tensor misaligned_copy(const Tensor& t) {
  Tensor flat = Tensor::empty({t.numel() + 1}, t.dtype(), t.device());
  Tensor view = flat.slice(1, t.numel() + 1).view(t.shape());
  view.copy_from(t);
  return view;
}

struct Cast {
  Tensor out, out_t, amax, dbias;
  Tensor v;  // unfused(): the activation as stored in in's dtype
};

// The fused call on in (and pre) with scale 0.5, amax from 0, dbias from `dbias0` when given;
// out_t only with `transpose`.
Cast fused(const Tensor& in, const Tensor& pre, CastActivation act, DType fp8, const Tensor& dbias0,
           const Stream& stream, bool transpose = true) {
  const Device d = in.device();
  const int64_t m = in.dim(0), n = in.dim(1);
  Cast c{Tensor::empty({m, n}, fp8, d), transpose ? Tensor::empty({n, m}, fp8, d) : Tensor(), scalar(0.f, d),
         dbias0.defined() ? dbias0.to(d) : Tensor()};
  cast_transpose_fp8({.in = in,
                      .out = c.out,
                      .out_t = c.out_t,
                      .scale = scalar(0.5f, d),
                      .amax = c.amax,
                      .act = act,
                      .pre = pre,
                      .dbias = c.dbias},
                     stream);
  return c;
}

// What the fused op replaces: the activation stored in in's dtype, then the plain cast-transpose.
Cast unfused(const Tensor& in, const Tensor& pre, CastActivation act, DType fp8, const Stream& stream) {
  Tensor v = in;
  if (act == CastActivation::kGelu) {
    v = Tensor::empty(in.shape(), in.dtype(), in.device());
    gelu_fwd({.x = in, .y = v}, stream);
  } else if (act == CastActivation::kGeluGrad) {
    v = Tensor::empty(in.shape(), in.dtype(), in.device());
    gelu_bwd({.x = pre, .dy = in, .dx = v, .accumulate_dx = false}, stream);
  }
  Cast c = fused(v, Tensor(), CastActivation::kNone, fp8, Tensor(), stream);
  c.v = v;
  return c;
}

// The call without out_t gives bitwise the same out, amax and dbias as `with_t`.
void expect_same_without_transpose(const Cast& with_t, const Tensor& in, const Tensor& pre, CastActivation act,
                                   DType fp8, const Tensor& dbias0, const Stream& stream) {
  const Cast c = fused(in, pre, act, fp8, dbias0, stream, /*transpose=*/false);
  EXPECT_EQ(codes(c.out), codes(with_t.out));
  EXPECT_EQ(c.amax.to(Device::cpu()).to_floats(), with_t.amax.to(Device::cpu()).to_floats());
  EXPECT_EQ(c.dbias.to(Device::cpu()).to_floats(), with_t.dbias.to(Device::cpu()).to_floats());
}

// f64 column sums of v [M, N] plus dbias0 [N].
std::vector<double> column_sums(const Tensor& v, const Tensor& dbias0) {
  const int64_t m = v.dim(0), n = v.dim(1);
  const std::vector<float> x = v.to(Device::cpu()).to_floats(), b = dbias0.to_floats();
  std::vector<double> s(b.begin(), b.end());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) s[j] += x[i * n + j];
  return s;
}

void expect_sums_close(const Tensor& dbias, const std::vector<double>& want, int64_t rows) {
  const std::vector<float> got = dbias.to(Device::cpu()).to_floats();
  ASSERT_EQ(got.size(), want.size());
  for (size_t j = 0; j < got.size(); ++j)  // f32 sums of `rows` values of size ~1
    EXPECT_NEAR(got[j], want[j], 2e-6 * double(rows) + 1e-5) << "column " << j;
}

const char* act_name(CastActivation a) {
  return a == CastActivation::kNone ? "none" : a == CastActivation::kGelu ? "gelu" : "gelu_grad";
}

TEST(CastFusedCpu, EqualsTheUnfusedCompositionAndColumnSums) {
  for (DType in_t : {DType::kF32, DType::kBF16})
    for (DType fp8 : {DType::kE4M3, DType::kE5M2})
      for (CastActivation act : {CastActivation::kNone, CastActivation::kGelu, CastActivation::kGeluGrad}) {
        SCOPED_TRACE(std::string(dtype_name(in_t)) + "->" + std::string(dtype_name(fp8)) + " " + act_name(act));
        const int64_t m = 37, n = 23;
        Tensor in = normal({m, n}, in_t, 1, 3.f);
        Tensor pre = act == CastActivation::kGeluGrad ? normal({m, n}, in_t, 2, 2.f) : Tensor();
        Tensor dbias0 = normal({n}, DType::kF32, 3, 1.f);
        const Cast got = fused(in, pre, act, fp8, dbias0, Stream::cpu());
        const Cast want = unfused(in, pre, act, fp8, Stream::cpu());
        EXPECT_EQ(codes(got.out), codes(want.out));
        EXPECT_EQ(codes(got.out_t), codes(want.out_t));
        EXPECT_EQ(got.amax.to_floats()[0], want.amax.to_floats()[0]);
        expect_sums_close(got.dbias, column_sums(want.v, dbias0), m);
        expect_same_without_transpose(got, in, pre, act, fp8, dbias0, Stream::cpu());
      }
}

TEST(CastFusedCpu, RefusesInconsistentArguments) {
  Tensor in = normal({8, 16}, DType::kBF16, 1, 1.f);
  Tensor out = Tensor::empty({8, 16}, DType::kE4M3), out_t = Tensor::empty({16, 8}, DType::kE4M3);
  auto call = [&](CastActivation act, const Tensor& pre, const Tensor& dbias) {
    cast_transpose_fp8({.in = in, .out = out, .out_t = out_t, .scale = scalar(1.f), .act = act, .pre = pre,
                        .dbias = dbias},
                       Stream::cpu());
  };
  EXPECT_THROW(call(CastActivation::kGeluGrad, Tensor(), Tensor()), Error);                          // no pre
  EXPECT_THROW(call(CastActivation::kGeluGrad, normal({8, 16}, DType::kF32, 2, 1.f), Tensor()), Error);  // dtype
  EXPECT_THROW(call(CastActivation::kGeluGrad, normal({16, 8}, DType::kBF16, 2, 1.f), Tensor()), Error);  // shape
  EXPECT_THROW(call(CastActivation::kGelu, in, Tensor()), Error);                                    // pre unused
  EXPECT_THROW(call(CastActivation::kNone, Tensor(), Tensor::zeros({8}, DType::kF32)), Error);       // dbias [M]
  EXPECT_THROW(call(CastActivation::kNone, Tensor(), Tensor::zeros({16}, DType::kBF16)), Error);     // dbias bf16
  EXPECT_NO_THROW(call(CastActivation::kGeluGrad, in, Tensor::zeros({16}, DType::kF32)));
}

TEST(CastFusedCuda, EqualsTheGpuUnfusedCompositionBitExact) {
  HELIX_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  const Stream stream = Stream::cuda_default(0);
  const std::vector<Shape> shapes = {{64, 64}, {2048, 1280}, {4096, 320}, {71, 229}, {16, 5120}};
  uint64_t seed = 10;
  for (const Shape& shape : shapes)
    for (DType in_t : {DType::kF32, DType::kBF16})
      for (DType fp8 : {DType::kE4M3, DType::kE5M2})
        for (CastActivation act : {CastActivation::kNone, CastActivation::kGelu, CastActivation::kGeluGrad})
          for (bool misaligned : {false, true}) {
            SCOPED_TRACE(shape.str() + " " + std::string(dtype_name(in_t)) + "->" + std::string(dtype_name(fp8)) + " " + act_name(act) +
                         (misaligned ? " misaligned" : ""));
            Tensor in = normal(shape, in_t, ++seed, 3.f, gpu);
            Tensor pre = act == CastActivation::kGeluGrad ? normal(shape, in_t, ++seed, 2.f, gpu) : Tensor();
            if (misaligned) {
              in = misaligned_copy(in);
              if (pre.defined()) pre = misaligned_copy(pre);
            }
            Tensor dbias0 = normal({shape[1]}, DType::kF32, ++seed, 1.f);
            const Cast got = fused(in, pre, act, fp8, dbias0, stream);
            const Cast want = unfused(in, pre, act, fp8, stream);
            EXPECT_EQ(codes(got.out), codes(want.out));
            EXPECT_EQ(codes(got.out_t), codes(want.out_t));
            EXPECT_EQ(got.amax.to(Device::cpu()).to_floats()[0], want.amax.to(Device::cpu()).to_floats()[0]);
            expect_sums_close(got.dbias, column_sums(want.v, dbias0), shape[0]);
            const Cast again = fused(in, pre, act, fp8, dbias0, stream);
            EXPECT_EQ(again.dbias.to(Device::cpu()).to_floats(), got.dbias.to(Device::cpu()).to_floats());
            expect_same_without_transpose(got, in, pre, act, fp8, dbias0, stream);
          }
}

}  // namespace
}  // namespace helix
