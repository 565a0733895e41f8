#include "work_queue.h"

#include <stdexcept>

namespace fastar {
namespace {

[[noreturn]] void throw_closed() {
  throw std::runtime_error("fastar: the communicator was closed (fastar.shutdown() was called)");
}

}  // namespace

WorkQueue::WorkQueue(std::shared_ptr<FailureState> fs, SharedTimeout timeout)
    : fs_(std::move(fs)), timeout_(std::move(timeout)) {
  worker_ = std::thread([this] { worker_loop(); });
}

WorkQueue::~WorkQueue() { close(); }

void WorkQueue::close() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void WorkQueue::worker_loop() {
  while (true) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> l(mu_);
      // One operation at a time: an inline call (busy_) finishes first.
      cv_.wait(l, [&] { return !busy_ && (!queue_.empty() || stop_); });
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    task();
    {
      std::lock_guard<std::mutex> g(mu_);
      busy_ = false;
    }
    cv_.notify_all();
  }
}

void WorkQueue::push(std::function<void(std::exception_ptr)> task) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) throw_closed();
    queue_.push_back([this, task = std::move(task)] {
      std::exception_ptr err = fs_->later();
      try {
        OpScope op(timeout_.get(), fs_.get());  // one deadline for every wait of the task
        task(err);
      } catch (...) {
        fs_->fail(std::current_exception());
      }
    });
  }
  cv_.notify_all();
}

bool WorkQueue::enter_inline() {
  std::lock_guard<std::mutex> l(mu_);
  if (stop_) throw_closed();
  if (fs_->failed()) std::rethrow_exception(fs_->later());
  if (!queue_.empty() || busy_) return false;
  busy_ = true;
  return true;
}

void WorkQueue::run_inline(const std::function<void()>& fn) {
  std::exception_ptr e;
  try {
    OpScope op(timeout_.get(), fs_.get());  // one deadline for every wait of the call
    fn();
  } catch (...) {
    e = std::current_exception();
    fs_->fail(e);
  }
  leave_inline();
  if (e) std::rethrow_exception(e);
}

void WorkQueue::leave_inline() {
  bool wake;
  {
    std::lock_guard<std::mutex> g(mu_);
    busy_ = false;
    wake = !queue_.empty() || stop_;  // the worker sleeps otherwise: no wake-up (a system call)
  }
  if (wake) cv_.notify_all();
}

}  // namespace fastar
