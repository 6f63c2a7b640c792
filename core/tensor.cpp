#include "core/tensor.h"

#include <cstring>

#include "core/allocator.h"
#include "core/cuda_check.h"
#include "core/element.h"
#include "core/tensor_cuda.h"

namespace helix {

// ---- Shape -------------------------------------------------------------------------------------
Shape::Shape(std::initializer_list<int64_t> dims) : Shape(std::vector<int64_t>(dims)) {}
Shape::Shape(const std::vector<int64_t>& dims) {
  HELIX_CHECK(static_cast<int>(dims.size()) <= kMaxDims, "shape: expected at most {} dims, got {}",
              kMaxDims, dims.size());
  n_ = static_cast<int>(dims.size());
  for (int i = 0; i < n_; ++i) {
    HELIX_CHECK(dims[i] >= 0, "shape: expected non-negative sizes, got {} in dim {}", dims[i], i);
    d_[i] = dims[i];
  }
}
int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < n_; ++i) n *= d_[i];
  return n;
}
bool Shape::operator==(const Shape& o) const {
  if (n_ != o.n_) return false;
  for (int i = 0; i < n_; ++i)
    if (d_[i] != o.d_[i]) return false;
  return true;
}
std::string Shape::str() const { return fmt::format("[{}]", fmt::join(vec(), ", ")); }

// ---- Storage -----------------------------------------------------------------------------------
class Storage {
 public:
  Storage(size_t bytes, Device device, void* stream)
      : bytes_(bytes), device_(device), stream_(stream) {
    ptr_ = allocator_for(device).allocate(bytes, stream);
  }
  ~Storage() { allocator_for(device_).deallocate(ptr_, bytes_, stream_); }
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* ptr() const { return ptr_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
  Device device_;
  void* stream_;
};

// ---- Tensor ------------------------------------------------------------------------------------
Tensor Tensor::empty(const Shape& shape, DType dtype, Device device, const Stream& stream) {
  Tensor t;
  t.shape_ = shape;
  t.dtype_ = dtype;
  t.device_ = device;
  t.storage_ = std::make_shared<Storage>(t.nbytes(), device, device.is_cuda() ? stream.handle() : nullptr);
  t.compute_strides();
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device, const Stream& stream) {
  Tensor t = empty(shape, dtype, device, stream);
  t.zero(stream);
  return t;
}

Tensor Tensor::from_floats(const std::vector<float>& values, const Shape& shape, DType dtype, Device device) {
  Tensor f = from_vector(values, shape, Device::cpu());
  Tensor c = dtype == DType::kF32 ? f : f.to(dtype);
  return device.is_cpu() ? c : c.to(device);
}

void Tensor::compute_strides() {
  int64_t s = 1;
  for (int i = shape_.ndim() - 1; i >= 0; --i) {
    strides_[i] = s;
    s *= shape_[i];
  }
}

int64_t Tensor::dim(int i) const {
  const int n = ndim();
  const int j = i < 0 ? i + n : i;
  HELIX_CHECK(j >= 0 && j < n, "tensor {}: dim {} out of range", str(), i);
  return shape_[j];
}

bool Tensor::is_contiguous() const {
  int64_t s = 1;
  for (int i = shape_.ndim() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != s) return false;
    s *= shape_[i];
  }
  return true;
}

std::string Tensor::str() const {
  if (!defined()) return "undefined";
  return fmt::format("{}{} {}", dtype_name(dtype_), shape_.str(), device_.str());
}

void* Tensor::data_ptr() const {
  HELIX_CHECK(defined(), "data access on an undefined tensor");
  return static_cast<char*>(storage_->ptr()) + offset_;
}

Tensor Tensor::slice(int64_t begin, int64_t end) const {
  HELIX_CHECK(ndim() >= 1, "slice of a 0-d tensor {}", str());
  HELIX_CHECK(0 <= begin && begin <= end && end <= shape_[0],
              "slice [{}, {}) out of range for tensor {}", begin, end, str());
  Tensor t = *this;
  t.shape_[0] = end - begin;
  t.offset_ += static_cast<size_t>(begin * strides_[0]) * dtype_size(dtype_);
  return t;
}

