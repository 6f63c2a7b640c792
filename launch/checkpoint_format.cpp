#include "launch/checkpoint_format.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace fs = std::filesystem;

namespace helix {
namespace {

std::vector<int64_t> int_list(const Json& j, const std::string& what) {
  std::vector<int64_t> out;
  for (const Json& v : j.as_array(what)) out.push_back(v.as_int(what));
  return out;
}

Json json_list(const std::vector<int64_t>& v) {
  Json::Array a;
  for (int64_t x : v) a.emplace_back(x);
  return Json(std::move(a));
}

int64_t product(const std::vector<int64_t>& v) {
  int64_t n = 1;
  for (int64_t x : v) n *= x;
  return n;
}

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%08x", v);
  return buf;
}

}  // namespace

int64_t TensorPiece::numel() const {
  return flat_end >= 0 ? flat_end - flat_begin : product(shape);
}

Json TensorPiece::to_json() const {
  Json j;
  j["file"] = file;
  j["key"] = key;
  j["offsets"] = json_list(offsets);
  j["shape"] = json_list(shape);
  if (flat_end >= 0) j["flat"] = json_list({flat_begin, flat_end});
  return j;
}

TensorPiece TensorPiece::from_json(const Json& j, const std::string& what) {
  TensorPiece p;
  p.file = j.at("file", what).as_string(what);
  p.key = j.at("key", what).as_string(what);
  p.offsets = int_list(j.at("offsets", what), what);
  p.shape = int_list(j.at("shape", what), what);
  if (j.has("flat")) {
    const std::vector<int64_t> f = int_list(j.at("flat", what), what);
    HELIX_CHECK(f.size() == 2, "{}: expected \"flat\": [begin, end], got {} numbers", what,
                f.size());
    p.flat_begin = f[0];
    p.flat_end = f[1];
  }
  HELIX_CHECK(p.file.find('/') == std::string::npos && p.file.find("..") == std::string::npos,
              "{}: expected a file name inside the checkpoint directory, got '{}'", what, p.file);
  return p;
}

Json tensor_index_to_json(const TensorIndex& index) {
  Json out = Json(Json::Object{});
  for (const auto& [name, e] : index) {
    Json j;
    j["shape"] = json_list(e.shape.vec());
    j["dtype"] = safetensors_dtype(e.dtype);
    j["reshard"] = e.reshard == Reshard::kAny ? "any" : "same_layout";
    Json::Array pieces;
    for (const TensorPiece& p : e.pieces) pieces.push_back(p.to_json());
    j["pieces"] = Json(std::move(pieces));
    out[name] = j;
  }
  return out;
}

TensorIndex tensor_index_from_json(const Json& j, const std::string& what) {
  TensorIndex index;
  for (const auto& [name, v] : j.as_object(what)) {
    const std::string w = what + " tensor '" + name + "'";
    TensorIndexEntry e;
    e.shape = Shape(int_list(v.at("shape", w), w));
    e.dtype = dtype_from_safetensors(v.at("dtype", w).as_string(w), w);
    const std::string r = v.at("reshard", w).as_string(w);
    HELIX_CHECK(r == "any" || r == "same_layout",
                "{}: expected reshard \"any\" or \"same_layout\", got '{}' (a newer "
                "helix wrote it?)",
                w, r);
    e.reshard = r == "any" ? Reshard::kAny : Reshard::kSameLayout;
    for (const Json& p : v.at("pieces", w).as_array(w))
      e.pieces.push_back(TensorPiece::from_json(p, w));
    index[name] = std::move(e);
  }
  return index;
}

FileDigest digest_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  HELIX_CHECK(f.good(), "'{}': cannot open for reading", path);
  FileDigest d;
  uLong crc = crc32(0L, Z_NULL, 0);
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const std::streamsize n = f.gcount();
    if (n <= 0) break;
    crc = crc32_z(crc, reinterpret_cast<const Bytef*>(buf.data()), static_cast<z_size_t>(n));
    d.bytes += static_cast<uint64_t>(n);
  }
  HELIX_CHECK(f.eof(), "'{}': read error", path);
  d.crc32 = static_cast<uint32_t>(crc);
  return d;
}

