#include "hier_driver.h"

namespace fastar {

HierarchicalDriver::HierarchicalDriver(Transport* inter, bool worker) : inter_(inter) {
  if (inter_ && worker) worker_ = std::thread([this] { worker_loop(); });
}

HierarchicalDriver::~HierarchicalDriver() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

std::vector<Step> HierarchicalDriver::schedule(const Job& j) const {
  const int r = inter_->rank(), n = inter_->size();
  switch (j.ph->collective()) {
    case Collective::ReduceScatter: return reduce_scatter_schedule(j.algo, r, n, j.part.count);
    case Collective::Allgather: return allgather_schedule(j.algo, r, n, j.part.count);
    case Collective::Allreduce: break;
  }
  return make_schedule(j.algo, r, n, j.part.count);
}

void HierarchicalDriver::inter_run(const Job& j) {
  j.ph->before_inter(j.c);
  const auto st = exec_.run(schedule(j), *inter_, j.part.data, j.part.count, *j.codec);
  bytes_ += st.bytes_sent;
  j.ph->after_inter(j.c);
}

void HierarchicalDriver::worker_loop() {
  while (true) {
    Job j;
    bool skip;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      j = queue_.front();
      queue_.pop_front();
      busy_ = true;
      skip = error_ || abort_;  // after a failure the rest of the run's chunks are not sent
    }
    std::exception_ptr e;
    if (!skip) {
      try {
        OpScope op(j.op);
        inter_run(j);
      } catch (...) {
        e = std::current_exception();
        j.ph->failed(what_of(e));
      }
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      if (e && !error_) error_ = e;
      done_ = j.c;
      busy_ = false;
    }
    cv_.notify_all();
  }
}

void HierarchicalDriver::wait_job(int64_t c) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return done_ >= c || error_; });
  if (error_) std::rethrow_exception(error_);
}

int64_t HierarchicalDriver::run(LocalPhase& ph, Algorithm algo, Codec& codec) {
  const int64_t before = bytes_;
  const int64_t n = ph.chunks();
  // A pipelined phase hands chunk c back only after chunk c+1 was reduced, so that waiting for the
  // peers (and the network) overlaps local work; its network runs go to the worker when there is one.
  const bool defer = ph.pipelined();
  const bool async = defer && worker_.joinable();
  {
    std::lock_guard<std::mutex> g(mu_);
    done_ = -1;
  }
  std::vector<bool> queued(async ? n : 0, false);  // chunks whose inter-node run this rank queued
  try {
    for (int64_t c = 0; c < n; ++c) {
      const Part p = ph.reduce(c);
      if (p.data != nullptr && inter_ != nullptr) {
        if (async) {
          {
            std::lock_guard<std::mutex> g(mu_);
            queue_.push_back({&ph, c, p, algo, &codec, OpContext::current()});
          }
          cv_.notify_all();
          queued[c] = true;
        } else {
          inter_run({&ph, c, p, algo, &codec});
        }
      }
      if (!defer) {
        ph.distribute(c);
      } else if (c > 0) {
        if (async && queued[c - 1]) wait_job(c - 1);
        ph.distribute(c - 1);
      }
    }
    if (defer && n > 0) {
      if (async && queued[n - 1]) wait_job(n - 1);
      ph.distribute(n - 1);
    }
  } catch (...) {
    ph.failed(what_of(std::current_exception()));
    if (async) {  // the worker lets go of this run's chunks (and of the phase) before it goes away
      std::unique_lock<std::mutex> l(mu_);
      abort_ = true;
      cv_.wait(l, [&] { return queue_.empty() && !busy_; });
      abort_ = false;
      error_ = nullptr;
    }
    throw;
  }
  return bytes_ - before;
}

}  // namespace fastar
