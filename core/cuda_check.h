#pragma once
// CUDA_CHECK / CUBLAS_CHECK / HELIX_LAUNCH_CHECK: turn CUDA and cuBLASLt status codes into helix::Error
// with file:line and the failing expression. Only compiled into CUDA builds.
#include "core/error.h"

#if HELIX_WITH_CUDA
#include <cublasLt.h>
#include <cuda_runtime.h>

#define CUDA_CHECK(expr)                                                                          \
  do {                                                                                            \
    cudaError_t helix_status_ = (expr);                                                           \
    if (helix_status_ != cudaSuccess) [[unlikely]] {                                              \
      ::helix::detail::throw_error(__FILE__, __LINE__, #expr,                                     \
                                   ::helix::detail::format_message("CUDA error {}: {}",                             \
                                                 cudaGetErrorName(helix_status_),                 \
                                                 cudaGetErrorString(helix_status_)));             \
    }                                                                                             \
  } while (0)

#define CUBLAS_CHECK(expr)                                                                        \
  do {                                                                                            \
    cublasStatus_t helix_status_ = (expr);                                                        \
    if (helix_status_ != CUBLAS_STATUS_SUCCESS) [[unlikely]] {                                    \
      ::helix::detail::throw_error(__FILE__, __LINE__, #expr,                                     \
                                   ::helix::detail::format_message("cuBLAS error {} ({})",                          \
                                                 cublasLtGetStatusName(helix_status_),            \
                                                 static_cast<int>(helix_status_)));               \
    }                                                                                             \
  } while (0)

// After every kernel launch: catches bad launch configurations at the launch site.
#define HELIX_LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())
#endif
