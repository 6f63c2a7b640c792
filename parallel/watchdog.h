#pragma once
// How a failing rank ends the whole job instead of leaving the others hanging in a collective:
// abort_all(message) prints one line and calls MPI_Abort; a Watchdog thread aborts the job when a
// collective does not finish within the timeout (HELIX_COMM_TIMEOUT_S, default 600 s, 0 = off) or a
// registered resource reports a failure (NCCL's asynchronous errors), naming the collective and
// group.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>

namespace helix {

// Prints "helix: error: rank R: <message>" on stderr and ends every rank of the job (MPI_Abort on
// MPI_COMM_WORLD; a plain exit(1) when MPI is not running). For the CLI's top-level catch and the
// watchdog. Safe to call from any thread; a second concurrent call waits for the first.
[[noreturn]] void abort_all(const std::string& message);

// Seconds from HELIX_COMM_TIMEOUT_S (a number >= 0; 0 disables the watchdog), else `fallback`.
double comm_timeout_from_env(double fallback = 600.0);

struct WatchdogOptions {
  double timeout_s =
      600.0;            // a collective in flight longer than this aborts the job; 0 = no thread
  double poll_s = 0.1;  // how often the thread looks
  int world_rank = 0;   // for the message
};

class Watchdog {
 public:
  explicit Watchdog(WatchdogOptions options);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  bool enabled() const { return opts_.timeout_s > 0; }
  double timeout_s() const { return opts_.timeout_s; }

  // A blocking host-side operation (an MPI call): begin before, end after it returned.
  uint64_t begin(std::string what);
  void end(uint64_t id);
  // An operation enqueued on a device stream (a NCCL call): `done` is polled from the watchdog
  // thread until it returns true, then destroyed (so it can own a CUDA event).
  void track(std::string what, std::function<bool()> done);

  // A resource checked on every poll: `check` returns a non-empty message when it failed (e.g. a
  // NCCL communicator's async error); `abort` is called on every registered resource before the job
  // is aborted for any reason (e.g. ncclCommAbort, so no kernel keeps spinning).
  uint64_t add_resource(std::function<std::string()> check, std::function<void()> abort);
  void remove_resource(uint64_t id);

  // Operations in flight (tests).
  size_t num_pending() const;

 private:
  struct Pending {
    std::string what;
    std::chrono::steady_clock::time_point start;
    std::function<bool()> done;  // empty for host-side operations
  };
  struct Resource {
    std::function<std::string()> check;
    std::function<void()> abort;
  };
  void run();
  [[noreturn]] void fire(const std::string& message);

  WatchdogOptions opts_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  uint64_t next_id_ = 1;
  std::map<uint64_t, Pending> pending_;
  std::map<uint64_t, Resource> resources_;
  std::thread thread_;
};

// RAII: a blocking operation watched for its whole scope (no-op with a null watchdog).
class WatchScope {
 public:
  WatchScope(Watchdog* dog, std::string what) : dog_(dog) {
    if (dog_ && dog_->enabled()) id_ = dog_->begin(std::move(what));
  }
  ~WatchScope() {
    if (id_) dog_->end(id_);
  }
  WatchScope(const WatchScope&) = delete;
  WatchScope& operator=(const WatchScope&) = delete;

 private:
  Watchdog* dog_;
  uint64_t id_ = 0;
};

}  // namespace helix
