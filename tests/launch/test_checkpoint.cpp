// The checkpoint format without a model or MPI: global tensors assembled from boxes and flat ranges
// (TP shards, ZeRO-style flat shards), coverage / overlap / bounds refused, the index JSON, file
// digests and their verification (truncated, corrupted, missing), finding the newest complete
// checkpoint, metadata versions, and the model / Hugging Face config blocks.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.h"
#include "core/safetensors.h"
#include "launch/checkpoint.h"
#include "launch/checkpoint_format.h"
#include "layers/model_config.h"

namespace helix {
namespace {

namespace fs = std::filesystem;

class CheckpointFormat : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("helix_ckpt_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir() const { return dir_.string(); }
  fs::path dir_;
};

// Global [rows, cols] f32 with element (i, j) = 100 i + j.
Tensor global(int64_t rows, int64_t cols) {
  Tensor t = Tensor::empty({rows, cols}, DType::kF32);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) t.data<float>()[i * cols + j] = float(100 * i + j);
  return t;
}

// The elements of box (r0, c0, h, w) of g, row-major, restricted to [b, e).
Tensor box_of(const Tensor& g, int64_t r0, int64_t c0, int64_t h, int64_t w, int64_t b = 0,
              int64_t e = -1) {
  if (e < 0) e = h * w;
  Tensor out = Tensor::empty({e - b}, DType::kF32);
  for (int64_t k = b; k < e; ++k)
    out.data<float>()[k - b] = g.data<float>()[(r0 + k / w) * g.dim(1) + c0 + k % w];
  return out;
}

TensorPiece piece(const std::string& file, const std::string& key, std::vector<int64_t> off,
                  std::vector<int64_t> shape, int64_t fb = 0, int64_t fe = -1) {
  TensorPiece p;
  p.file = file;
  p.key = key;
  p.offsets = std::move(off);
  p.shape = std::move(shape);
  p.flat_begin = fb;
  p.flat_end = fe;
  return p;
}

bool equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()) == 0;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST_F(CheckpointFormat, AssemblesTensorParallelBoxes) {
  const Tensor g = global(6, 4);
  // rank 0: rows 0-3 of columns 0-1 and all rows of column 2-3 in two pieces; rank 1: rows 4-5.
  save_safetensors(dir() + "/r0.safetensors",
                   {{"a", box_of(g, 0, 0, 4, 2).view({4, 2})}, {"b", box_of(g, 0, 2, 6, 2)}});
  save_safetensors(dir() + "/r1.safetensors", {{"c", box_of(g, 4, 0, 2, 2)}});
  TensorIndex index;
  index["w"] = TensorIndexEntry{
      Shape{6, 4},
      DType::kF32,
      Reshard::kAny,
      {piece("r0.safetensors", "a", {0, 0}, {4, 2}), piece("r0.safetensors", "b", {0, 2}, {6, 2}),
       piece("r1.safetensors", "c", {4, 0}, {2, 2})}};
  CheckpointReader reader(dir(), tensor_index_from_json(tensor_index_to_json(index), "test"));
  EXPECT_TRUE(equal(reader.assemble("w"), g));
}

TEST_F(CheckpointFormat, AssemblesFlatRangesOfBoxes) {
  // ZeRO over a TP shard: box rows 0-2 split flat into [0, 5) and [5, 12), box rows 3-4 into
  // [0, 3) and [3, 8) on two other files.
  const Tensor g = global(5, 4);
  save_safetensors(dir() + "/r0.safetensors", {{"p", box_of(g, 0, 0, 3, 4, 0, 5)}});
  save_safetensors(dir() + "/r1.safetensors", {{"p", box_of(g, 0, 0, 3, 4, 5, 12)}});
  save_safetensors(dir() + "/r2.safetensors",
                   {{"p", box_of(g, 3, 0, 2, 4, 0, 3)}, {"q", box_of(g, 3, 0, 2, 4, 3, 8)}});
  TensorIndex index;
  index["w"] = TensorIndexEntry{Shape{5, 4},
                                DType::kF32,
                                Reshard::kAny,
                                {piece("r0.safetensors", "p", {0, 0}, {3, 4}, 0, 5),
                                 piece("r1.safetensors", "p", {0, 0}, {3, 4}, 5, 12),
                                 piece("r2.safetensors", "p", {3, 0}, {2, 4}, 0, 3),
                                 piece("r2.safetensors", "q", {3, 0}, {2, 4}, 3, 8)}};
  const Json j = tensor_index_to_json(index);
  EXPECT_TRUE(j.at("w").at("pieces").as_array()[1].has("flat"));
  CheckpointReader reader(dir(), tensor_index_from_json(j, "test"));
  EXPECT_TRUE(equal(reader.assemble("w"), g));
}

