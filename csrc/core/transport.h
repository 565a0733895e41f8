// What a schedule needs from a network: post a send or a receive of a byte range to a peer, and
// wait for it. Implementations: a c10d::ProcessGroup (csrc/torch/pg_transport), an in-memory one
// for the C++ tests. The transport never knows the schedule.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fastar {

class Transport {
 public:
  using Handle = int64_t;
  virtual ~Transport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual Handle isend(int peer, const void* data, size_t bytes, uint32_t tag) = 0;
  virtual Handle irecv(int peer, void* data, size_t bytes, uint32_t tag) = 0;
  // Blocks until the operation completed; throws (with the peer named) on error or timeout.
  // (A stream-ordered transport, NCCL, makes the current stream wait instead of the CPU.)
  virtual void wait(Handle h) = 0;
  // A step's sends and receives posted as one group: NCCL, where two ranks that each send to the
  // other first would each wait for the other's receive. A grouped transport gets one message per
  // direction and step (no chunks). No-ops elsewhere.
  virtual bool grouped() const { return false; }
  virtual void group_begin() {}
  virtual void group_end() {}
};

}  // namespace fastar
