// Ordered submission for one communicator (the failure contract's queue): queued tasks run one at a
// time on a worker thread, in submission order; an inline call (on the caller's thread, no hop)
// runs only when nothing is queued or running, so both kinds keep one order on every rank; the
// first error of a task or an inline call fails the shared FailureState, after which every queued
// and later operation fails at once with it instead of waiting out its own timeout.
#pragma once
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "failure.h"

namespace fastar {

class WorkQueue {
 public:
  // timeout: each task and inline call is one operation (OpScope): its waits share one deadline,
  // the start plus the timeout's current value (none when null).
  explicit WorkQueue(std::shared_ptr<FailureState> fs, SharedTimeout timeout = nullptr);
  ~WorkQueue();
  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;
  // Runs what was queued before it, then stops the worker. Idempotent.
  void close();
  // Queues task(err) behind everything submitted before it. err is null, or the failure the task
  // must report without running (the queue failed before its turn); an exception thrown by the task
  // fails the state. Throws when the queue was closed.
  void push(std::function<void(std::exception_ptr err)> task);
  // The inline gate. enter_inline: takes the queue and returns true, or returns false when queued
  // work must go first (the caller queues instead); throws when closed or failed. run_inline runs fn
  // as the entered call (its error fails the state and is rethrown), then leaves.
  bool enter_inline();
  void run_inline(const std::function<void()>& fn);
  void leave_inline();

 private:
  void worker_loop();

  std::shared_ptr<FailureState> fs_;
  SharedTimeout timeout_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool busy_ = false;  // a task or an inline call holds the queue
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace fastar
