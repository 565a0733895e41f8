#include "failure.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "shm.h"

namespace fastar {

std::string what_of(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown error";
  }
}

void Timeout::check(double s) {
  if (!std::isfinite(s) || s <= 0 || s > kMaxSeconds)
    throw std::invalid_argument("fastar: a timeout must be a positive number of seconds, at most " +
                                std::to_string((int64_t)kMaxSeconds) + " (365 days); got " + std::to_string(s));
}

void Timeout::set(double s) {
  check(s);
  s_.store(s, std::memory_order_relaxed);
  std::lock_guard<std::mutex> g(mu_);
  for (auto& kv : wakers_) kv.second();
}

uint64_t Timeout::add_waker(std::function<void()> f) {
  std::lock_guard<std::mutex> g(mu_);
  wakers_.emplace(++next_, std::move(f));
  return next_;
}

void Timeout::remove_waker(uint64_t id) {
  std::lock_guard<std::mutex> g(mu_);
  wakers_.erase(id);
}

bool FailureState::fail(std::exception_ptr e) {
  std::vector<std::shared_ptr<ShmArena>> mark;
  std::string why;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (cause_ || !e) return false;
    cause_ = e;
    why_ = why = what_of(e);
    later_ = std::make_exception_ptr(std::runtime_error(
        "fastar: an earlier collective failed, so this one was not run (call fastar.shutdown() and then "
        "fastar.init() to start again). The first error:\n" + why));
    failed_.store(true, std::memory_order_release);
    for (auto& w : arenas_)
      if (auto a = w.lock()) mark.push_back(std::move(a));
  }
  for (auto& a : mark) a->mark_failed(why);
  return true;
}

std::exception_ptr FailureState::cause() const {
  std::lock_guard<std::mutex> g(mu_);
  return cause_;
}

std::exception_ptr FailureState::later() const {
  std::lock_guard<std::mutex> g(mu_);
  return later_;
}

void FailureState::watch(const std::shared_ptr<ShmArena>& a) {
  std::string why;
  {
    std::lock_guard<std::mutex> g(mu_);
    arenas_.erase(std::remove_if(arenas_.begin(), arenas_.end(), [](const auto& w) { return w.expired(); }),
                  arenas_.end());
    arenas_.push_back(a);
    if (!cause_) return;
    why = why_;
  }
  a->mark_failed(why);
}

void keep_forever(std::shared_ptr<void> p) {
  static std::mutex mu;
  static auto* kept = new std::vector<std::shared_ptr<void>>();  // reachable: not a leak to report
  std::lock_guard<std::mutex> g(mu);
  kept->push_back(std::move(p));
}

}  // namespace fastar
