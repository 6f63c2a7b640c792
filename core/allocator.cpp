#include "core/allocator.h"

#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/cuda_check.h"
#include "core/error.h"

namespace helix {

size_t cuda_size_class(size_t bytes) {
  constexpr size_t kSmall = 512, kLarge = 2u << 20, kSmallLimit = 1u << 20;
  if (bytes == 0) return kSmall;
  if (bytes <= kSmallLimit) return (bytes + kSmall - 1) / kSmall * kSmall;
  return (bytes + kLarge - 1) / kLarge * kLarge;
}

namespace {

class CountingBase : public Allocator {
 public:
  AllocatorStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return stats_;
  }
  void reset_peak() override {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.peak_bytes = stats_.current_bytes;
  }

 protected:
  void count_alloc(size_t bytes) {
    stats_.current_bytes += bytes;
    stats_.num_allocs++;
    if (stats_.current_bytes > stats_.peak_bytes) stats_.peak_bytes = stats_.current_bytes;
  }
  mutable std::mutex mu_;
  AllocatorStats stats_;
};

class CpuAllocator final : public CountingBase {
 public:
  void* allocate(size_t bytes, void*) override {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded ? rounded : 64);
    HELIX_CHECK(p, "out of host memory: could not allocate {} bytes", bytes);
    std::lock_guard<std::mutex> lock(mu_);
    count_alloc(bytes);
    stats_.reserved_bytes += rounded;
    stats_.num_system_allocs++;
    return p;
  }
  void deallocate(void* p, size_t bytes, void*) override {
    std::free(p);
    std::lock_guard<std::mutex> lock(mu_);
    stats_.current_bytes -= bytes;
    stats_.reserved_bytes -= (bytes + 63) / 64 * 64;
  }
  void empty_cache() override {}
};

#if HELIX_WITH_CUDA
class CudaCachingAllocator final : public CountingBase {
 public:
  explicit CudaCachingAllocator(int device) : device_(device) {}

  void* allocate(size_t bytes, void* stream) override {
    const size_t cls = cuda_size_class(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    auto& bin = free_[Key{cls, stream}];
    void* p = nullptr;
    if (!bin.empty()) {
      p = bin.back();
      bin.pop_back();
    } else {
      int prev = 0;
      CUDA_CHECK(cudaGetDevice(&prev));
      if (prev != device_) CUDA_CHECK(cudaSetDevice(device_));
      cudaError_t st = cudaMalloc(&p, cls);
      if (st != cudaSuccess) {  // release the cache and try once more
        cudaGetLastError();
        release_cached_locked();
        st = cudaMalloc(&p, cls);
      }
      if (prev != device_) cudaSetDevice(prev);
      if (st != cudaSuccess) {
        cudaGetLastError();
        HELIX_FAIL("CUDA out of memory on device {}: could not allocate {} bytes ({} in use, {} reserved)",
                   device_, bytes, stats_.current_bytes, stats_.reserved_bytes);
      }
      stats_.reserved_bytes += cls;
      stats_.num_system_allocs++;
    }
    count_alloc(bytes);
    return p;
  }

  void deallocate(void* p, size_t bytes, void* stream) override {
    std::lock_guard<std::mutex> lock(mu_);
    free_[Key{cuda_size_class(bytes), stream}].push_back(p);
    stats_.current_bytes -= bytes;
  }

  void empty_cache() override {
    std::lock_guard<std::mutex> lock(mu_);
    release_cached_locked();
  }

 private:
  struct Key {
    size_t cls;
    void* stream;
    bool operator<(const Key& o) const { return cls != o.cls ? cls < o.cls : stream < o.stream; }
  };
  void release_cached_locked() {
    cudaDeviceSynchronize();
    for (auto& [key, ptrs] : free_) {
      for (void* p : ptrs) {
        cudaFree(p);
        stats_.reserved_bytes -= key.cls;
      }
      ptrs.clear();
    }
  }
  int device_;
  std::map<Key, std::vector<void*>> free_;
};
#endif

}  // namespace

Allocator& allocator_for(Device device) {
  if (device.is_cpu()) {
    static CpuAllocator* cpu = new CpuAllocator();  // never destroyed: tensors may outlive statics
    return *cpu;
  }
#if HELIX_WITH_CUDA
  static std::mutex mu;
  static std::unordered_map<int, CudaCachingAllocator*> per_device;
  std::lock_guard<std::mutex> lock(mu);
  auto& a = per_device[device.index];
  if (!a) a = new CudaCachingAllocator(device.index);
  return *a;
#else
  HELIX_FAIL("CUDA tensor requested, but helix was built without CUDA");
#endif
}

}  // namespace helix
