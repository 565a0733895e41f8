#include "executor.h"

#include <algorithm>
#include <stdexcept>

#include "reduce.h"

namespace fastar {

ExecutorStats Executor::run(const std::vector<Step>& steps, Transport& tr, void* data, int64_t count, DType t) {
  ExecutorStats stats;
  char* base = static_cast<char*>(data);
  const size_t esize = dtype_size(t);
  const int64_t chunk_elems = std::max<int64_t>(1, opts_.chunk_bytes / (int64_t)esize);
  std::vector<Transport::Handle> sends;
  // Tags count the messages of each pair: a sender's n-th message to a peer is that peer's n-th
  // receive from it (schedules keep every pair's messages in the same order on both sides).
  std::vector<uint32_t> sent_to(tr.size(), 0), recvd_from(tr.size(), 0);
  for (size_t si = 0; si < steps.size(); ++si) {
    const Step& st = steps[si];
    if (st.send.end > count || st.recv.end > count) throw std::logic_error("fastar: schedule range past the buffer");
    sends.clear();
    if (st.send_peer >= 0 && !st.send.empty()) {
      int c = 0;
      for (int64_t b = st.send.begin; b < st.send.end; b += chunk_elems, ++c) {
        const int64_t n = std::min(chunk_elems, st.send.end - b);
        sends.push_back(tr.isend(st.send_peer, base + b * esize, n * esize, opts_.tag_base + sent_to[st.send_peer]++));
        stats.bytes_sent += n * esize;
        ++stats.messages;
      }
    }
    if (st.recv_peer >= 0 && !st.recv.empty()) {
      const int64_t total = st.recv.size();
      const int nchunks = (int)((total + chunk_elems - 1) / chunk_elems);
      stats.bytes_received += total * esize;
      if (!st.reduce) {  // copies land in place: post them all, then wait
        std::vector<Transport::Handle> recvs;
        for (int c = 0; c < nchunks; ++c) {
          const int64_t b = st.recv.begin + c * chunk_elems;
          const int64_t n = std::min(chunk_elems, st.recv.end - b);
          recvs.push_back(tr.irecv(st.recv_peer, base + b * esize, n * esize, opts_.tag_base + recvd_from[st.recv_peer]++));
        }
        for (auto h : recvs) tr.wait(h);
      } else {  // two scratch buffers: receive chunk c+1 while summing chunk c
        const int64_t slot = std::min(chunk_elems, total) * esize;
        if ((int64_t)scratch_.size() < 2 * slot) scratch_.resize(2 * slot);
        auto post = [&](int c) {
          const int64_t b = st.recv.begin + c * chunk_elems;
          const int64_t n = std::min(chunk_elems, st.recv.end - b);
          return tr.irecv(st.recv_peer, scratch_.data() + (c & 1) * slot, n * esize, opts_.tag_base + recvd_from[st.recv_peer]++);
        };
        Transport::Handle pending = post(0);
        for (int c = 0; c < nchunks; ++c) {
          tr.wait(pending);
          if (c + 1 < nchunks) pending = post(c + 1);
          const int64_t b = st.recv.begin + c * chunk_elems;
          const int64_t n = std::min(chunk_elems, st.recv.end - b);
          reduce_sum(t, base + b * esize, scratch_.data() + (c & 1) * slot, n);
        }
      }
    }
    for (auto h : sends) tr.wait(h);
  }
  return stats;
}

}  // namespace fastar
