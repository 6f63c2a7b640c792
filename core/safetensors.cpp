#include "core/safetensors.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <functional>

#include "core/json.h"

namespace helix {

namespace fs = std::filesystem;

std::string safetensors_dtype(DType t) {
  switch (t) {
    case DType::kF32: return "F32";
    case DType::kF64: return "F64";
    case DType::kBF16: return "BF16";
    case DType::kE4M3: return "F8_E4M3";
    case DType::kE5M2: return "F8_E5M2";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kU8: return "U8";
  }
  return "?";
}

DType dtype_from_safetensors(const std::string& s, const std::string& context) {
  for (DType t : {DType::kF32, DType::kF64, DType::kBF16, DType::kE4M3, DType::kE5M2, DType::kI32,
                  DType::kI64, DType::kU8})
    if (safetensors_dtype(t) == s) return t;
  HELIX_FAIL("{}: unsupported safetensors dtype '{}' (helix reads F32, F64, BF16, F8_E4M3, F8_E5M2, I32, I64, U8)",
             context, s);
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  file_.open(path, std::ios::binary);
  HELIX_CHECK(file_.good(), "cannot open safetensors file '{}'", path);
  std::error_code ec;
  const uint64_t size = fs::file_size(path, ec);
  HELIX_CHECK(!ec && size >= 8, "'{}': not a safetensors file (size {} bytes, expected at least 8)", path, size);
  unsigned char len_bytes[8];
  file_.read(reinterpret_cast<char*>(len_bytes), 8);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  HELIX_CHECK(header_len <= size - 8 && header_len <= (100u << 20),
              "'{}': header length {} does not fit a file of {} bytes (truncated or not safetensors)", path,
              header_len, size);
  std::string header(header_len, '\0');
  file_.read(header.data(), static_cast<std::streamsize>(header_len));
  HELIX_CHECK(file_.good(), "'{}': could not read the {}-byte header", path, header_len);
  data_start_ = 8 + header_len;
  const uint64_t data_size = size - data_start_;

  const Json j = Json::parse(header, path);
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, v] : j.as_object(path)) {
    if (name == "__metadata__") {
      for (const auto& [k, s] : v.as_object(path + " __metadata__")) metadata_[k] = s.as_string(path + " __metadata__." + k);
      continue;
    }
    const std::string ctx = fmt::format("'{}': tensor '{}'", path, name);
    SafetensorsEntry e;
    e.dtype = dtype_from_safetensors(v.at("dtype", ctx).as_string(ctx), ctx);
    std::vector<int64_t> dims;
    for (const Json& d : v.at("shape", ctx).as_array(ctx)) {
      dims.push_back(d.as_int(ctx));
      HELIX_CHECK(dims.back() >= 0, "{}: negative dimension {}", ctx, dims.back());
    }
    e.shape = Shape(dims);
    const Json::Array& off = v.at("data_offsets", ctx).as_array(ctx);
    HELIX_CHECK(off.size() == 2, "{}: expected 2 data_offsets, got {}", ctx, off.size());
    const int64_t b = off[0].as_int(ctx), en = off[1].as_int(ctx);
    HELIX_CHECK(0 <= b && b <= en && static_cast<uint64_t>(en) <= data_size,
                "{}: data_offsets [{}, {}) outside the {} data bytes (truncated file?)", ctx, b, en, data_size);
    e.begin = static_cast<uint64_t>(b);
    e.end = static_cast<uint64_t>(en);
    const uint64_t expect = static_cast<uint64_t>(e.shape.numel()) * dtype_size(e.dtype);
    HELIX_CHECK(e.end - e.begin == expect, "{}: {} bytes stored, but shape {} of {} needs {}", ctx,
                e.end - e.begin, e.shape.str(), dtype_name(e.dtype), expect);
    ranges.emplace_back(e.begin, e.end);
    entries_[name] = e;
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    HELIX_CHECK(ranges[i].first >= ranges[i - 1].second, "'{}': tensor data ranges overlap at byte {}", path,
                ranges[i].first);
}

std::vector<std::string> SafetensorsReader::names() const {
  std::vector<std::string> n;
  for (const auto& [k, v] : entries_) n.push_back(k);
  return n;
}

const SafetensorsEntry& SafetensorsReader::entry(const std::string& name) const {
  auto it = entries_.find(name);
  HELIX_CHECK(it != entries_.end(), "'{}': no tensor named '{}'", path_, name);
  return it->second;
}

Tensor SafetensorsReader::load(const std::string& name) const {
  const SafetensorsEntry& e = entry(name);
  Tensor t = Tensor::empty(e.shape, e.dtype);
  if (e.end > e.begin) {
    file_.clear();
    file_.seekg(static_cast<std::streamoff>(data_start_ + e.begin));
    file_.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
    HELIX_CHECK(file_.good(), "'{}': could not read tensor '{}' (truncated file?)", path_, name);
  }
  return t;
}

void SafetensorsReader::load_into(const std::string& name, Tensor& dst) const {
  const SafetensorsEntry& e = entry(name);
  HELIX_CHECK(e.shape == dst.shape() && e.dtype == dst.dtype(), "'{}': tensor '{}' is {}{}, expected {}", path_,
              name, dtype_name(e.dtype), e.shape.str(), dst.str());
  const Tensor host = load(name);
  dst.copy_from(host, Stream());
}

void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

void write_file_atomic(const std::string& path, const std::function<void(std::ofstream&)>& write) {
  const fs::path p(path);
  const fs::path tmp = p.parent_path() / fmt::format(".{}.tmp.{}", p.filename().string(), ::getpid());
  try {
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      HELIX_CHECK(out.good(), "cannot create '{}' (directory missing or not writable?)", tmp.string());
      write(out);
      out.flush();
      HELIX_CHECK(out.good(), "error while writing '{}' (disk full?)", tmp.string());
    }
    const int fd = ::open(tmp.c_str(), O_RDONLY);
    HELIX_CHECK(fd >= 0, "cannot reopen '{}' to fsync it", tmp.string());
    const int rc = ::fsync(fd);
    ::close(fd);
    HELIX_CHECK(rc == 0, "fsync of '{}' failed", tmp.string());
    fs::rename(tmp, p);
    fsync_directory(p.parent_path().string());
  } catch (...) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  Json header;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    HELIX_CHECK(name != "__metadata__" && !header.has(name), "save_safetensors '{}': duplicate or reserved name '{}'",
                path, name);
    Json e;
    e["dtype"] = safetensors_dtype(t.dtype());
    Json::Array shape;
    for (int64_t d : t.shape().vec()) shape.push_back(Json(d));
    e["shape"] = Json(shape);
    e["data_offsets"] = Json(Json::Array{Json(offset), Json(offset + t.nbytes())});
    header[name] = e;
    offset += t.nbytes();
  }
  if (!metadata.empty()) {
    Json m;
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = m;
  }
  std::string h = header.dump();
  while ((8 + h.size()) % 8) h += ' ';  // align the data section to 8 bytes
  write_file_atomic(path, [&](std::ofstream& out) {
    unsigned char len[8];
    uint64_t n = h.size();
    for (int i = 0; i < 8; ++i, n >>= 8) len[i] = static_cast<unsigned char>(n & 0xFF);
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(h.data(), static_cast<std::streamsize>(h.size()));
    for (const auto& [name, t] : tensors) {
      const Tensor host = t.is_cpu() ? t : t.to(Device::cpu());
      out.write(static_cast<const char*>(host.nbytes() ? host.data_ptr() : nullptr),
                static_cast<std::streamsize>(host.nbytes()));
    }
  });
}

}  // namespace helix
