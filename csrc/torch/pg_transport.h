// A Transport over a c10d ProcessGroup's point-to-point send/recv: Gloo carries the bytes on CPU
// (NCCL on GPU). fastar never opens sockets of its own.
#pragma once
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <chrono>
#include <deque>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "core/failure.h"
#include "core/transport.h"

namespace fastar {

// What wait_work throws besides the backend's own errors: the operation's deadline passed, or the
// communicator failed (a first failure, this rank's or a peer's) while it waited.
struct WaitTimedOut : std::runtime_error {
  WaitTimedOut(const std::string& m, double s) : std::runtime_error(m), seconds(s) {}
  double seconds;
};
struct WaitStopped : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class PGTransport : public Transport {
 public:
  // global_ranks[i]: the world rank of group rank i (for error messages). device: where the bytes
  // are (the group's backend for that device type carries them: Gloo for CPU, NCCL for CUDA).
  // timeout: shared with the communicator (set_timeout reaches a wait in progress).
  PGTransport(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::vector<int> global_ranks, SharedTimeout timeout,
              std::string name, c10::Device device = c10::Device(c10::kCPU));
  ~PGTransport() override;
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Handle isend(int peer, const void* data, size_t bytes, uint32_t tag) override;
  Handle irecv(int peer, void* data, size_t bytes, uint32_t tag) override;
  void wait(Handle h) override;
  // NCCL: a step's sends and receives are one group (startCoalescing .. endCoalescing), whose end
  // makes the current stream wait for them; the CPU never waits for the GPU.
  bool grouped() const override { return device_.is_cuda(); }
  void group_begin() override;
  void group_end() override;
  // Test-only (Fault::SkipWait, kernels.h): waits skipped under the fault happen here, at the end
  // of the caller's operation, so that no buffer goes away under them.
  void drain_skipped();
  bool has_backend() const { return (bool)backend_; }
  // Waits for a Gloo work until the current operation's deadline (OpContext; outside one, the
  // shared timeout from now), re-reading the timeout when set_timeout wakes the wait (c10d's abort
  // of a send/recv work ends its wait without completing it). Gloo's own timeout never fires (it
  // breaks every pair of the group): an alarm ends the wait at the deadline. Throws WaitTimedOut,
  // or WaitStopped when the operation's failure state fails meanwhile (with its first error).
  static void wait_work(const c10::intrusive_ptr<c10d::Work>& w, const SharedTimeout& timeout);
  // The failure contract between ranks (CPU groups): on the first failure of `fs`, sends its
  // message to every other rank of the group; a thread receives such a message from any peer and
  // fails `fs` with it, so that a rank blocked on a failed peer raises at once with the first
  // rank's reason. (c10d's abort() is a no-op for Gloo in torch 2.14: no group is torn down.)
  void watch_failures(std::shared_ptr<FailureState> fs);
  // Stops the receiving thread (close(), before the group goes away). Idempotent.
  void stop_watching();
  int global_rank(int r) const { return global_ranks_.at(r); }
  const std::string& name() const { return name_; }

 private:
  Handle post(bool send, int peer, void* data, size_t bytes, uint32_t tag);
  // Throws the error that names this rank, the peer and the group.
  [[noreturn]] void fail(bool send, int peer, size_t bytes, const std::exception& e) const;
  struct Op {
    c10::intrusive_ptr<c10d::Work> work;
    at::Tensor tensor;
    int peer;
    size_t bytes;
    bool send;
  };
  c10::intrusive_ptr<c10d::Backend> backend_;
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::vector<int> global_ranks_;
  SharedTimeout timeout_;
  std::string name_;
  int rank_, size_;
  c10::Device device_ = c10::Device(c10::kCPU);
  std::vector<Op> ops_;
  std::vector<Op> skipped_;
  bool grouping_ = false;
  // Finished works are destroyed a few hundred operations later: Gloo's buffer destructor yields
  // until its I/O thread lets go of the buffer, which right after wait() costs milliseconds on a
  // loaded host (seen with strace in ~UnboundBuffer).
  std::deque<c10::intrusive_ptr<c10d::Work>> retired_;
  size_t done_ = 0;
  // watch_failures
  void send_failure(const std::string& why);
  std::shared_ptr<FailureState> fs_;
  uint64_t fs_waker_ = 0;
  c10::intrusive_ptr<c10d::Work> alarm_recv_;
  std::atomic<bool> stop_listen_{false};
  std::thread listener_;
};

}  // namespace fastar
