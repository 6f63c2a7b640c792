#pragma once
// Multi-tensor tables: the host side of "one launch over many tensors" (AdamW, gradient norm). Each
// tensor of a list is cut into chunks of a fixed number of elements and block b of a multi-tensor
// kernel handles chunk b. The table (per-tensor descriptors, then the chunk list) is one device
// buffer built once when the list is made and reused every step, so a step costs no host-to-device
// copy.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/tensor.h"

namespace helix {

// Elements [begin, min(begin + chunk_size, numel)) of tensor number `tensor` of the list.
struct MultiTensorChunk {
  int32_t tensor;
  int32_t reserved;  // keeps `begin` 8-byte aligned
  int64_t begin;
};

// Chunks of every tensor in list order; a tensor of 0 elements gets none.
std::vector<MultiTensorChunk> make_multi_tensor_chunks(const std::vector<int64_t>& numels,
                                                       int64_t chunk_size);

class MultiTensorTable {
 public:
  MultiTensorTable() = default;

  // Descriptors (plain structs of device pointers and sizes) and the chunk list of `numels`,
  // copied into one buffer on `device`. chunk_size must be a positive multiple of 4 (vector loads).
  template <typename Desc>
  static MultiTensorTable build(const std::vector<Desc>& descs, const std::vector<int64_t>& numels,
                                int64_t chunk_size, Device device) {
    static_assert(std::is_trivially_copyable_v<Desc>,
                  "multi-tensor descriptors must be plain structs");
    HELIX_CHECK(descs.size() == numels.size(),
                "multi-tensor table: expected {} descriptors, got {}", numels.size(), descs.size());
    std::vector<uint8_t> bytes(descs.size() * sizeof(Desc));
    if (!bytes.empty()) std::memcpy(bytes.data(), descs.data(), bytes.size());
    return build_bytes(std::move(bytes), numels, chunk_size, device);
  }

  bool defined() const { return buffer_.defined(); }
  const void* descs() const;               // device pointer to the descriptors
  const MultiTensorChunk* chunks() const;  // device pointer to num_chunks() chunks
  int64_t num_chunks() const { return num_chunks_; }
  int64_t chunk_size() const { return chunk_size_; }

 private:
  static MultiTensorTable build_bytes(std::vector<uint8_t> desc_bytes,
                                      const std::vector<int64_t>& numels, int64_t chunk_size,
                                      Device device);
  Tensor buffer_;  // [bytes] u8: descriptors, padding to 16 bytes, chunks
  size_t chunks_offset_ = 0;
  int64_t num_chunks_ = 0;
  int64_t chunk_size_ = 0;
};

}  // namespace helix
