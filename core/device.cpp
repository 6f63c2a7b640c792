#include "core/device.h"

#include <chrono>

#include "core/cuda_check.h"
#include "core/error.h"

namespace helix {

std::string Device::str() const { return is_cpu() ? "cpu" : fmt::format("cuda:{}", index); }

#if HELIX_WITH_CUDA
namespace {
struct CudaProbe {
  int count = 0;
  std::string reason;
  CudaProbe() {
    cudaError_t st = cudaGetDeviceCount(&count);
    if (st != cudaSuccess) {
      reason = fmt::format("no CUDA device ({})", cudaGetErrorString(st));
      count = 0;
      cudaGetLastError();  // clear the sticky error of the failed probe
    } else if (count == 0) {
      reason = "no CUDA device";
    }
  }
};
const CudaProbe& probe() {
  static const CudaProbe p;
  return p;
}
}  // namespace

int cuda_device_count() { return probe().count; }
void set_current_device(Device device) {
  if (device.is_cuda()) CUDA_CHECK(cudaSetDevice(device.index));
}
std::string cuda_unavailable_reason() { return probe().reason; }
int cuda_compute_capability(int device) {
  cudaDeviceProp prop;
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.major * 10 + prop.minor;
}

int cuda_sm_count(int device) {
  int n = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  return n;
}

Stream Stream::cuda_default(int device) {
  Stream s;
  s.device_ = Device::cuda(device);
  return s;
}

Stream Stream::create(Device device) {
  if (device.is_cpu()) return Stream();
  CUDA_CHECK(cudaSetDevice(device.index));
  cudaStream_t st;
  // Blocking streams: they synchronise with the legacy default stream, which Tensor operations
  // called without a stream use, so mixing the two never races.
  CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamDefault));
  Stream s;
  s.device_ = device;
  s.handle_ = st;
  s.owner_ = std::shared_ptr<void>(st, [](void* p) { cudaStreamDestroy(static_cast<cudaStream_t>(p)); });
  return s;
}

void Stream::synchronize() const {
  if (device_.is_cuda()) CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(handle_)));
}

Event::Event(Device device) : device_(device) {
  if (device.is_cuda()) {
    cudaEvent_t e;
    CUDA_CHECK(cudaEventCreate(&e));
    event_ = e;
  }
}
Event::~Event() {
  if (event_) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
}
void Event::record(const Stream& stream) {
  if (event_) {
    CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event_), static_cast<cudaStream_t>(stream.handle())));
  } else {
    cpu_time_ms_ = std::chrono::duration<double, std::milli>(
                       std::chrono::steady_clock::now().time_since_epoch()).count();
  }
}
void Event::wait(const Stream& stream) const {
  if (event_ && stream.device().is_cuda())
    CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream.handle()), static_cast<cudaEvent_t>(event_), 0));
}
void Event::synchronize() const {
  if (event_) CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)));
}
float Event::elapsed_ms(const Event& end) const {
  if (event_) {
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(event_), static_cast<cudaEvent_t>(end.event_)));
    return ms;
  }
  return static_cast<float>(end.cpu_time_ms_ - cpu_time_ms_);
}

#else  // CPU-only build

int cuda_device_count() { return 0; }
void set_current_device(Device device) {
  HELIX_CHECK(device.is_cpu(), "CUDA requested, but helix was built without CUDA");
}
std::string cuda_unavailable_reason() { return "CPU-only build (HELIX_CUDA=OFF)"; }
int cuda_compute_capability(int) { HELIX_FAIL("CUDA requested, but helix was built without CUDA"); }
int cuda_sm_count(int) { HELIX_FAIL("CUDA requested, but helix was built without CUDA"); }
Stream Stream::cuda_default(int) { HELIX_FAIL("CUDA requested, but helix was built without CUDA"); }
Stream Stream::create(Device device) {
  HELIX_CHECK(device.is_cpu(), "CUDA requested, but helix was built without CUDA");
  return Stream();
}
void Stream::synchronize() const {}
Event::Event(Device device) : device_(device) {
  HELIX_CHECK(device.is_cpu(), "CUDA requested, but helix was built without CUDA");
}
Event::~Event() = default;
void Event::record(const Stream&) {
  cpu_time_ms_ = std::chrono::duration<double, std::milli>(
                     std::chrono::steady_clock::now().time_since_epoch()).count();
}
void Event::wait(const Stream&) const {}
void Event::synchronize() const {}
float Event::elapsed_ms(const Event& end) const { return static_cast<float>(end.cpu_time_ms_ - cpu_time_ms_); }

#endif

}  // namespace helix
