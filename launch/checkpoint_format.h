#pragma once
// The on-disk format of helix checkpoints, independent of any running model: the tensor index
// (every global tensor described as pieces, each piece one tensor of one rank file covering a box
// of the global tensor, or a flat range of such a box), the metadata file, file checksums, and the
// assembly of a global tensor from its pieces. Resharding onto another layout is "assemble the
// global tensor, take this rank's part", so any layout whose parts are boxes or flat ranges of
// boxes (TP rows/columns, vocabulary rows, ZeRO flat shards, PP stages owning whole tensors) needs
// no format change. Single-process code: the collective parts are in launch/checkpoint.h.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/json.h"
#include "core/safetensors.h"
#include "core/tensor.h"

namespace helix {

inline constexpr const char* kCheckpointFormat = "helix-checkpoint";
inline constexpr int kCheckpointVersion = 1;
inline constexpr const char* kCheckpointMetaFile = "meta.json";

// One stored part of a global tensor: the box [offsets, offsets + shape) of the global tensor, or,
// when flat_end >= 0, only the elements [flat_begin, flat_end) of that box in row-major order (a
// ZeRO-style flat shard). The stored tensor holds exactly those elements.
struct TensorPiece {
  std::string file;              // rank file holding it, relative to the checkpoint directory
  std::string key;               // tensor name inside that file
  std::vector<int64_t> offsets;  // [ndim] start of the box in the global tensor
  std::vector<int64_t> shape;    // [ndim] extent of the box
  int64_t flat_begin = 0;
  int64_t flat_end = -1;  // -1: the whole box

  int64_t numel() const;  // elements stored
  Json to_json() const;
  static TensorPiece from_json(const Json& j, const std::string& what);
};

// How a tensor may be resumed on another parallel layout.
enum class Reshard : uint8_t {
  kAny,         // the global tensor is assembled from its pieces; any layout takes its part
  kSameLayout,  // per-rank state (one tensor per rank): resumable only on the same layout
};

struct TensorIndexEntry {
  Shape shape;  // global shape
  DType dtype = DType::kF32;
  Reshard reshard = Reshard::kAny;
  std::vector<TensorPiece> pieces;
};

using TensorIndex = std::map<std::string, TensorIndexEntry>;

Json tensor_index_to_json(const TensorIndex& index);
TensorIndex tensor_index_from_json(const Json& j, const std::string& what);

// Size and CRC-32 (zlib) of a whole file, read in chunks. Throws naming the file when unreadable.
struct FileDigest {
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
  bool operator==(const FileDigest&) const = default;
};
FileDigest digest_file(const std::string& path);
std::string crc32_hex(uint32_t crc);  // 8 lower-case hex digits

// Checks every file listed in meta["files"] under `dir`: present, the recorded size (a shorter file
// is reported as truncated), the recorded CRC-32. Throws one line naming the file and the rule.
void verify_checkpoint_files(const std::string& dir, const Json& meta);

// Reads and checks meta.json of one checkpoint directory (format name and version).
Json read_checkpoint_meta(const std::string& dir);

// Step directories of a run directory: "step_00000042" (complete: renamed after every rank wrote
// and fsynced). Temporary directories of unfinished saves (".step_*.tmp") are not listed.
std::string step_dir_name(int64_t step);
struct CheckpointDir {
  int64_t step = 0;
  std::string path;
};
std::vector<CheckpointDir> list_checkpoints(const std::string& run_dir);  // ascending steps
// `path` is a checkpoint itself (holds meta.json) or a run directory: the newest complete one.
// Throws "--resume DIR: no complete checkpoint" when there is none (`flag` names the option).
std::string resolve_checkpoint(const std::string& path, const std::string& flag);

// Reads pieces of checkpoint `dir` (opening each rank file once) and assembles global tensors.
class CheckpointReader {
 public:
  CheckpointReader(std::string dir, TensorIndex index);
  const TensorIndex& index() const { return index_; }
  bool has(const std::string& name) const { return index_.count(name) > 0; }
  // The global tensor (CPU, the stored dtype). Throws when the pieces do not cover every element
  // exactly once, or a piece disagrees with the index.
  Tensor assemble(const std::string& name);

 private:
  const SafetensorsReader& file(const std::string& name);
  std::string dir_;
  TensorIndex index_;
  std::map<std::string, std::unique_ptr<SafetensorsReader>> files_;
};

}  // namespace helix
