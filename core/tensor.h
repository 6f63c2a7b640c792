#pragma once
// Tensor: a shape, contiguous row-major strides, a dtype, a device and shared owning storage from the
// device's allocator. Views along the first dimension (slice) and reshapes (view) share storage, so
// packed THD activations [T, hidden] can be cut per sequence or per micro-batch without copies.
// Kernels take tensors and an explicit Stream; the Tensor itself does only copies, fills and casts.
#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/convert.h"
#include "core/device.h"
#include "core/dtype.h"
#include "core/error.h"

namespace helix {

class Shape {
 public:
  static constexpr int kMaxDims = 6;
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  explicit Shape(const std::vector<int64_t>& dims);

  int ndim() const { return n_; }
  int64_t operator[](int i) const { return d_[static_cast<size_t>(i)]; }
  int64_t& operator[](int i) { return d_[static_cast<size_t>(i)]; }
  int64_t numel() const;
  std::vector<int64_t> vec() const { return {d_.begin(), d_.begin() + n_}; }
  bool operator==(const Shape& o) const;
  std::string str() const;  // "[71, 229]"

 private:
  std::array<int64_t, kMaxDims> d_{};
  int n_ = 0;
};

template <typename T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::kF32;
  else if constexpr (std::is_same_v<T, bf16_t>) return DType::kBF16;
  else if constexpr (std::is_same_v<T, e4m3_t>) return DType::kE4M3;
  else if constexpr (std::is_same_v<T, e5m2_t>) return DType::kE5M2;
  else if constexpr (std::is_same_v<T, int32_t>) return DType::kI32;
  else if constexpr (std::is_same_v<T, int64_t>) return DType::kI64;
  else if constexpr (std::is_same_v<T, uint8_t>) return DType::kU8;
  else if constexpr (std::is_same_v<T, double>) return DType::kF64;
  else static_assert(sizeof(T) == 0, "no helix DType for this C++ type");
}

class Storage;

class Tensor {
 public:
  Tensor() = default;  // undefined tensor (no storage)

  // Uninitialised memory. `stream` is the CUDA stream the tensor will be used on (allocator reuse).
  static Tensor empty(const Shape& shape, DType dtype, Device device = Device::cpu(),
                      const Stream& stream = Stream());
  static Tensor zeros(const Shape& shape, DType dtype, Device device = Device::cpu(),
                      const Stream& stream = Stream());
  // Host values converted to `dtype` (rounded as CUDA rounds), placed on `device`.
  static Tensor from_floats(const std::vector<float>& values, const Shape& shape, DType dtype,
                            Device device = Device::cpu());
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape,
                            Device device = Device::cpu());

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return shape_.ndim(); }
  int64_t dim(int i) const;  // negative i counts from the end
  const std::array<int64_t, Shape::kMaxDims>& strides() const { return strides_; }
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool is_cpu() const { return device_.is_cpu(); }
  bool is_cuda() const { return device_.is_cuda(); }
  bool is_contiguous() const;
  std::string str() const;  // "bf16[71, 229] cuda:0"

  void* data_ptr() const;
  template <typename T>
  T* data() const {
    HELIX_CHECK(dtype_ == dtype_of<T>(), "tensor {}: expected dtype {}, got {}", str(),
                dtype_name(dtype_of<T>()), dtype_name(dtype_));
    return static_cast<T*>(data_ptr());
  }

  // Rows [begin, end) of the first dimension, sharing storage.
  Tensor slice(int64_t begin, int64_t end) const;
  // Same elements, another shape (numel must match), sharing storage.
  Tensor view(const Shape& shape) const;

  // Copies. `stream` orders the copy on CUDA; copies that touch the host synchronise it.
  Tensor to(Device device, const Stream& stream = Stream()) const;
  Tensor to(DType dtype, const Stream& stream = Stream()) const;  // element conversion
  Tensor clone(const Stream& stream = Stream()) const;
  void copy_from(const Tensor& src, const Stream& stream = Stream());  // same shape and dtype

  // Sets every element to `value` converted to the dtype.
  void fill(double value, const Stream& stream = Stream());
  void zero(const Stream& stream = Stream());

  // Host copy of the elements as floats (any float dtype), for tests and diagnostics.
  std::vector<float> to_floats() const;
  template <typename T>
  std::vector<T> to_vector() const;

  // True when two tensors share storage (views of one another).
  bool shares_storage(const Tensor& o) const { return storage_ == o.storage_; }

 private:
  void compute_strides();

  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes from the start of storage
  Shape shape_;
  std::array<int64_t, Shape::kMaxDims> strides_{};
  DType dtype_ = DType::kF32;
  Device device_;
};

template <typename T>
Tensor Tensor::from_vector(const std::vector<T>& values, const Shape& shape, Device device) {
  HELIX_CHECK(static_cast<int64_t>(values.size()) == shape.numel(),
              "from_vector: expected {} values for shape {}, got {}", shape.numel(), shape.str(),
              values.size());
  Tensor host = empty(shape, dtype_of<T>(), Device::cpu());
  if (!values.empty()) std::memcpy(host.data_ptr(), values.data(), host.nbytes());
  return device.is_cpu() ? host : host.to(device);
}

template <typename T>
std::vector<T> Tensor::to_vector() const {
  HELIX_CHECK(dtype_ == dtype_of<T>(), "to_vector: tensor {} is not {}", str(), dtype_name(dtype_of<T>()));
  Tensor host = is_cpu() ? *this : to(Device::cpu());
  std::vector<T> out(static_cast<size_t>(numel()));
  if (!out.empty()) std::memcpy(out.data(), host.data_ptr(), host.nbytes());
  return out;
}

// Elementwise float value of element i of a CPU tensor of any float dtype (tests, references).
double cpu_value(const Tensor& t, int64_t i);

}  // namespace helix
