#include "torch/pg_transport.h"

#include <stdexcept>

namespace fastar {

PGTransport::PGTransport(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::vector<int> global_ranks, double timeout_s,
                         std::string name)
    : pg_(std::move(pg)), global_ranks_(std::move(global_ranks)),
      timeout_((int64_t)(timeout_s * 1000)), name_(std::move(name)) {
  rank_ = pg_->getRank();
  size_ = pg_->getSize();
  if ((int)global_ranks_.size() != size_) throw std::invalid_argument("fastar: global rank list does not match group");
  try {
    backend_ = pg_->getBackend(c10::DeviceType::CPU);
  } catch (const std::exception&) {
    // An NCCL-only group: fastar moves CUDA tensors over it with torch ops (TensorAllreduce) and
    // never posts CPU bytes to it; post() says so if it ever tried.
  }
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
    throw std::runtime_error("fastar: " + name_ + " has no CPU backend (an NCCL-only group): it cannot carry CPU "
                             "tensors; pass a Gloo group for CPU tensors");
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

void PGTransport::wait(Handle h) {
  Op& op = ops_.at((size_t)h);
  try {
    op.work->wait(timeout_);
  } catch (const std::exception& e) {
    fail(op.send, op.peer, op.bytes, e);
  }
  retired_.push_back(std::move(op.work));
  if (retired_.size() > 512) retired_.pop_front();
  op.tensor = at::Tensor();
  ++done_;
}

}  // namespace fastar
