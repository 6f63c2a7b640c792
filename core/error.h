#pragma once
// One error vocabulary for helix: HELIX_CHECK(cond, fmt, ...) throws helix::Error carrying file:line,
// the failing expression and a message that reads "expected X, got Y" and names the input at fault.
// CUDA_CHECK / CUBLAS_CHECK live in core/cuda_check.h, NCCL_CHECK / MPI_CHECK in parallel/checks.h.
// Messages are formatted at run time: fmt's headers do not compile under nvcc in C++20 mode, so .cu
// files get a small formatter that fills plain "{}" placeholders (no format specs there).
#include <stdexcept>
#include <string>
#include <string_view>

#if !defined(__CUDACC__)
#include <fmt/format.h>
#else
#include <sstream>
#include <type_traits>
#endif

namespace helix {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
[[noreturn]] void throw_error(const char* file, int line, const char* expr, const std::string& msg);

#if !defined(__CUDACC__)
template <typename... Args>
std::string format_message(std::string_view f, const Args&... args) {
  return fmt::vformat(f, fmt::make_format_args(args...));
}
#else
template <typename T>
std::string to_message_piece(const T& v) {
  if constexpr (std::is_convertible_v<const T&, std::string_view>) {
    return std::string(std::string_view(v));
  } else {
    std::ostringstream os;
    if constexpr (std::is_same_v<T, unsigned char> || std::is_same_v<T, signed char>) os << int(v);
    else os << v;
    return os.str();
  }
}
template <typename... Args>
std::string format_message(std::string_view f, const Args&... args) {
  const std::string pieces[] = {std::string(), to_message_piece(args)...};
  std::string out;
  size_t next = 1;
  for (size_t i = 0; i < f.size(); ++i) {
    if (f[i] == '{' && i + 1 < f.size() && f[i + 1] == '{') { out += '{'; ++i; continue; }
    if (f[i] == '}' && i + 1 < f.size() && f[i + 1] == '}') { out += '}'; ++i; continue; }
    if (f[i] == '{') {
      const size_t close = f.find('}', i);
      if (close == std::string_view::npos) break;
      if (next < sizeof...(Args) + 1) out += pieces[next++];
      i = close;
      continue;
    }
    out += f[i];
  }
  return out;
}
#endif
}  // namespace detail

}  // namespace helix

#define HELIX_CHECK(cond, ...)                                                                    \
  do {                                                                                            \
    if (!(cond)) [[unlikely]] {                                                                   \
      ::helix::detail::throw_error(__FILE__, __LINE__, #cond,                                     \
                                   ::helix::detail::format_message(__VA_ARGS__));                 \
    }                                                                                             \
  } while (0)

// For unconditional failures (bad enum value, unreachable switch arm).
#define HELIX_FAIL(...) \
  ::helix::detail::throw_error(__FILE__, __LINE__, "", ::helix::detail::format_message(__VA_ARGS__))