TEST_F(CheckpointFormat, RefusesGapsOverlapsAndBadPieces) {
  const Tensor g = global(4, 4);
  save_safetensors(dir() + "/r0.safetensors", {{"top", box_of(g, 0, 0, 2, 4)},
                                               {"mid", box_of(g, 1, 0, 2, 4)},
                                               {"i32", Tensor::zeros({8}, DType::kI32)}});
  const auto assemble = [&](std::vector<TensorPiece> pieces) {
    TensorIndex index;
    index["w"] = TensorIndexEntry{Shape{4, 4}, DType::kF32, Reshard::kAny, std::move(pieces)};
    CheckpointReader reader(dir(), index);
    return error_of([&] { reader.assemble("w"); });
  };
  EXPECT_NE(
      assemble({piece("r0.safetensors", "top", {0, 0}, {2, 4})}).find("cover 8 of 16 elements"),
      std::string::npos);
  EXPECT_NE(assemble({piece("r0.safetensors", "top", {0, 0}, {2, 4}),
                      piece("r0.safetensors", "mid", {1, 0}, {2, 4})})
                .find("overlaps another piece"),
            std::string::npos);
  EXPECT_NE(
      assemble({piece("r0.safetensors", "top", {3, 0}, {2, 4})}).find("outside the global shape"),
      std::string::npos);
  EXPECT_NE(
      assemble({piece("r0.safetensors", "i32", {0, 0}, {2, 4})}).find("expected 8 elements of f32"),
      std::string::npos);
  EXPECT_NE(
      assemble({piece("r0.safetensors", "nope", {0, 0}, {2, 4})}).find("not in the rank file"),
      std::string::npos);
  EXPECT_NE(assemble({piece("r9.safetensors", "top", {0, 0}, {2, 4})}).find("r9.safetensors"),
            std::string::npos);
  TensorIndex empty;
  CheckpointReader reader(dir(), empty);
  EXPECT_NE(error_of([&] { reader.assemble("w"); }).find("missing from the index"),
            std::string::npos);
  // A piece naming a file outside the checkpoint directory is refused when the index is read.
  Json bad = tensor_index_to_json(
      {{"w",
        TensorIndexEntry{
            Shape{1}, DType::kF32, Reshard::kAny, {piece("../x.safetensors", "a", {0}, {1})}}}});
  EXPECT_NE(error_of([&] {
              tensor_index_from_json(bad, "meta");
            }).find("inside the checkpoint directory"),
            std::string::npos);
}

TEST_F(CheckpointFormat, DigestsAndVerifiesFiles) {
  {
    std::ofstream f(dir() + "/digits", std::ios::binary);
    f << "123456789";
  }
  const FileDigest d = digest_file(dir() + "/digits");
  EXPECT_EQ(d.bytes, 9u);
  EXPECT_EQ(crc32_hex(d.crc32), "cbf43926");  // the CRC-32 check value
  Json meta;
  meta["files"]["digits"]["bytes"] = int64_t{9};
  meta["files"]["digits"]["crc32"] = "cbf43926";
  EXPECT_NO_THROW(verify_checkpoint_files(dir(), meta));
  meta["files"]["digits"]["crc32"] = "cbf43927";
  EXPECT_NE(error_of([&] {
              verify_checkpoint_files(dir(), meta);
            }).find("'digits' is damaged: expected CRC-32 cbf43927, got cbf43926"),
            std::string::npos);
  meta["files"]["digits"]["bytes"] = int64_t{12};
  EXPECT_NE(error_of([&] {
              verify_checkpoint_files(dir(), meta);
            }).find("is truncated: expected 12 bytes, got 9"),
            std::string::npos);
  meta["files"]["other"]["bytes"] = int64_t{1};
  meta["files"]["other"]["crc32"] = "00000000";
  EXPECT_NE(error_of([&] {
              verify_checkpoint_files(dir(), meta);
            }).find("rank file 'digits' is truncated"),
            std::string::npos);  // files are checked in name order
  meta["files"]["digits"]["bytes"] = int64_t{9};
  meta["files"]["digits"]["crc32"] = "cbf43926";
  EXPECT_NE(
      error_of([&] { verify_checkpoint_files(dir(), meta); }).find("rank file 'other' is missing"),
      std::string::npos);
}