void verify_checkpoint_files(const std::string& dir, const Json& meta) {
  const std::string what = dir + "/" + kCheckpointMetaFile;
  for (const auto& [name, rec] : meta.at("files", what).as_object(what)) {
    const std::string path = dir + "/" + name;
    HELIX_CHECK(fs::exists(path),
                "checkpoint '{}': rank file '{}' is missing (listed in meta.json)", dir, name);
    const uint64_t want_bytes = static_cast<uint64_t>(rec.at("bytes", what).as_int(what));
    const std::string want_crc = rec.at("crc32", what).as_string(what);
    const uint64_t size = fs::file_size(path);
    HELIX_CHECK(size >= want_bytes,
                "checkpoint '{}': rank file '{}' is truncated: expected {} bytes, got {}", dir,
                name, want_bytes, size);
    HELIX_CHECK(size == want_bytes,
                "checkpoint '{}': rank file '{}' has the wrong size: expected {} bytes, got {}",
                dir, name, want_bytes, size);
    const FileDigest d = digest_file(path);
    HELIX_CHECK(hex32(d.crc32) == want_crc,
                "checkpoint '{}': rank file '{}' is damaged: expected CRC-32 {}, got {}", dir, name,
                want_crc, hex32(d.crc32));
  }
}

Json read_checkpoint_meta(const std::string& dir) {
  const std::string path = dir + "/" + kCheckpointMetaFile;
  std::ifstream f(path, std::ios::binary);
  HELIX_CHECK(f.good(),
              "checkpoint '{}': cannot open {} (not a helix checkpoint, or an unfinished save)",
              dir, kCheckpointMetaFile);
  std::stringstream ss;
  ss << f.rdbuf();
  Json meta = Json::parse(ss.str(), path);
  HELIX_CHECK(meta.is_object() && meta.has("format") && meta.at("format").is_string() &&
                  meta.at("format").as_string() == kCheckpointFormat,
              "'{}': expected a {} metadata file, got something else", path, kCheckpointFormat);
  const int64_t v = meta.at("version", path).as_int(path);
  HELIX_CHECK(v == kCheckpointVersion,
              "'{}': checkpoint format version {}, this helix reads version {}", path, v,
              kCheckpointVersion);
  return meta;
}

std::string crc32_hex(uint32_t crc) { return hex32(crc); }

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::vector<CheckpointDir> list_checkpoints(const std::string& run_dir) {
  std::vector<CheckpointDir> out;
  if (!fs::is_directory(run_dir)) return out;
  for (const auto& e : fs::directory_iterator(run_dir)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory() || !name.starts_with("step_") || name.size() != 13) continue;
    if (!std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    if (!fs::exists(e.path() / kCheckpointMetaFile)) continue;
    out.push_back({std::stoll(name.substr(5)), e.path().string()});
  }
  std::sort(out.begin(), out.end(),
            [](const CheckpointDir& a, const CheckpointDir& b) { return a.step < b.step; });
  return out;
}

std::string resolve_checkpoint(const std::string& path, const std::string& flag) {
  HELIX_CHECK(fs::is_directory(path), "{} '{}': no such directory", flag, path);
  if (fs::exists(fs::path(path) / kCheckpointMetaFile)) return path;
  const std::vector<CheckpointDir> all = list_checkpoints(path);
  HELIX_CHECK(!all.empty(), "{} '{}': no complete checkpoint (step_*/{}) in this directory", flag,
              path, kCheckpointMetaFile);
  return all.back().path;
}

CheckpointReader::CheckpointReader(std::string dir, TensorIndex index)
    : dir_(std::move(dir)), index_(std::move(index)) {}

const SafetensorsReader& CheckpointReader::file(const std::string& name) {
  auto it = files_.find(name);
  if (it == files_.end())
    it = files_.emplace(name, std::make_unique<SafetensorsReader>(dir_ + "/" + name)).first;
  return *it->second;
}

