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
  backend_ = pg_->getBackend(c10::DeviceType::CPU);
}

Transport::Handle PGTransport::isend(int peer, const void* data, size_t bytes, uint32_t tag) {
  if (ops_.size() == done_) {  // every earlier op waited: recycle the list
    ops_.clear();
    done_ = 0;
  }
  at::Tensor t = at::from_blob(const_cast<void*>(data), {(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).device(device_));
  std::vector<at::Tensor> v{t};
  auto w = backend_->send(v, peer, (int)tag);
  ops_.push_back({std::move(w), t, peer, bytes, true});
  return (Handle)ops_.size() - 1;
}

Transport::Handle PGTransport::irecv(int peer, void* data, size_t bytes, uint32_t tag) {
  if (ops_.size() == done_) {
    ops_.clear();
    done_ = 0;
  }
  at::Tensor t = at::from_blob(data, {(int64_t)bytes}, at::TensorOptions().dtype(at::kByte).device(device_));
  std::vector<at::Tensor> v{t};
  auto w = backend_->recv(v, peer, (int)tag);
  ops_.push_back({std::move(w), t, peer, bytes, false});
  return (Handle)ops_.size() - 1;
}

void PGTransport::wait(Handle h) {
  Op& op = ops_.at((size_t)h);
  try {
    op.work->wait(timeout_);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    const auto nl = msg.find("\nException raised from");
    if (nl != std::string::npos) msg = msg.substr(0, nl);
    throw std::runtime_error("fastar: rank " + std::to_string(global_ranks_[rank_]) + ": " +
                             (op.send ? "sending " : "receiving ") + std::to_string(op.bytes) + " bytes " +
                             (op.send ? "to" : "from") + " rank " + std::to_string(global_ranks_[op.peer]) + " over " +
                             name_ + " failed: " + msg +
                             "\nThat rank has probably exited or timed out, or the ranks called fastar with "
                             "different tensor sizes or in a different order.");
  }
  retired_.push_back(std::move(op.work));
  if (retired_.size() > 512) retired_.pop_front();
  op.tensor = at::Tensor();
  ++done_;
}

}  // namespace fastar
