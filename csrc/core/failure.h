// The failure contract of one communicator, shared by everything it drives:
//  - one timeout (Timeout), read by every wait at each of its checks, so that set_timeout reaches a
//    wait already in progress; a blocking wait that cannot re-read it (a Gloo receive) registers a
//    waker that interrupts it, and then waits again for what is left;
//  - one failure (FailureState): the first error wins, every arena the communicator drives is
//    marked with its message, so that local peers waiting on this rank raise at once with the real
//    reason instead of each waiting out its own timeout.
#pragma once
#include <atomic>
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
  bool fail(std::exception_ptr e);
  bool failed() const { return failed_.load(std::memory_order_acquire); }
  std::exception_ptr cause() const;
  // What every later operation throws: names the cause.
  std::exception_ptr later() const;
  // Marks `a` on failure (at once when the state failed already). Held weakly: an arena that is
  // gone needs no marking.
  void watch(const std::shared_ptr<ShmArena>& a);

 private:
  mutable std::mutex mu_;
  std::atomic<bool> failed_{false};
  std::exception_ptr cause_, later_;
  std::string why_;
  std::vector<std::weak_ptr<ShmArena>> arenas_;
};

// Keeps memory that a transport may still write into (buffers posted by an operation that failed)
// allocated and reachable for the life of the process.
void keep_forever(std::shared_ptr<void> p);

}  // namespace fastar