void write_meta(const std::string& dir, int version) {
  fs::create_directories(dir);
  std::ofstream f(dir + "/meta.json");
  f << "{\"format\": \"helix-checkpoint\", \"version\": " << version << "}";
}

TEST_F(CheckpointFormat, FindsTheNewestCompleteCheckpoint) {
  EXPECT_NE(error_of([&] { resolve_checkpoint(dir(), "--resume"); }).find("no complete checkpoint"),
            std::string::npos);
  EXPECT_NE(error_of([&] { resolve_checkpoint(dir() + "/nope", "--resume"); }).find("--resume '"),
            std::string::npos);
  write_meta(dir() + "/" + step_dir_name(20), 1);
  write_meta(dir() + "/" + step_dir_name(100), 1);
  fs::create_directories(dir() + "/" + step_dir_name(300));  // no meta.json: not complete
  write_meta(dir() + "/.step_00000400.tmp", 1);              // an unfinished save
  write_meta(dir() + "/step_12", 1);                         // not a step directory name
  const std::vector<CheckpointDir> all = list_checkpoints(dir());
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].step, 20);
  EXPECT_EQ(all[1].step, 100);
  EXPECT_EQ(step_dir_name(100), "step_00000100");
  EXPECT_EQ(resolve_checkpoint(dir(), "--resume"), dir() + "/step_00000100");
  EXPECT_EQ(resolve_checkpoint(dir() + "/step_00000020", "--resume"), dir() + "/step_00000020");
  EXPECT_NO_THROW(read_checkpoint_meta(dir() + "/step_00000020"));
  write_meta(dir() + "/v2", 2);
  EXPECT_NE(error_of([&] {
              read_checkpoint_meta(dir() + "/v2");
            }).find("format version 2, this helix reads version 1"),
            std::string::npos);
  fs::create_directories(dir() + "/junk");
  std::ofstream(dir() + "/junk/meta.json") << "{\"format\": \"something\"}";
  EXPECT_NE(error_of([&] {
              read_checkpoint_meta(dir() + "/junk");
            }).find("expected a helix-checkpoint metadata file"),
            std::string::npos);
}

TEST(CheckpointConfig, ModelAndHuggingFaceConfigsRoundTrip) {
  ModelConfig c = model_config("esm2-35m");
  c.layer_norm_eps = 1e-5f;
  const ModelConfig back =
      model_config_from_json(Json::parse(model_config_to_json(c).dump()), "test");
  EXPECT_EQ(model_config_to_json(back).dump(), model_config_to_json(c).dump());
  const ModelConfig hf = model_config_from_hf(Json::parse(hf_config(c).dump()), "config.json");
  Json a = model_config_to_json(hf), b = model_config_to_json(c);
  a["name"] = "";
  b["name"] = "";
  EXPECT_EQ(a.dump(), b.dump());
  Json bad = hf_config(c);
  bad["model_type"] = "bert";
  EXPECT_NE(error_of([&] {
              model_config_from_hf(bad, "config.json");
            }).find("expected model_type \"esm\""),
            std::string::npos);
  EXPECT_EQ(vocabulary_json().as_array().size(), 33u);
  EXPECT_EQ(vocabulary_json().as_array()[32].as_string(), "<mask>");
}

TEST(CheckpointOptionsTest, RefusesImpossibleFlags) {
  CheckpointOptions o;
  o.save_every = 5;
  EXPECT_NE(error_of([&] {
              validate_checkpoint_options(o, 10);
            }).find("--save-every 5: needs --save DIR"),
            std::string::npos);
  o.save_dir = "runs/x";
  o.stop_after = 11;
  EXPECT_NE(error_of([&] {
              validate_checkpoint_options(o, 10);
            }).find("--stop-after: expected 0..--steps (10), got 11"),
            std::string::npos);
  o.stop_after = 10;
  EXPECT_NO_THROW(validate_checkpoint_options(o, 10));
  o.keep = -1;
  EXPECT_NE(error_of([&] { validate_checkpoint_options(o, 10); }).find("--keep"),
            std::string::npos);
}

}  // namespace
}  // namespace helix
