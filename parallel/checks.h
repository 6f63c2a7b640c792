#pragma once
// MPI_CHECK / NCCL_CHECK: turn MPI and NCCL status codes into helix::Error with file:line and the
// failing expression. MPI calls only return codes when the communicator's error handler is
// MPI_ERRORS_RETURN, which helix sets on every communicator it creates (and on MPI_COMM_WORLD in
// MpiSession); the CLI's top-level catch then aborts every rank (abort_all).
#include <mpi.h>

#include <string>

#include "core/error.h"

#if HELIX_WITH_NCCL
#include <nccl.h>
#endif

namespace helix::detail {

// "MPI_ERR_RANK: invalid rank" for an MPI return code.
inline std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, text, &len) != MPI_SUCCESS)
    return "unknown MPI error " + std::to_string(code);
  int cls = 0;
  MPI_Error_class(code, &cls);
  char cls_text[MPI_MAX_ERROR_STRING];
  int cls_len = 0;
  if (cls != code && MPI_Error_string(cls, cls_text, &cls_len) == MPI_SUCCESS)
    return std::string(text, static_cast<size_t>(len)) +
           " (class: " + std::string(cls_text, static_cast<size_t>(cls_len)) + ")";
  return std::string(text, static_cast<size_t>(len));
}

}  // namespace helix::detail

#define MPI_CHECK(expr)                                                                       \
  do {                                                                                        \
    const int helix_mpi_rc_ = (expr);                                                         \
    if (helix_mpi_rc_ != MPI_SUCCESS) [[unlikely]] {                                          \
      ::helix::detail::throw_error(                                                           \
          __FILE__, __LINE__, #expr,                                                          \
          ::helix::detail::format_message("MPI error {}: {}", helix_mpi_rc_,                  \
                                          ::helix::detail::mpi_error_string(helix_mpi_rc_))); \
    }                                                                                         \
  } while (0)

#if HELIX_WITH_NCCL
#define NCCL_CHECK(expr)                                                            \
  do {                                                                              \
    const ncclResult_t helix_nccl_rc_ = (expr);                                     \
    if (helix_nccl_rc_ != ncclSuccess) [[unlikely]] {                               \
      const char* helix_nccl_last_ = ncclGetLastError(nullptr);                     \
      ::helix::detail::throw_error(                                                 \
          __FILE__, __LINE__, #expr,                                                \
          ::helix::detail::format_message(                                          \
              "NCCL error {}: {}{}{}", static_cast<int>(helix_nccl_rc_),            \
              ncclGetErrorString(helix_nccl_rc_),                                   \
              (helix_nccl_last_ != nullptr && *helix_nccl_last_ != 0) ? " - " : "", \
              helix_nccl_last_ ? helix_nccl_last_ : ""));                           \
    }                                                                               \
  } while (0)
#endif
