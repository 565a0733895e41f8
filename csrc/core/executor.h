// The one step loop: runs a schedule over a transport, with a codec (codec.h) for what the bytes
// are (host sums, a GPU, a compressed wire). Receives that are reduced are cut into chunks and
// double-buffered, so that summing one chunk overlaps receiving the next.
#pragma once
#include <cstdint>
#include <vector>

#include "codec.h"
#include "dtype.h"
#include "schedule.h"
#include "transport.h"

namespace fastar {

struct ExecutorOptions {
  int64_t chunk_bytes = 4 << 20;
  uint32_t tag_base = 0;  // separates the messages of concurrent users of one transport
};

struct ExecutorStats {
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  int64_t messages = 0;
};

class Executor {
 public:
  explicit Executor(ExecutorOptions opts = {}) : opts_(opts) {}
  // In-place allreduce (sum) of `count` elements of `t` at `data`, following `steps`.
  void set_tag_base(uint32_t t) { opts_.tag_base = t; }
  ExecutorStats run(const std::vector<Step>& steps, Transport& tr, void* data, int64_t count, DType t);
  ExecutorStats run(const std::vector<Step>& steps, Transport& tr, void* data, int64_t count, Codec& codec);

 private:
  ExecutorOptions opts_;
  HostSum host_;
};

}  // namespace fastar
