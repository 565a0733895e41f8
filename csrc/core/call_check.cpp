#include "call_check.h"

#include <stdexcept>

#include "dtype.h"
#include "failure.h"

namespace fastar {

const char* protocol_name(uint64_t p) {
  switch ((Protocol)p) {
    case Protocol::Latency: return "latency (small regions in blocks)";
    case Protocol::OneBarrier: return "one-barrier (slots, one chunk)";
    case Protocol::Chunked: return "chunked (the slots' pipeline)";
    case Protocol::Halves: return "halves (reduce-scatter/allgather)";
    case Protocol::InPlace: return "in place (wrap's bucket arena)";
    case Protocol::Network: return "network only";
    case Protocol::SingleCopy: return "single-copy (peers' memory read directly)";
  }
  return "unknown";
}

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::Allreduce: return "allreduce";
    case Collective::ReduceScatter: return "reduce_scatter";
    case Collective::Allgather: return "allgather";
  }
  return "?";
}

std::string plan_label(const Plan& p) {
  static const char* short_names[] = {"?",        "latency", "one_barrier", "chunked",
                                       "halves",   "in_place", "network",    "single_copy"};
  const uint64_t pr = (uint64_t)p.protocol;
  std::string s = std::string(hierarchy_name(p.hierarchy)) + ":" + algorithm_name(p.algorithm);
  if (p.wire != Wire::None) s += std::string(":") + wire_name(p.wire);
  return s + ":" + (pr <= 7 ? short_names[pr] : "?");
}

void refuse_plan(const Plan& plan, const std::string& what, const std::string& why) {
  throw std::invalid_argument("fastar: the plan " + plan_label(plan) + " (chunk " + std::to_string(plan.chunk_bytes) +
                              " B) cannot run " + what + " here: " + why +
                              " (plans come from fastar/policy.py; this is a bug of fastar's)");
}

std::string desc_mismatch(const uint64_t mine[kDescWords], const uint64_t theirs[kDescWords], const char* what,
                          const std::string& me, const std::string& them) {
  static const char* names[kDescWords] = {"call number", "element count", "dtype", "hierarchy/algorithm",
                                          "protocol", "chunk size in bytes"};
  for (int i = 0; i < kDescWords; ++i) {
    if (mine[i] == theirs[i]) continue;
    auto show = [&](uint64_t v) {
      if (i == kProtocol) return std::string(protocol_name(v));
      if (i == kDType && v <= (uint64_t)DType::Bytes) return std::string(dtype_name((DType)v));
      return std::to_string(v);
    };
    std::string hint = ". Every rank must call the same collectives with tensors of the same shape and dtype.";
    if (i == kProtocol)
      hint = ". The ranks planned the call differently: their tuning (fastar.policy.Tuning: small_bytes, "
             "latency_bytes) or shared-memory settings differ; give every rank the same settings.";
    else if (i == kChunk)
      hint = ". The ranks' pipeline chunk differs (fastar.policy.Tuning.local_chunk_bytes, FASTAR_SHM_CHUNK_MB): "
             "give every rank the same settings.";
    return "fastar: ranks disagree on the " + std::string(names[i]) + " of " + what + ": " + me + " has " +
           show(mine[i]) + ", " + them + " has " + show(theirs[i]) + hint;
  }
  return "";
}

uint32_t latency_check_word(const uint64_t d[kDescWords]) {
  const uint64_t route = (d[kRoute] >> 4) * 2 + (d[kRoute] & 1);  // hierarchy (0..2) x algorithm (0..1)
  return (uint32_t)((d[kCount] & 0x1FFFF) | (d[kDType] & 7) << 17 | (route & 7) << 20 | (d[kSeq] & 0x1FF) << 23);
}

void HeaderExchange::run(Transport& tr, const std::vector<int>& peers, const uint64_t mine[kDescWords], uint32_t tag,
                         const char* what, const std::function<std::string(int)>& who) {
  Buffers& b = *buf_;
  b.send.assign(mine, mine + kDescWords);
  b.recv.assign(kDescWords * peers.size(), 0);
  std::vector<Transport::Handle> hs;
  try {
    for (size_t i = 0; i < peers.size(); ++i) {
      hs.push_back(tr.isend(peers[i], b.send.data(), kDescWords * sizeof(uint64_t), tag));
      hs.push_back(tr.irecv(peers[i], &b.recv[kDescWords * i], kDescWords * sizeof(uint64_t), tag));
    }
    for (auto h : hs) tr.wait(h);
  } catch (...) {
    // Posts may outlive this call: the buffers go with them, and the next exchange gets new ones.
    keep_forever(std::move(buf_));
    buf_ = std::make_shared<Buffers>();
    throw;
  }
  for (size_t i = 0; i < peers.size(); ++i) {
    const std::string m = desc_mismatch(mine, &b.recv[kDescWords * i], what, who(-1), who(peers[i]));
    if (!m.empty()) throw std::runtime_error(m);
  }
}

}  // namespace fastar
