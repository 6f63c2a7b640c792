#include "parallel/watchdog.h"

#include <mpi.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/error.h"

namespace helix {

void abort_all(const std::string& message) {
  // Only the first caller (main thread or watchdog) ends the process; MPI_Abort does not return.
  static std::atomic<bool> aborting{false};
  if (aborting.exchange(true)) {
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  const bool mpi_up = initialized && !finalized;
  int rank = -1;
  if (mpi_up) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank >= 0)
    std::fprintf(stderr, "helix: error: rank %d: %s\n", rank, message.c_str());
  else
    std::fprintf(stderr, "helix: error: %s\n", message.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  if (mpi_up) MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);
}

double comm_timeout_from_env(double fallback) {
  const char* env = std::getenv("HELIX_COMM_TIMEOUT_S");
  if (!env || !*env) return fallback;
  char* end = nullptr;
  const double v = std::strtod(env, &end);
  HELIX_CHECK(end && *end == '\0' && std::isfinite(v) && v >= 0,
              "HELIX_COMM_TIMEOUT_S: expected a number of seconds >= 0 (0 disables the watchdog), "
              "got '{}'",
              env);
  return v;
}

Watchdog::Watchdog(WatchdogOptions options) : opts_(options) {
  HELIX_CHECK(opts_.timeout_s >= 0, "watchdog timeout: expected >= 0 s, got {}", opts_.timeout_s);
  HELIX_CHECK(opts_.poll_s > 0, "watchdog poll interval: expected > 0 s, got {}", opts_.poll_s);
  if (enabled()) thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

uint64_t Watchdog::begin(std::string what) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
  pending_.emplace(id, Pending{std::move(what), std::chrono::steady_clock::now(), {}});
  return id;
}

void Watchdog::end(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  pending_.erase(id);
}

void Watchdog::track(std::string what, std::function<bool()> done) {
  if (!enabled()) {
    // No thread polls: wait here would serialise the stream, so drop the tracker (it only watches).
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  pending_.emplace(next_id_++,
                   Pending{std::move(what), std::chrono::steady_clock::now(), std::move(done)});
}

uint64_t Watchdog::add_resource(std::function<std::string()> check, std::function<void()> abort) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
  resources_.emplace(id, Resource{std::move(check), std::move(abort)});
  return id;
}

void Watchdog::remove_resource(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  resources_.erase(id);
}

size_t Watchdog::num_pending() const {
  std::lock_guard<std::mutex> lock(mu_);
  return pending_.size();
}

void Watchdog::fire(const std::string& message) {
  std::vector<std::function<void()>> aborts;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [id, r] : resources_)
      if (r.abort) aborts.push_back(r.abort);
  }
  for (auto& a : aborts) a();
  abort_all(message);
}

void Watchdog::run() {
  const auto poll = std::chrono::duration<double>(opts_.poll_s);
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    cv_.wait_for(lock, poll, [this] { return stop_; });
    if (stop_) break;
    const auto now = std::chrono::steady_clock::now();
    std::string failure;
    for (auto it = pending_.begin(); it != pending_.end();) {
      Pending& p = it->second;
      if (p.done && p.done()) {
        it = pending_.erase(it);
        continue;
      }
      const double waited = std::chrono::duration<double>(now - p.start).count();
      if (failure.empty() && waited > opts_.timeout_s) {
        failure = fmt::format(
            "{} did not finish within {} s (HELIX_COMM_TIMEOUT_S); another rank failed, hangs or "
            "skipped it; aborting every rank",
            p.what, opts_.timeout_s);
      }
      ++it;
    }
    for (auto& [id, r] : resources_) {
      if (!failure.empty()) break;
      if (r.check) failure = r.check();
    }
    if (!failure.empty()) {
      lock.unlock();
      fire(failure);
    }
  }
}

}  // namespace helix