Tensor Tensor::view(const Shape& shape) const {
  HELIX_CHECK(shape.numel() == numel(), "view: cannot view {} as {} (numel {} vs {})", str(),
              shape.str(), numel(), shape.numel());
  HELIX_CHECK(is_contiguous(), "view of a non-contiguous tensor {}", str());
  Tensor t = *this;
  t.shape_ = shape;
  t.compute_strides();
  return t;
}

namespace {
[[maybe_unused]] void* raw(const Stream& s) { return s.handle(); }
}  // namespace

void Tensor::copy_from(const Tensor& src, const Stream& stream) {
  HELIX_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_, "copy_from: expected {}, got {}", str(), src.str());
  if (nbytes() == 0) return;
  if (is_cpu() && src.is_cpu()) {
    std::memmove(data_ptr(), src.data_ptr(), nbytes());
    return;
  }
#if HELIX_WITH_CUDA
  cudaStream_t st = static_cast<cudaStream_t>(raw(stream));
  const cudaMemcpyKind kind = is_cpu() ? cudaMemcpyDeviceToHost
                              : src.is_cpu() ? cudaMemcpyHostToDevice
                                             : cudaMemcpyDeviceToDevice;
  CUDA_CHECK(cudaMemcpyAsync(data_ptr(), src.data_ptr(), nbytes(), kind, st));
  if (kind != cudaMemcpyDeviceToDevice) CUDA_CHECK(cudaStreamSynchronize(st));
#else
  HELIX_FAIL("copy between {} and {} needs CUDA, but helix was built without it", src.str(), str());
#endif
}

Tensor Tensor::to(Device device, const Stream& stream) const {
  Tensor t = empty(shape_, dtype_, device, stream);
  t.copy_from(*this, stream);
  return t;
}

Tensor Tensor::clone(const Stream& stream) const { return to(device_, stream); }

double cpu_value(const Tensor& t, int64_t i) { return detail::load_element(t.data_ptr(), t.dtype(), i); }

namespace {
void cpu_store(void* p, DType dt, int64_t i, double v) { detail::store_element(p, dt, i, v); }
}  // namespace

Tensor Tensor::to(DType dtype, const Stream& stream) const {
  if (dtype == dtype_) return clone(stream);
  Tensor t = empty(shape_, dtype, device_, stream);
  const int64_t n = numel();
  if (is_cpu()) {
    // Float sources go through float (as CUDA's conversions do), so fp8/bf16 rounding is identical.
    const void* s = data_ptr();
    void* d = t.data_ptr();
    const bool via_float = dtype_is_float(dtype_) && dtype_ != DType::kF64 && dtype != DType::kF64;
    for (int64_t i = 0; i < n; ++i) {
      double v = cpu_value(*this, i);
      if (via_float) v = static_cast<float>(v);
      cpu_store(d, dtype, i, v);
    }
    (void)s;
    return t;
  }
  detail::cuda_convert(data_ptr(), dtype_, t.data_ptr(), dtype, n, stream.handle());
  return t;
}

void Tensor::fill(double value, const Stream& stream) {
  const int64_t n = numel();
  if (is_cpu()) {
    void* d = data_ptr();
    for (int64_t i = 0; i < n; ++i) cpu_store(d, dtype_, i, value);
    return;
  }
  detail::cuda_fill(data_ptr(), dtype_, n, value, stream.handle());
}

void Tensor::zero(const Stream& stream) {
  if (nbytes() == 0) return;
  if (is_cpu()) {
    std::memset(data_ptr(), 0, nbytes());
    return;
  }
#if HELIX_WITH_CUDA
  CUDA_CHECK(cudaMemsetAsync(data_ptr(), 0, nbytes(), static_cast<cudaStream_t>(stream.handle())));
#endif
}

std::vector<float> Tensor::to_floats() const {
  HELIX_CHECK(dtype_is_float(dtype_) || dtype_ == DType::kI32, "to_floats: tensor {} is not a float tensor", str());
  Tensor host = is_cpu() ? *this : to(Device::cpu());
  std::vector<float> out(static_cast<size_t>(numel()));
  for (int64_t i = 0; i < numel(); ++i) out[i] = static_cast<float>(cpu_value(host, i));
  return out;
}

}  // namespace helix
