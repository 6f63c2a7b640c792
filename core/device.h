#pragma once
// Devices, streams and events. A Stream is the explicit execution context every kernel launcher takes:
// on the CPU it is a tag (work runs inline), on CUDA it wraps a cudaStream_t. helix uses no implicit
// "current device" state beyond what the CUDA runtime itself keeps.
#include <cstdint>
#include <memory>
#include <string>

namespace helix {

enum class DeviceType : uint8_t { kCPU, kCUDA };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = 0;

  static Device cpu() { return {DeviceType::kCPU, 0}; }
  static Device cuda(int i = 0) { return {DeviceType::kCUDA, i}; }
  bool is_cpu() const { return type == DeviceType::kCPU; }
  bool is_cuda() const { return type == DeviceType::kCUDA; }
  bool operator==(const Device&) const = default;
  std::string str() const;
};

// Number of usable CUDA devices; 0 in a CPU-only build or when no driver/GPU is present.
int cuda_device_count();
inline bool cuda_available() { return cuda_device_count() > 0; }
// Makes `device` this thread's current CUDA device (no-op for the CPU). A process drives one GPU:
// the legacy default stream (Stream::cuda_default) and kernel launches go to the current device,
// so a rank on GPU r calls this once before touching it (ParallelContext::create does).
void set_current_device(Device device);
// Why CUDA is unavailable ("CPU-only build", "no CUDA device: <driver message>"), for test skips.
std::string cuda_unavailable_reason();
// Compute capability as major*10+minor (90 for H100); throws in a CPU-only build.
int cuda_compute_capability(int device);
// Number of streaming multiprocessors; throws in a CPU-only build.
int cuda_sm_count(int device);

class Stream {
 public:
  Stream() = default;  // the CPU stream
  static Stream cpu() { return Stream(); }
  // The device's default (legacy) stream.
  static Stream cuda_default(int device = 0);
  // A new stream, destroyed with the last copy of this object. It is a blocking stream (it orders
  // with the legacy default stream that stream-less Tensor operations use); overlap between helix's
  // own streams is expressed with events.
  static Stream create(Device device);

  Device device() const { return device_; }
  // cudaStream_t as void*, so that headers need not include CUDA's; nullptr = legacy default stream.
  void* handle() const { return handle_; }
  void synchronize() const;

 private:
  Device device_;
  void* handle_ = nullptr;
  std::shared_ptr<void> owner_;
};

// A CUDA event (timing enabled); on the CPU it records a steady-clock time so benchmarks work alike.
class Event {
 public:
  explicit Event(Device device);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;

  void record(const Stream& stream);
  void wait(const Stream& stream) const;  // make `stream` wait for this event
  void synchronize() const;
  float elapsed_ms(const Event& end) const;  // from this event to `end`

 private:
  Device device_;
  void* event_ = nullptr;
  double cpu_time_ms_ = 0;
};

}  // namespace helix
