#pragma once
// Memory for tensors. One allocator per device, each counting current and peak bytes in use (the
// numbers memory accounting and `helix plan` are checked against). CPU: 64-byte aligned blocks.
// CUDA: a caching allocator with size classes (512 B granules below 1 MiB, 2 MiB above); freed blocks
// go to a per-size free list and are reused by allocations of the same class on the same stream.
#include <cstddef>
#include <cstdint>

#include "core/device.h"

namespace helix {

struct AllocatorStats {
  size_t current_bytes = 0;   // bytes of live tensors (requested sizes)
  size_t peak_bytes = 0;      // high-water mark of current_bytes since the last reset_peak()
  size_t reserved_bytes = 0;  // bytes held from the system (CUDA: cudaMalloc'ed, cached included)
  uint64_t num_allocs = 0;    // allocations served
  uint64_t num_system_allocs = 0;  // allocations that went to the system (cache misses)
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  // stream: the cudaStream_t (as void*) the block will be used on; ignored on the CPU.
  virtual void* allocate(size_t bytes, void* stream) = 0;
  virtual void deallocate(void* ptr, size_t bytes, void* stream) = 0;
  virtual AllocatorStats stats() const = 0;
  virtual void reset_peak() = 0;
  // Returns cached, unused blocks to the system.
  virtual void empty_cache() = 0;
};

// The process-wide allocator of a device (created on first use, never destroyed).
Allocator& allocator_for(Device device);

// Size class of a CUDA allocation (exposed for tests).
size_t cuda_size_class(size_t bytes);

}  // namespace helix
