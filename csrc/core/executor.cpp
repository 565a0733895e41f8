#include "executor.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

#include "reduce.h"

namespace fastar {

void HostSum::reduce(void* dst, const void* wire, int64_t n) { reduce_sum(t_, dst, wire, n); }

ExecutorStats Executor::run(const std::vector<Step>& steps, Transport& tr, void* data, int64_t count, DType t) {
  host_.set_dtype(t);
  return run(steps, tr, data, count, host_);
}

ExecutorStats Executor::run(const std::vector<Step>& steps, Transport& tr, void* data, int64_t count, Codec& codec) {
  ExecutorStats stats;
  char* base = static_cast<char*>(data);
  const int64_t es = (int64_t)codec.elem_bytes(), ws = (int64_t)codec.wire_bytes();
  const bool enc = codec.encodes();
  const int64_t chunk_elems =
      tr.grouped() ? std::numeric_limits<int64_t>::max() : std::max<int64_t>(1, opts_.chunk_bytes / es);
  std::vector<Transport::Handle> sends, recvs;
  // Tags count the messages of each pair: a sender's n-th message to a peer is that peer's n-th
  // receive from it (schedules keep every pair's messages in the same order on both sides).
  std::vector<uint32_t> sent_to(tr.size(), 0), recvd_from(tr.size(), 0);
  for (const Step& st : steps) {
    if (st.send.end > count || st.recv.end > count) throw std::logic_error("fastar: schedule range past the buffer");
    sends.clear();
    recvs.clear();
    tr.group_begin();
    if (st.send_peer >= 0 && !st.send.empty()) {
      // An encoding codec stages the whole send range in the wire's dtype (the previous step's
      // sends were waited for: the staging is free).
      const char* src = base + st.send.begin * es;
      int64_t unit = es;
      if (enc) {
        char* stage = codec.scratch(2, (size_t)(st.send.size() * ws));
        codec.encode(stage, src, st.send.size());
        src = stage;
        unit = ws;
      }
      for (int64_t b = 0; b < st.send.size(); b += std::min(chunk_elems, st.send.size())) {
        const int64_t n = std::min(chunk_elems, st.send.size() - b);
        sends.push_back(tr.isend(st.send_peer, src + b * unit, n * unit, opts_.tag_base + sent_to[st.send_peer]++));
        stats.bytes_sent += n * unit;
        ++stats.messages;
      }
    }
    const bool recv = st.recv_peer >= 0 && !st.recv.empty();
    const int64_t total = recv ? st.recv.size() : 0;
    const int64_t nchunks = recv ? (total + chunk_elems - 1) / chunk_elems : 0;
    auto range = [&](int64_t c, int64_t* b, int64_t* n) {
      *b = st.recv.begin + c * chunk_elems;
      *n = std::min(chunk_elems, st.recv.end - *b);
    };
    const bool in_place = recv && !st.reduce && !enc;
    const int64_t slot = recv ? std::min(chunk_elems, total) * ws : 0;
    char* slots[2] = {nullptr, nullptr};
    auto post = [&](int64_t c) {  // chunk c into its scratch slot
      int64_t b, n;
      range(c, &b, &n);
      if (!slots[c & 1]) slots[c & 1] = codec.scratch((int)(c & 1), (size_t)slot);
      return tr.irecv(st.recv_peer, slots[c & 1], n * ws, opts_.tag_base + recvd_from[st.recv_peer]++);
    };
    Transport::Handle pending = -1;
    if (in_place) {  // copies land in place: post them all, then wait
      for (int64_t c = 0; c < nchunks; ++c) {
        int64_t b, n;
        range(c, &b, &n);
        recvs.push_back(tr.irecv(st.recv_peer, base + b * es, n * es, opts_.tag_base + recvd_from[st.recv_peer]++));
      }
    } else if (recv) {
      pending = post(0);
    }
    tr.group_end();
    if (recv) {
      stats.bytes_received += total * (in_place ? es : ws);
      if (in_place) {
        for (auto h : recvs) tr.wait(h);
      } else {  // two slots: receive chunk c+1 while chunk c is summed (or decoded) into the buffer
        for (int64_t c = 0; c < nchunks; ++c) {
          tr.wait(pending);
          if (c + 1 < nchunks) pending = post(c + 1);
          int64_t b, n;
          range(c, &b, &n);
          if (st.reduce)
            codec.reduce(base + b * es, slots[c & 1], n);
          else
            codec.decode(base + b * es, slots[c & 1], n);
        }
      }
    }
    for (auto h : sends) tr.wait(h);
  }
  if (enc && !steps.empty()) codec.finish(data, count);
  return stats;
}

}  // namespace fastar
