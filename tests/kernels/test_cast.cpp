// Casts: the CPU references against convert.h's scalar conversions and hand-checked codes (edge
// values, saturation, NaN, the amax rules), and on a GPU the CUDA kernels bit-exact against the
// CPU references (fp8 codes, amax bits, bf16/f32) on odd, tiny, tile-edge and large shapes, with
// aligned (vectorized) and misaligned (scalar) tensors and poisoned outputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "core/convert.h"
#include "core/random.h"
#include "kernels/cast/cast.h"
#include "test_util.h"

namespace helix {
namespace {

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

Fp8Format fmt_of(DType t) { return t == DType::kE4M3 ? Fp8Format::kE4M3 : Fp8Format::kE5M2; }

std::vector<uint8_t> codes(const Tensor& t) {
  Tensor h = t.to(Device::cpu());
  std::vector<uint8_t> v(static_cast<size_t>(h.numel()));
  std::memcpy(v.data(), h.data_ptr(), v.size());
  return v;
}

uint32_t amax_bits(const Tensor& amax) { return float_bits(amax.to(Device::cpu()).to_floats()[0]); }

Tensor scalar(float v, Device d = Device::cpu()) {
  return Tensor::from_floats({v}, {1}, DType::kF32, d);
}

// Normal values times `spread`, with edge values sprinkled in: zeros, huge (saturating), tiny
// (flushing to zero or fp8 subnormals), infinities; NaN only when asked.
Tensor test_input(const Shape& shape, DType dtype, uint64_t seed, float spread, bool with_nan) {
  Tensor f = Tensor::empty(shape, DType::kF32);
  fill_normal(f, seed, 7, 0.0f, spread);
  std::vector<float> v = f.to_floats();
  const float edges[] = {0.0f,   -0.0f,  1e9f,   -1e9f,  kInf,     -kInf,
                         1e-12f, -3e-3f, 448.0f, 464.0f, 57344.0f, 61440.0f};
  for (size_t i = 0; i < v.size(); i += 97) v[i] = edges[(i / 97) % std::size(edges)];
  if (with_nan && !v.empty()) v[v.size() / 2] = kNaN;
  return Tensor::from_floats(v, shape, dtype);
}

// The same elements at an address 1 element past an aligned one: the kernels' scalar paths.
Tensor misaligned_copy(const Tensor& t, Device d) {
  Tensor flat = Tensor::empty({t.numel() + 1}, t.dtype(), d);
  Tensor view = flat.slice(1, t.numel() + 1).view(t.shape());
  view.copy_from(t);
  return view;
}

Tensor poisoned(const Shape& shape, DType dtype, Device d, bool misaligned) {
  Tensor t =
      misaligned
          ? Tensor::empty({shape.numel() + 1}, dtype, d).slice(1, shape.numel() + 1).view(shape)
          : Tensor::empty(shape, dtype, d);
  t.fill(std::nan(""));  // fp8 NaN code 0x7F, never produced for a finite input
  return t;
}

// ---- CPU reference -----------------------------------------------------------------------------

TEST(CastCpu, Fp8CodesOfKnownValues) {
  const std::vector<float> x = {1.0f, -0.5f, 300.0f, 1e6f, -kInf, 0.0f, 1.0f / 2048, 116.0f};
  Tensor in = Tensor::from_floats(x, {8}, DType::kF32);
  Tensor out = Tensor::empty({8}, DType::kE4M3);
  Tensor amax = scalar(0.0f);
  cast_fp8({in, out, scalar(2.0f), amax}, Stream::cpu());
  // 2, -1, 600 -> 448 (sat), 2e6 -> 448, -inf -> -448, 0, 2^-10 -> 0 (below half of 2^-9),
  // 232 -> halfway between 224 and 240: ties to even = 224.
  EXPECT_EQ(codes(out), (std::vector<uint8_t>{0x40, 0xB8, 0x7E, 0x7E, 0xFE, 0x00, 0x00, 0x76}));
  EXPECT_EQ(amax.to_floats()[0], kInf);
}

TEST(CastCpu, Fp8MatchesScalarConversion) {
  for (DType in_t : {DType::kF32, DType::kBF16}) {
    for (DType out_t : {DType::kE4M3, DType::kE5M2}) {
      SCOPED_TRACE(std::string(dtype_name(in_t)) + "->" + std::string(dtype_name(out_t)));
      Tensor in = test_input({37, 11}, in_t, 3, 50.0f, false);
      Tensor out = Tensor::empty({37, 11}, out_t);
      Tensor amax = scalar(0.0f);
      const float scale = 3.0f;
      cast_fp8({in, out, scalar(scale), amax}, Stream::cpu());
      const std::vector<float> v = in.to_floats();
      const std::vector<uint8_t> got = codes(out);
      float want_amax = 0.0f;
      for (size_t i = 0; i < v.size(); ++i) {
        ASSERT_EQ(got[i], float_to_fp8_bits(v[i] * scale, fmt_of(out_t))) << i << ": " << v[i];
        want_amax = std::max(want_amax, std::abs(v[i]));
      }
      EXPECT_EQ(amax.to_floats()[0], want_amax);
    }
  }
}

TEST(CastCpu, AmaxAccumulatesAndNaNWins) {
  Tensor in = Tensor::from_floats({-3.0f, 2.0f}, {2}, DType::kF32);
  Tensor out = Tensor::empty({2}, DType::kE4M3);
  Tensor amax = scalar(100.0f);
  cast_fp8({in, out, scalar(1.0f), amax}, Stream::cpu());
  EXPECT_EQ(amax.to_floats()[0], 100.0f);  // max(100, 3): accumulated, not overwritten
  amax = scalar(0.5f);
  cast_fp8({in, out, scalar(1.0f), amax}, Stream::cpu());
  EXPECT_EQ(amax.to_floats()[0], 3.0f);
  Tensor with_nan = Tensor::from_floats({-3.0f, kNaN}, {2}, DType::kF32);
  cast_fp8({with_nan, out, scalar(1.0f), amax}, Stream::cpu());
  EXPECT_TRUE(std::isnan(amax.to_floats()[0]));
  EXPECT_EQ(codes(out)[1], 0x7F);
}

TEST(CastCpu, CastTransposeIsCastPlusTranspose) {
  for (DType out_t : {DType::kE4M3, DType::kE5M2}) {
    const int64_t m = 7, n = 13;
    Tensor in = test_input({m, n}, DType::kBF16, 5, 20.0f, false);
    Tensor out = Tensor::empty({m, n}, out_t), out_t_ = Tensor::empty({n, m}, out_t);
    Tensor plain = Tensor::empty({m, n}, out_t);
    Tensor amax1 = scalar(0.0f), amax2 = scalar(0.0f);
    cast_transpose_fp8({in, out, out_t_, scalar(0.75f), amax1}, Stream::cpu());
    cast_fp8({in, plain, scalar(0.75f), amax2}, Stream::cpu());
    const std::vector<uint8_t> o = codes(out), t = codes(out_t_), p = codes(plain);
    EXPECT_EQ(o, p);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) EXPECT_EQ(t[j * m + i], o[i * n + j]) << i << "," << j;
    EXPECT_EQ(amax1.to_floats()[0], amax2.to_floats()[0]);
  }
}

TEST(CastCpu, Bf16F32) {
  const std::vector<float> x = {
      1.0f, bits_float(0x3F808000u), bits_float(0x3F818000u), -kInf, kNaN, 1e-40f};
  Tensor f = Tensor::from_vector(x, {6});
  Tensor b = Tensor::empty({6}, DType::kBF16);
  cast({f, b}, Stream::cpu());
  const std::vector<uint16_t> want = {0x3F80, 0x3F80, 0x3F82,
                                      0xFF80, 0x7FFF, float_to_bf16_bits(1e-40f)};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(b.data<bf16_t>()[i].bits, want[i]) << i;
  Tensor back = Tensor::empty({6}, DType::kF32);
  cast({b, back}, Stream::cpu());
  for (int i = 0; i < 6; ++i)
    EXPECT_EQ(float_bits(back.data<float>()[i]), uint32_t(want[i]) << 16) << i;
}

TEST(CastValidation, RejectsBadArguments) {
  Tensor in = Tensor::empty({4, 8}, DType::kF32);
  Tensor out = Tensor::empty({4, 8}, DType::kE4M3);
  EXPECT_THROW(cast_fp8({in, Tensor::empty({4, 8}, DType::kBF16), scalar(1.0f), {}}, Stream::cpu()),
               Error);
  EXPECT_THROW(cast_fp8({in, Tensor::empty({4, 7}, DType::kE4M3), scalar(1.0f), {}}, Stream::cpu()),
               Error);
  EXPECT_THROW(cast_fp8({in, out, Tensor(), {}}, Stream::cpu()), Error);
  EXPECT_THROW(cast_transpose_fp8({in, out, Tensor::empty({4, 8}, DType::kE4M3), scalar(1.0f), {}},
                                  Stream::cpu()),
               Error);  // out_t must be [8, 4]
  EXPECT_THROW(cast_transpose_fp8({in, out, Tensor::empty({8, 4}, DType::kE5M2), scalar(1.0f), {}},
                                  Stream::cpu()),
               Error);  // out_t must match out's dtype
  EXPECT_THROW(cast({in, Tensor::empty({4, 8}, DType::kF32)}, Stream::cpu()), Error);
}

// ---- CUDA against the CPU reference (bit-exact) ------------------------------------------------

const std::vector<Shape> kShapes = {{71, 229}, {29, 541},    {1, 1},      {64, 64},
                                    {68, 72},  {1000, 1000}, {2048, 1280}};

TEST(CastCuda, Fp8BitExactWithCpu) {
  HELIX_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  const Stream stream = Stream::cuda_default(0);
  uint64_t seed = 100;
  for (const Shape& shape : kShapes)
    for (DType in_t : {DType::kF32, DType::kBF16})
      for (DType out_t : {DType::kE4M3, DType::kE5M2})
        for (bool misaligned : {false, true}) {
          SCOPED_TRACE(shape.str() + " " + std::string(dtype_name(in_t)) + "->" +
                       std::string(dtype_name(out_t)) + (misaligned ? " misaligned" : ""));
          const bool with_nan = seed % 5 == 0;
          Tensor in = test_input(shape, in_t, ++seed, 200.0f, with_nan);
          Tensor out = Tensor::empty(shape, out_t);
          Tensor amax = scalar(0.25f);
          cast_fp8({in, out, scalar(1.5f), amax}, Stream::cpu());

          Tensor d_in = misaligned ? misaligned_copy(in, gpu) : in.to(gpu);
          Tensor d_out = poisoned(shape, out_t, gpu, misaligned);
          Tensor d_amax = scalar(0.25f, gpu);
          cast_fp8({d_in, d_out, scalar(1.5f, gpu), d_amax}, stream);
          EXPECT_EQ(codes(d_out), codes(out));
          EXPECT_EQ(amax_bits(d_amax), amax_bits(amax));
        }
}

TEST(CastCuda, CastTransposeBitExactWithCpu) {
  HELIX_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  const Stream stream = Stream::cuda_default(0);
  uint64_t seed = 200;
  for (const Shape& shape : kShapes)
    for (DType in_t : {DType::kF32, DType::kBF16})
      for (DType out_t : {DType::kE4M3, DType::kE5M2})
        for (bool misaligned : {false, true}) {
          SCOPED_TRACE(shape.str() + " " + std::string(dtype_name(in_t)) + "->" +
                       std::string(dtype_name(out_t)) + (misaligned ? " misaligned" : ""));
          const Shape shape_t{shape[1], shape[0]};
          Tensor in = test_input(shape, in_t, ++seed, 200.0f, seed % 7 == 0);
          Tensor out = Tensor::empty(shape, out_t), out_tr = Tensor::empty(shape_t, out_t);
          Tensor amax = scalar(0.0f);
          cast_transpose_fp8({in, out, out_tr, scalar(0.5f), amax}, Stream::cpu());

          Tensor d_in = misaligned ? misaligned_copy(in, gpu) : in.to(gpu);
          Tensor d_out = poisoned(shape, out_t, gpu, false);
          Tensor d_out_tr = poisoned(shape_t, out_t, gpu, misaligned);
          Tensor d_amax = scalar(0.0f, gpu);
          cast_transpose_fp8({d_in, d_out, d_out_tr, scalar(0.5f, gpu), d_amax}, stream);
          EXPECT_EQ(codes(d_out), codes(out));
          EXPECT_EQ(codes(d_out_tr), codes(out_tr));
          EXPECT_EQ(amax_bits(d_amax), amax_bits(amax));
        }
}

TEST(CastCuda, AmaxAccumulatesAcrossCalls) {
  HELIX_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  const Stream stream = Stream::cuda_default(0);
  Tensor a = Tensor::empty({512, 256}, DType::kBF16), b = Tensor::empty({512, 256}, DType::kBF16);
  fill_normal(a, 11, 0, 0.0f, 5.0f);  // the larger amax comes first: the second call must keep it
  fill_normal(b, 12, 0, 0.0f, 1.0f);
  float want = 0.0f;
  for (float v : a.to_floats()) want = std::max(want, std::abs(v));
  Tensor d_amax = scalar(0.0f, gpu);
  for (const Tensor& x : {a, b}) {
    Tensor d_out = Tensor::empty(x.shape(), DType::kE4M3, gpu);
    cast_fp8({x.to(gpu), d_out, scalar(1.0f, gpu), d_amax}, stream);
    EXPECT_EQ(d_amax.to(Device::cpu()).to_floats()[0], want);
  }
}

TEST(CastCuda, Bf16F32BitExactWithCpu) {
  HELIX_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  const Stream stream = Stream::cuda_default(0);
  uint64_t seed = 300;
  for (const Shape& shape : kShapes)
    for (DType in_t : {DType::kF32, DType::kBF16})
      for (bool misaligned : {false, true}) {
        SCOPED_TRACE(shape.str() + " " + std::string(dtype_name(in_t)) +
                     (misaligned ? " misaligned" : ""));
        const DType out_t = in_t == DType::kF32 ? DType::kBF16 : DType::kF32;
        Tensor in = test_input(shape, in_t, ++seed, 3.0f, true);
        Tensor out = Tensor::empty(shape, out_t);
        cast({in, out}, Stream::cpu());
        Tensor d_in = misaligned ? misaligned_copy(in, gpu) : in.to(gpu);
        Tensor d_out = poisoned(shape, out_t, gpu, misaligned);
        cast({d_in, d_out}, stream);
        const Tensor got = d_out.to(Device::cpu());
        ASSERT_EQ(got.nbytes(), out.nbytes());
        EXPECT_EQ(std::memcmp(got.data_ptr(), out.data_ptr(), out.nbytes()), 0);
      }
}

}  // namespace
}  // namespace helix
