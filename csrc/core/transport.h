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
  virtual void wait(Handle h) = 0;
};

}  // namespace fastar
