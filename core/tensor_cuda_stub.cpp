// CPU-only build: the Tensor's CUDA kernels do not exist; reaching them is a usage error.
#include "core/error.h"
#include "core/tensor_cuda.h"

#if !HELIX_WITH_CUDA
namespace helix::detail {
void cuda_fill(void*, DType, int64_t, double, void*) {
  HELIX_FAIL("CUDA tensor operation requested, but helix was built without CUDA");
}
void cuda_convert(const void*, DType, void*, DType, int64_t, void*) {
  HELIX_FAIL("CUDA tensor operation requested, but helix was built without CUDA");
}
}  // namespace helix::detail
#endif
