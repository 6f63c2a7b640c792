#include "core/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace helix {
namespace {

LogLevel level_from_env() {
  const char* v = std::getenv("HELIX_LOG_LEVEL");
  if (!v) return LogLevel::kInfo;
  if (!std::strcmp(v, "debug")) return LogLevel::kDebug;
  if (!std::strcmp(v, "warn")) return LogLevel::kWarn;
  if (!std::strcmp(v, "error")) return LogLevel::kError;
  return LogLevel::kInfo;
}

std::atomic<int> g_rank{-1};
std::atomic<LogLevel> g_level{level_from_env()};
std::mutex g_mutex;

}  // namespace

void set_log_rank(int rank) { g_rank = rank; }
void set_log_level(LogLevel level) { g_level = level; }
LogLevel log_level() { return g_level; }

void log_message(LogLevel level, const std::string& msg) {
  static constexpr char kTag[] = {'D', 'I', 'W', 'E'};
  const int rank = g_rank;
  std::string line = rank >= 0 ? fmt::format("[helix r{} {}] {}\n", rank, kTag[int(level)], msg)
                               : fmt::format("[helix {}] {}\n", kTag[int(level)], msg);
  std::lock_guard<std::mutex> lock(g_mutex);
  std::fputs(line.c_str(), level >= LogLevel::kWarn ? stderr : stdout);
  std::fflush(level >= LogLevel::kWarn ? stderr : stdout);
}

}  // namespace helix
