#pragma once
// safetensors files (the Hugging Face tensor format): an 8-byte little-endian header length, a JSON
// header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then the raw bytes.
// The reader validates everything before any tensor is used (header bounds, offsets inside the data
// and not overlapping, byte counts matching shape and dtype) and names the file and tensor at fault.
// The writer is atomic: a temporary file in the same directory, fsync, rename.
#include <cstdint>
#include <fstream>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace helix {

struct SafetensorsEntry {
  DType dtype;
  Shape shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
};

class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // sorted
  bool has(const std::string& name) const { return entries_.count(name) > 0; }
  const SafetensorsEntry& entry(const std::string& name) const;
  // Reads one tensor into a new CPU tensor.
  Tensor load(const std::string& name) const;
  // Reads one tensor into an existing tensor (any device) of the same shape and dtype.
  void load_into(const std::string& name, Tensor& dst) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::string path_;
  uint64_t data_start_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
  mutable std::ifstream file_;
};

// Writes tensors (any device; copied to the host) in the given order, atomically.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// The safetensors dtype string of a DType ("F32", "BF16", "F8_E4M3", ...) and back.
std::string safetensors_dtype(DType t);
DType dtype_from_safetensors(const std::string& s, const std::string& context);

// Writes a file atomically: `write` fills a stream for a temporary file beside `path`, which is then
// flushed, fsynced and renamed over `path` (and the directory fsynced). On any error the temporary is
// removed and `path` is untouched.
void write_file_atomic(const std::string& path, const std::function<void(std::ofstream&)>& write);
void fsync_directory(const std::string& dir);

}  // namespace helix
