#pragma once
// Logging through fmt with the rank in the prefix: "[helix r3 I] message". The rank is a label set
// once at start-up by the launcher (it carries no parallel state). HELIX_LOG_LEVEL=debug|info|warn|error.
#include <fmt/format.h>

#include <string>

namespace helix {

enum class LogLevel { kDebug, kInfo, kWarn, kError };

void set_log_rank(int rank);
void set_log_level(LogLevel level);
LogLevel log_level();
void log_message(LogLevel level, const std::string& msg);

template <typename... Args>
void log_debug(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() <= LogLevel::kDebug) log_message(LogLevel::kDebug, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void log_info(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() <= LogLevel::kInfo) log_message(LogLevel::kInfo, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void log_warn(fmt::format_string<Args...> f, Args&&... args) {
  if (log_level() <= LogLevel::kWarn) log_message(LogLevel::kWarn, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void log_error(fmt::format_string<Args...> f, Args&&... args) {
  log_message(LogLevel::kError, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace helix
