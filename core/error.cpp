#include "core/error.h"

#include <cstring>

namespace helix::detail {

void throw_error(const char* file, int line, const char* expr, const std::string& msg) {
  const char* base = std::strrchr(file, '/');
  base = base ? base + 1 : file;
  if (expr && *expr) throw Error(fmt::format("{} [{}:{}: {}]", msg, base, line, expr));
  throw Error(fmt::format("{} [{}:{}]", msg, base, line));
}

}  // namespace helix::detail
