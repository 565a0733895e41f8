#include "torch/pg_transport.h"

#include "torch/kernels.h"  // fault_active (test-only)

#include <stdexcept>

namespace fastar {

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
  const auto start = std::chrono::steady_clock::now();
  while (true) {
    const double limit = timeout->seconds();
    const double left = limit - std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (left <= 0)
      throw std::runtime_error("Timed out waiting " + std::to_string((int64_t)(limit * 1000)) +
                               "ms for the operation to complete (fastar's timeout)");
    // set_timeout aborts the wait (c10d: the work's buffer stops waiting, the transfer stays
    // posted), so that this loop re-reads the timeout and waits again for what is left.
    const uint64_t id = timeout->add_waker([w] {
      try {
        w->abort();
      } catch (const std::exception&) {  // a work without abort (a Gloo collective) keeps its wait
      }
    });
    bool done;
    try {
      done = w->wait(std::chrono::milliseconds(std::max<int64_t>(1, (int64_t)(left * 1000))));
    } catch (...) {
      timeout->remove_waker(id);
      throw;
    }
    timeout->remove_waker(id);
    if (done) return;
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
  } catch (const std::exception& e) {
    fail(op.send, op.peer, op.bytes, e);
  }
  retired_.push_back(std::move(op.work));
  if (retired_.size() > 512) retired_.pop_front();
  op.tensor = at::Tensor();
  ++done_;
}

}  // namespace fastar
