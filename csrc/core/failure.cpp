#include "failure.h"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <stdexcept>
#include <thread>

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
  std::lock_guard<std::mutex> g(wake_mu_);  // failed_ is set: a waker added from now on is not called
  for (auto& kv : wakers_) kv.second(why);
  return true;
}

uint64_t FailureState::add_waker(std::function<void(const std::string&)> f) {
  std::lock_guard<std::mutex> g(wake_mu_);
  wakers_.emplace(++next_, std::move(f));
  return next_;
}

void FailureState::remove_waker(uint64_t id) {
  std::lock_guard<std::mutex> g(wake_mu_);
  wakers_.erase(id);
}

namespace {
thread_local OpContext* current_op = nullptr;
}  // namespace

OpContext* OpContext::current() { return current_op; }

OpScope::OpScope(const Timeout* t, FailureState* f, bool lazy) : prev_(current_op) {
  if (prev_ || !t) return;  // inside an operation: its deadline holds
  ctx_.timeout = t;
  ctx_.failure = f;
  if (!lazy) ctx_.start = OpContext::Clock::now();
  current_op = &ctx_;
  set_ = true;
}

OpScope::OpScope(const OpContext* c) : prev_(current_op) {
  if (prev_ || !c) return;
  ctx_ = *c;
  current_op = &ctx_;
  set_ = true;
}

OpScope::~OpScope() {
  if (set_) current_op = prev_;
}

namespace alarm {
namespace {

struct Alarms {
  std::mutex mu;       // the schedule
  std::mutex call_mu;  // held while an alarm's fn runs (remove waits for it)
  std::condition_variable cv;
  uint64_t next = 0;
  std::map<std::pair<std::chrono::steady_clock::time_point, uint64_t>, std::function<void()>> due;
  std::map<uint64_t, std::chrono::steady_clock::time_point> when;

  void loop() {
    std::unique_lock<std::mutex> l(mu);
    while (true) {
      if (due.empty()) {
        cv.wait(l);
        continue;
      }
      const auto first = due.begin()->first.first;
      if (std::chrono::steady_clock::now() < first) {
        cv.wait_until(l, first);
        continue;
      }
      auto it = due.begin();
      const uint64_t id = it->first.second;
      std::function<void()> fn = std::move(it->second);
      due.erase(it);
      when.erase(id);
      std::lock_guard<std::mutex> c(call_mu);  // taken before mu is let go: remove(id) waits for fn
      l.unlock();
      fn();
      l.lock();
    }
  }
};

Alarms& alarms() {
  // Never destroyed, its thread never joined: alarms may be set until the process exits.
  static Alarms* a = [] {
    auto* p = new Alarms();
    std::thread([p] { p->loop(); }).detach();
    return p;
  }();
  return *a;
}

}  // namespace

uint64_t add(std::chrono::steady_clock::time_point when, std::function<void()> fn) {
  Alarms& a = alarms();
  bool first;
  uint64_t id;
  {
    std::lock_guard<std::mutex> g(a.mu);
    id = ++a.next;
    a.due.emplace(std::make_pair(when, id), std::move(fn));
    a.when.emplace(id, when);
    first = a.due.begin()->first.second == id;
  }
  if (first) a.cv.notify_one();  // the thread sleeps until a later time: wake it for this one
  return id;
}

void remove(uint64_t id) {
  Alarms& a = alarms();
  {
    std::lock_guard<std::mutex> g(a.mu);
    auto it = a.when.find(id);
    if (it != a.when.end()) {
      a.due.erase({it->second, id});
      a.when.erase(it);
      return;
    }
  }
  std::lock_guard<std::mutex> c(a.call_mu);  // it may be running now: wait for it
}

}  // namespace alarm

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
