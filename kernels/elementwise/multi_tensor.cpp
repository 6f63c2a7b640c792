#include "kernels/elementwise/multi_tensor.h"

#include <limits>

namespace helix {

std::vector<MultiTensorChunk> make_multi_tensor_chunks(const std::vector<int64_t>& numels,
                                                       int64_t chunk_size) {
  HELIX_CHECK(chunk_size > 0 && chunk_size % 4 == 0,
              "multi-tensor chunks: expected a positive multiple of 4 as chunk size, got {}",
              chunk_size);
  HELIX_CHECK(numels.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "multi-tensor chunks: expected at most 2^31-1 tensors, got {}", numels.size());
  std::vector<MultiTensorChunk> chunks;
  for (size_t t = 0; t < numels.size(); ++t) {
    HELIX_CHECK(numels[t] >= 0, "multi-tensor chunks: tensor {} has negative size {}", t,
                numels[t]);
    for (int64_t begin = 0; begin < numels[t]; begin += chunk_size)
      chunks.push_back({static_cast<int32_t>(t), 0, begin});
  }
  HELIX_CHECK(chunks.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "multi-tensor chunks: expected at most 2^31-1 chunks (one block each), got {}",
              chunks.size());
  return chunks;
}

MultiTensorTable MultiTensorTable::build_bytes(std::vector<uint8_t> bytes,
                                               const std::vector<int64_t>& numels,
                                               int64_t chunk_size, Device device) {
  const std::vector<MultiTensorChunk> chunks = make_multi_tensor_chunks(numels, chunk_size);
  MultiTensorTable t;
  t.chunk_size_ = chunk_size;
  t.num_chunks_ = static_cast<int64_t>(chunks.size());
  t.chunks_offset_ = (bytes.size() + 15) / 16 * 16;
  bytes.resize(t.chunks_offset_ + chunks.size() * sizeof(MultiTensorChunk) + 1,
               0);  // +1: never empty
  if (!chunks.empty())
    std::memcpy(bytes.data() + t.chunks_offset_, chunks.data(),
                chunks.size() * sizeof(MultiTensorChunk));
  // The allocator's blocks are at least 64-byte aligned, so chunks_offset_ keeps 16-byte alignment.
  t.buffer_ = Tensor::from_vector(bytes, Shape{static_cast<int64_t>(bytes.size())}, device);
  return t;
}

const void* MultiTensorTable::descs() const { return buffer_.data_ptr(); }

const MultiTensorChunk* MultiTensorTable::chunks() const {
  return reinterpret_cast<const MultiTensorChunk*>(static_cast<const uint8_t*>(buffer_.data_ptr()) +
                                                   chunks_offset_);
}

}  // namespace helix
