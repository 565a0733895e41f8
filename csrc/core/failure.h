// The failure contract of one communicator, shared by everything it drives:
//  - one timeout (Timeout), read by every wait at each of its checks, so that set_timeout reaches a
//    wait already in progress; a blocking wait that cannot re-read it (a Gloo receive) registers a
//    waker that interrupts it, and then waits again for what is left;
//  - one failure (FailureState): the first error wins, every arena the communicator drives is
//    marked with its message, so that local peers waiting on this rank raise at once with the real
//    reason instead of each waiting out its own timeout; its wakers then run (the waits in progress
//    stop, the transports send the reason to their remote peers);
//  - one deadline per operation (OpContext): the start of the operation plus the timeout's current
//    value, read by every wait in it, so that an operation with k waits raises within one timeout.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fastar {

class ShmArena;

// The message of an exception (for the failure flag local peers read).
std::string what_of(std::exception_ptr e);

class Timeout {
 public:
  explicit Timeout(double s) { set(s); }
  double seconds() const { return s_.load(std::memory_order_relaxed); }
  // Throws std::invalid_argument for zero, negative, non-finite or absurd (over kMaxSeconds) values;
  // then wakes every registered waiter, which re-reads the timeout.
  void set(double s);
  static void check(double s);
  static constexpr double kMaxSeconds = 365.0 * 24 * 3600;
  // A waker for a wait in progress (called under this object's lock, so it may not outlive the
  // wait: remove_waker returns only once no call of it is running).
  uint64_t add_waker(std::function<void()> f);
  void remove_waker(uint64_t id);

 private:
  std::atomic<double> s_{0};
  std::mutex mu_;
  uint64_t next_ = 0;
  std::map<uint64_t, std::function<void()>> wakers_;
};
using SharedTimeout = std::shared_ptr<Timeout>;

class FailureState {
 public:
  // The first error is the cause: returns false (doing nothing) when the state had failed already.
  // Marks the watched arenas, then calls every waker with the cause's message.
  bool fail(std::exception_ptr e);
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  std::exception_ptr cause() const;
  // What every later operation throws: names the cause.
  std::exception_ptr later() const;
  // Marks `a` on failure (at once when the state failed already). Held weakly: an arena that is
  // gone needs no marking.
  void watch(const std::shared_ptr<ShmArena>& a);
  // Called once, on the first failure, with its message (a wait in progress stops; a transport
  // sends the reason to its peers). Called under a lock of its own: remove_waker returns only
  // once no call of it is running. A waker added after the failure is never called: register,
  // then check failed().
  uint64_t add_waker(std::function<void(const std::string&)> f);
  void remove_waker(uint64_t id);

 private:
  std::mutex wake_mu_;
  uint64_t next_ = 0;
  std::map<uint64_t, std::function<void(const std::string&)>> wakers_;
  mutable std::mutex mu_;
  std::atomic<bool> failed_{false};
  std::exception_ptr cause_, later_;
  std::string why_;
  std::vector<std::weak_ptr<ShmArena>> arenas_;
};

// The operation a thread runs (issue 24's one deadline): an allreduce inline or queued, a halves
// call, a bucket of fastar.wrap, with their header exchange. Its waits (the arena's flag and futex
// waits, the transports' waits) wait until start + the timeout's current value at most, so that an
// operation with k waits raises within one timeout and set_timeout still reaches it at once; and
// they stop when the failure state fails (a wait woken by a waker). A wait outside any operation
// (the C++ tests' bare arenas) times itself from its own start.
struct OpContext {
  using Clock = std::chrono::steady_clock;
  const Timeout* timeout = nullptr;
  FailureState* failure = nullptr;
  Clock::time_point start{};  // unset (the epoch): starts at the first wait that blocks
  // Seconds of the operation at `now`; a lazy start begins at `wait_start`.
  double elapsed(Clock::time_point now, Clock::time_point wait_start) {
    if (start == Clock::time_point{}) start = wait_start;
    return std::chrono::duration<double>(now - start).count();
  }
  double seconds() const { return timeout->seconds(); }
  // The calling thread's operation, or null.
  static OpContext* current();
};

// Makes an operation current on this thread for its life (then restores the previous one). An
// operation inside another keeps the outer one's deadline. lazy: the clock is read at the first
// wait that blocks, not now (the latency path: no clock read when nothing waits).
class OpScope {
 public:
  OpScope(const Timeout* t, FailureState* f, bool lazy = false);
  // Carries an operation over to another thread (the driver's network worker): same deadline.
  explicit OpScope(const OpContext* c);
  ~OpScope();
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

 private:
  OpContext ctx_;
  OpContext* prev_;
  bool set_ = false;
};

// One thread for the process that calls fn at a time point (a transport's wait ends at its
// operation's deadline without the transport's own timeout firing: Gloo's breaks the whole group).
// remove returns only once no call of fn is running.
namespace alarm {
uint64_t add(std::chrono::steady_clock::time_point when, std::function<void()> fn);
void remove(uint64_t id);
}  // namespace alarm

// Keeps memory that a transport may still write into (buffers posted by an operation that failed)
// allocated and reachable for the life of the process.
void keep_forever(std::shared_ptr<void> p);

}  // namespace fastar
