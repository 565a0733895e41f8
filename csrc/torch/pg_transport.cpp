#include "torch/pg_transport.h"

#include "torch/kernels.h"  // fault_active (test-only)

#include <cstring>
#include <stdexcept>

namespace fastar {
namespace {

// The failure messages between ranks (watch_failures): a tag no schedule or header uses (the
// executor's are below 2^30, the header exchange's 0x7F00xxxx), a fixed size (Gloo matches sizes).
constexpr int kFailTag = 0x7FFFFFF0;
constexpr int64_t kFailBytes = 1024;

std::string seconds_text(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%g", s);
  return b;
}

}  // namespace

PGTransport::PGTransport(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::vector<int> global_ranks,
                         SharedTimeout timeout, std::string name, c10::Device device)
    : pg_(std::move(pg)), global_ranks_(std::move(global_ranks)), timeout_(std::move(timeout)),
      name_(std::move(name)), device_(device) {
  rank_ = pg_->getRank();
  size_ = pg_->getSize();
  if ((int)global_ranks_.size() != size_) throw std::invalid_argument("fastar: global rank list does not match group");
  try {
    backend_ = pg_->getBackend(device_.type());
  } catch (const std::exception&) {
    // A group without a backend for this device (an NCCL-only group, asked for CPU bytes): post()
    // says so if anything is ever posted.
  }
}

PGTransport::~PGTransport() {
  stop_watching();
  try {
    drain_skipped();
  } catch (...) {  // a test's injected fault, at teardown: nothing to report to
  }
}

void PGTransport::group_begin() {
  if (!grouped() || !backend_) return;
  backend_->startCoalescing();
  grouping_ = true;
}

void PGTransport::group_end() {
  if (!grouping_) return;
  grouping_ = false;
  c10::intrusive_ptr<c10d::Work> w;
  try {
    w = backend_->endCoalescing();
  } catch (const std::exception& e) {
    fail(true, rank_, 0, e);
  }
  if (!w) return;
  if (fault_active(Fault::SkipWait)) {  // test-only: the stream order is lost
    retired_.push_back(std::move(w));
    return;
  }
  w->wait();  // NCCL: the current stream waits, the CPU does not; the group's watchdog enforces its timeout
  retired_.push_back(std::move(w));
  if (retired_.size() > 512) retired_.pop_front();
}

void PGTransport::drain_skipped() {
  for (auto& op : skipped_)
    if (op.work) wait_work(op.work, timeout_);
  skipped_.clear();
}

Transport::Handle PGTransport::isend(int peer, const void* data, size_t bytes, uint32_t tag) {
  return post(true, peer, const_cast<void*>(data), bytes, tag);
}

Transport::Handle PGTransport::irecv(int peer, void* data, size_t bytes, uint32_t tag) {
  return post(false, peer, data, bytes, tag);
}

Transport::Handle PGTransport::post(bool send, int peer, void* data, size_t bytes, uint32_t tag) {
  if (ops_.size() == done_) {  // every earlier op waited: recycle the list
    ops_.clear();
    done_ = 0;
  }
  if (!backend_)
    throw std::runtime_error("fastar: " + name_ + " has no backend for " + device_.str() +
                             " tensors (e.g. an NCCL-only group asked for CPU bytes): pass a Gloo group for CPU "
                             "tensors, an NCCL one for CUDA tensors");
  at::Tensor t = at::from_blob(data, {(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).device(device_));
  std::vector<at::Tensor> v{t};
  c10::intrusive_ptr<c10d::Work> w;
  try {  // Gloo throws here, not in wait(), when the peer has already closed its connection
    w = send ? backend_->send(v, peer, (int)tag) : backend_->recv(v, peer, (int)tag);
  } catch (const std::exception& e) {
    fail(send, peer, bytes, e);
  }
  ops_.push_back({std::move(w), t, peer, bytes, send});
  return (Handle)ops_.size() - 1;
}

void PGTransport::fail(bool send, int peer, size_t bytes, const std::exception& e) const {
  std::string msg = e.what();
  const auto nl = msg.find("\nException raised from");
  if (nl != std::string::npos) msg = msg.substr(0, nl);
  throw std::runtime_error("fastar: rank " + std::to_string(global_ranks_[rank_]) + ": " +
                           (send ? "sending " : "receiving ") + std::to_string(bytes) + " bytes " +
                           (send ? "to" : "from") + " rank " + std::to_string(global_ranks_[peer]) + " over " +
                           name_ + " failed: " + msg +
                           "\nThat rank has probably exited or timed out, or the ranks called fastar with "
                           "different tensor sizes or in a different order.");
}

void PGTransport::wait_work(const c10::intrusive_ptr<c10d::Work>& w, const SharedTimeout& timeout) {
  using Clock = std::chrono::steady_clock;
  OpContext* op = OpContext::current();
  FailureState* fs = op ? op->failure : nullptr;
  const auto start = Clock::now();
  // c10d's abort of a send/recv work ends its wait without completing it (the transfer stays posted).
  const auto abort = [w] {
    try {
      w->abort();
    } catch (const std::exception&) {  // a work without abort (a Gloo collective) keeps its wait
    }
  };
  const auto stopped = [fs]() -> WaitStopped {
    const std::exception_ptr cause = fs->cause();
    return WaitStopped(cause ? what_of(cause) : std::string("the communicator failed"));
  };
  while (true) {
    const auto now = Clock::now();
    const double limit = timeout->seconds();
    const double left =
        limit - (op ? op->elapsed(now, start) : std::chrono::duration<double>(now - start).count());
    if (left <= 0)
      throw WaitTimedOut("Timed out waiting " + std::to_string((int64_t)(limit * 1000)) +
                             "ms for the operation to complete (fastar's timeout)",
                         limit);
    // Woken (then loop: re-read the timeout, or stop) by set_timeout, by the deadline (an alarm,
    // not Gloo's timeout, which would break every pair of the group), and by the first failure.
    const uint64_t t_id = timeout->add_waker(abort);
    const uint64_t f_id = fs ? fs->add_waker([abort](const std::string&) { abort(); }) : 0;
    const uint64_t a_id =
        alarm::add(now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(left)), abort);
    const auto unregister = [&] {
      alarm::remove(a_id);
      if (fs) fs->remove_waker(f_id);
      timeout->remove_waker(t_id);
    };
    if (fs && fs->failed()) {  // failed before its waker was in: it will not be called
      unregister();
      throw stopped();
    }
    bool done;
    try {
      done = w->wait(std::chrono::milliseconds((int64_t)(left * 1000) + 60000));
    } catch (...) {
      unregister();
      if (fs && fs->failed()) throw stopped();  // the first failure is the reason, not its echo
      throw;
    }
    unregister();
    if (done) return;
    if (fs && fs->failed()) throw stopped();
  }
}

void PGTransport::wait(Handle h) {
  Op& op = ops_.at((size_t)h);
  if (!op.work || device_.is_cuda()) {  // NCCL: grouped, group_end made the stream wait
    op.tensor = at::Tensor();
    ++done_;
    return;
  }
  if (fault_active(Fault::SkipWait)) {  // test-only: the data is used before it arrived
    skipped_.push_back(std::move(op));
    ++done_;
    return;
  }
  try {
    wait_work(op.work, timeout_);
  } catch (const WaitTimedOut& e) {
    throw std::runtime_error("fastar: timed out after " + seconds_text(e.seconds) + " s: rank " +
                             std::to_string(global_ranks_[rank_]) + " waited for rank " +
                             std::to_string(global_ranks_[op.peer]) + " (" + (op.send ? "sending " : "receiving ") +
                             std::to_string(op.bytes) + " bytes over " + name_ +
                             "); that rank is stuck, dead, or called a different collective");
  } catch (const WaitStopped& e) {
    throw std::runtime_error("fastar: rank " + std::to_string(global_ranks_[rank_]) + " stopped " +
                             (op.send ? "sending " : "receiving ") + std::to_string(op.bytes) + " bytes " +
                             (op.send ? "to" : "from") + " rank " + std::to_string(global_ranks_[op.peer]) + " over " +
                             name_ + ": " + e.what());
  } catch (const std::exception& e) {
    fail(op.send, op.peer, op.bytes, e);
  }
  retired_.push_back(std::move(op.work));
  if (retired_.size() > 512) retired_.pop_front();
  op.tensor = at::Tensor();
  ++done_;
}

void PGTransport::watch_failures(std::shared_ptr<FailureState> fs) {
  if (!backend_ || device_.is_cuda() || size_ < 2 || fs_ || !fs) return;
  fs_ = std::move(fs);
  at::Tensor buf = at::zeros({kFailBytes}, at::TensorOptions().dtype(at::kByte));
  std::vector<at::Tensor> v{buf};
  try {
    alarm_recv_ = backend_->recvAnysource(v, kFailTag);
  } catch (const std::exception&) {  // a backend without it: local waits still stop, peers time out
    fs_.reset();
    return;
  }
  listener_ = std::thread([this, w = alarm_recv_, buf] {
    bool got = false;
    try {
      while (!got && !stop_listen_.load()) got = w->wait(std::chrono::hours(24 * 365));
    } catch (const std::exception&) {
      return;  // the group broke or went away (a peer exited): nothing was reported
    }
    if (!got || stop_listen_.load()) return;
    const char* p = static_cast<const char*>(buf.data_ptr());
    const std::string why(p, strnlen(p, (size_t)kFailBytes));
    const int src = w->sourceRank();
    const std::string from = src >= 0 && src < size_ ? "rank " + std::to_string(global_ranks_[src]) : "a peer";
    fs_->fail(std::make_exception_ptr(std::runtime_error(
        "fastar: " + from + " failed, so rank " + std::to_string(global_ranks_[rank_]) + " stopped too: " + why)));
  });
  fs_waker_ = fs_->add_waker([this](const std::string& why) { send_failure(why); });
}

void PGTransport::send_failure(const std::string& why) {
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    at::Tensor msg = at::zeros({kFailBytes}, at::TensorOptions().dtype(at::kByte));
    std::memcpy(msg.data_ptr(), why.data(), std::min(why.size(), (size_t)kFailBytes - 1));
    std::vector<at::Tensor> v{msg};
    try {
      // Never waited for: a stopped peer may take it much later. The work keeps its buffer.
      keep_forever(std::make_shared<c10::intrusive_ptr<c10d::Work>>(backend_->send(v, p, kFailTag)));
    } catch (const std::exception&) {  // that peer's connection is gone: it learns of it that way
    }
  }
}

void PGTransport::stop_watching() {
  if (!fs_) return;
  fs_->remove_waker(fs_waker_);
  stop_listen_.store(true);
  try {
    alarm_recv_->abort();  // ends the listener's wait (or its next one)
  } catch (const std::exception&) {
  }
  if (listener_.joinable()) listener_.join();
  // The receive stays posted in Gloo: its buffer must outlive the process's use of the group.
  keep_forever(std::make_shared<c10::intrusive_ptr<c10d::Work>>(std::move(alarm_recv_)));
  fs_.reset();
}

}  // namespace fastar
