#pragma once
// One error vocabulary for helix: HELIX_CHECK(cond, fmt, ...) throws helix::Error carrying file:line,
// the failing expression and a message that reads "expected X, got Y" and names the input at fault.
// CUDA_CHECK / CUBLAS_CHECK live in core/cuda_check.h, NCCL_CHECK / MPI_CHECK in parallel/checks.h.
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace helix {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
[[noreturn]] void throw_error(const char* file, int line, const char* expr, const std::string& msg);
}  // namespace detail

}  // namespace helix

#define HELIX_CHECK(cond, ...)                                                                    \
  do {                                                                                            \
    if (!(cond)) [[unlikely]] {                                                                   \
      ::helix::detail::throw_error(__FILE__, __LINE__, #cond, ::fmt::format(__VA_ARGS__));        \
    }                                                                                             \
  } while (0)

// For unconditional failures (bad enum value, unreachable switch arm).
#define HELIX_FAIL(...) ::helix::detail::throw_error(__FILE__, __LINE__, "", ::fmt::format(__VA_ARGS__))
