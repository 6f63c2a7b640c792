// JSON parsing and safetensors read/write: round trips, and every kind of damaged file refused with a
// message naming the file (and tensor), never a crash.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/json.h"
#include "core/random.h"
#include "core/safetensors.h"

namespace helix {
namespace {

namespace fs = std::filesystem;

std::string tmp_path(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / fmt::format("helix_test_{}", ::getpid());
  fs::create_directories(d);
  return (d / name).string();
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Json, ParseAndDump) {
  const Json j = Json::parse(R"({"a": [1, -2, 3.5e2, true, null], "b": {"c": "x\"y\u00e9"}, "big": 9007199254740993})");
  EXPECT_EQ(j.at("a").as_array()[1].as_int(), -2);
  EXPECT_DOUBLE_EQ(j.at("a").as_array()[2].as_double(), 350.0);
  EXPECT_EQ(j.at("b").at("c").as_string(), "x\"y\xc3\xa9");
  EXPECT_EQ(j.at("big").as_int(), 9007199254740993LL);  // exact beyond 2^53
  EXPECT_EQ(Json::parse(j.dump()).dump(), j.dump());
  EXPECT_EQ(Json::parse(j.dump(2)).dump(), j.dump());
  expect_error([] { Json::parse("{\"a\": 1,}", "cfg"); }, "cfg: malformed JSON at byte");
  expect_error([] { Json::parse("[1 2]"); }, "expected ']'");
  expect_error([] { Json::parse("\"abc"); }, "unterminated string");
  expect_error([] { Json::parse("{} x"); }, "trailing characters");
  expect_error([] { Json::parse("{\"a\":1}").at("b", "config.json"); }, "config.json: missing key 'b'");
}

TEST(Safetensors, RoundTripEveryDtype) {
  const std::string p = tmp_path("rt.safetensors");
  Tensor f = Tensor::empty({71, 3}, DType::kF32);
  fill_normal(f, 1, 0, 0.f, 1.f);
  std::vector<std::pair<std::string, Tensor>> ts = {
      {"f32", f}, {"bf16", f.to(DType::kBF16)}, {"e4m3", f.to(DType::kE4M3)}, {"e5m2", f.to(DType::kE5M2)},
      {"i32", Tensor::from_vector<int32_t>({1, -2, 3}, {3})}, {"empty", Tensor::empty({0, 5}, DType::kF32)},
      {"f64", f.to(DType::kF64)}};
  save_safetensors(p, ts, {{"format", "pt"}});
  SafetensorsReader r(p);
  EXPECT_EQ(r.names().size(), ts.size());
  EXPECT_EQ(r.metadata().at("format"), "pt");
  for (const auto& [name, t] : ts) {
    Tensor back = r.load(name);
    ASSERT_EQ(back.shape(), t.shape()) << name;
    ASSERT_EQ(back.dtype(), t.dtype()) << name;
    if (t.nbytes()) EXPECT_EQ(std::memcmp(back.data_ptr(), t.data_ptr(), t.nbytes()), 0) << name;
  }
  expect_error([&] { r.load("nope"); }, "no tensor named 'nope'");
  Tensor wrong = Tensor::empty({3, 71}, DType::kF32);
  expect_error([&] { r.load_into("f32", wrong); }, "tensor 'f32' is f32[71, 3], expected f32[3, 71]");
}

void write_raw(const std::string& p, const std::string& header, size_t data_bytes, int64_t len_override = -1) {
  std::ofstream o(p, std::ios::binary | std::ios::trunc);
  uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
  for (int i = 0; i < 8; ++i, n >>= 8) o.put(static_cast<char>(n & 0xFF));
  o << header;
  o << std::string(data_bytes, '\0');
}

TEST(Safetensors, DamagedFilesAreRefused) {
  const std::string p = tmp_path("bad.safetensors");
  expect_error([&] { SafetensorsReader r(tmp_path("missing.safetensors")); }, "cannot open");
  { std::ofstream o(p, std::ios::binary | std::ios::trunc); o << "abc"; }
  expect_error([&] { SafetensorsReader r(p); }, "not a safetensors file");
  write_raw(p, "{}", 0, 1000);
  expect_error([&] { SafetensorsReader r(p); }, "header length 1000 does not fit");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8);  // truncated data
  expect_error([&] { SafetensorsReader r(p); }, "tensor 'w': data_offsets [0, 16) outside the 8 data bytes");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", 16);
  expect_error([&] { SafetensorsReader r(p); }, "shape [3] of f32 needs 12");
  write_raw(p, R"({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 4]}})", 4);
  expect_error([&] { SafetensorsReader r(p); }, "unsupported safetensors dtype 'Q4'");
  write_raw(p, R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                   "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}})", 6);
  expect_error([&] { SafetensorsReader r(p); }, "overlap");
  write_raw(p, R"({"w": {"dtype": "F32", "shape": [4]}})", 16);
  expect_error([&] { SafetensorsReader r(p); }, "missing key 'data_offsets'");
  write_raw(p, R"({"w": )", 0);
  expect_error([&] { SafetensorsReader r(p); }, "malformed JSON");
}

TEST(Safetensors, AtomicWriteKeepsTheOldFileOnFailure) {
  const std::string p = tmp_path("atomic.bin");
  write_file_atomic(p, [](std::ofstream& o) { o << "old"; });
  EXPECT_THROW(write_file_atomic(p, [](std::ofstream& o) {
                 o << "partial new content";
                 HELIX_FAIL("simulated crash while writing");
               }),
               Error);
  std::ifstream in(p);
  std::string s;
  in >> s;
  EXPECT_EQ(s, "old");
  for (const auto& e : fs::directory_iterator(fs::path(p).parent_path()))
    EXPECT_EQ(e.path().filename().string().find(".atomic.bin.tmp"), std::string::npos) << "temporary left behind";
}

}  // namespace
}  // namespace helix