Tensor CheckpointReader::assemble(const std::string& name) {
  const auto it = index_.find(name);
  HELIX_CHECK(it != index_.end(), "checkpoint '{}': tensor '{}' is missing from the index", dir_,
              name);
  const TensorIndexEntry& e = it->second;
  const std::vector<int64_t> g = e.shape.vec();
  const int nd = static_cast<int>(g.size());
  const size_t es = dtype_size(e.dtype);
  Tensor full = Tensor::zeros(e.shape, e.dtype);
  auto* dst = static_cast<uint8_t*>(full.data_ptr());
  std::vector<uint8_t> covered(static_cast<size_t>(full.numel()), 0);
  std::vector<int64_t> gstride(static_cast<size_t>(nd), 1);
  for (int d = nd - 2; d >= 0; --d) gstride[d] = gstride[d + 1] * g[d + 1];
  for (const TensorPiece& p : e.pieces) {
    const std::string w =
        "checkpoint '" + dir_ + "': tensor '" + name + "' piece '" + p.file + ":" + p.key + "'";
    HELIX_CHECK(static_cast<int>(p.offsets.size()) == nd && static_cast<int>(p.shape.size()) == nd,
                "{}: expected {} dimensions, got offsets {} and shape {}", w, nd, p.offsets.size(),
                p.shape.size());
    for (int d = 0; d < nd; ++d)
      HELIX_CHECK(p.offsets[d] >= 0 && p.shape[d] >= 0 && p.offsets[d] + p.shape[d] <= g[d],
                  "{}: box outside the global shape {} in dimension {}", w, e.shape.str(), d);
    const int64_t box = product(p.shape);
    const int64_t b = p.flat_end >= 0 ? p.flat_begin : 0, en = p.flat_end >= 0 ? p.flat_end : box;
    HELIX_CHECK(0 <= b && b <= en && en <= box,
                "{}: flat range [{}, {}) outside the box of {} elements", w, b, en, box);
    const SafetensorsReader& f = file(p.file);
    HELIX_CHECK(f.has(p.key), "{}: not in the rank file", w);
    const SafetensorsEntry& se = f.entry(p.key);
    HELIX_CHECK(se.dtype == e.dtype && se.shape.numel() == en - b,
                "{}: expected {} elements of {}, got {} of {}", w, en - b, dtype_name(e.dtype),
                se.shape.numel(), dtype_name(se.dtype));
    if (en == b) continue;
    const Tensor src = f.load(p.key);
    const auto* s = static_cast<const uint8_t*>(src.data_ptr());
    const int64_t last = nd > 0 ? p.shape[nd - 1] : 1;
    std::vector<int64_t> idx(static_cast<size_t>(std::max(nd - 1, 0)));
    for (int64_t row = b / last; row * last < en; ++row) {
      const int64_t lo = std::max<int64_t>(b - row * last, 0),
                    hi = std::min<int64_t>(en - row * last, last);
      int64_t goff = nd > 0 ? p.offsets[nd - 1] + lo : 0;
      int64_t rem = row;
      for (int d = nd - 2; d >= 0; --d) {
        goff += (p.offsets[d] + rem % p.shape[d]) * gstride[d];
        rem /= p.shape[d];
      }
      for (int64_t k = 0; k < hi - lo; ++k) {
        HELIX_CHECK(!covered[goff + k], "{}: overlaps another piece at element {}", w, goff + k);
        covered[goff + k] = 1;
      }
      std::memcpy(dst + goff * es, s + (row * last + lo - b) * es,
                  static_cast<size_t>(hi - lo) * es);
    }
  }
  const auto n = std::count(covered.begin(), covered.end(), uint8_t{1});
  HELIX_CHECK(
      n == full.numel(),
      "checkpoint '{}': tensor '{}' cannot be assembled: its pieces cover {} of {} elements", dir_,
      name, n, full.numel());
  return full;
}

}  // namespace helix
