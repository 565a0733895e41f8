// The core tests' stand-in for fastar/policy.py's plan of a staged allreduce (the same rule:
// python_tests/test_plan.py checks policy.py against the library itself). Each rank's Tuned
// carries its own knobs, so that a test can plan ranks differently and check that they raise.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../hierarchical.h"
#include "../shm.h"

namespace fastar {

inline Plan staged_plan(Hierarchy h, Algorithm a, int64_t bytes, int64_t es, int64_t arena_chunk, int num_nodes,
                        int64_t small_bytes, int64_t local_chunk_bytes, int64_t block_bytes,
                        int64_t single_copy_bytes = -1, int64_t single_copy_chunk = 64 << 10) {
  Plan p;
  p.hierarchy = h;
  p.algorithm = a;
  // single_copy_bytes: policy.py's Tuning.single_copy_min_bytes on a node whose probe allowed it
  // (negative: not allowed here).
  if (single_copy_bytes >= 0 && num_nodes == 1 && bytes >= single_copy_bytes) {
    p.protocol = Protocol::SingleCopy;
    p.chunk_bytes = std::min(single_copy_chunk, arena_chunk) / es * es;
    return p;
  }
  const int64_t chunk = (num_nodes > 1 ? arena_chunk : std::min(arena_chunk, local_chunk_bytes)) / es * es;
  const int64_t nchunks = bytes == 0 ? 0 : (bytes + chunk - 1) / chunk;
  const bool small = bytes == 0 || (nchunks == 1 && bytes <= small_bytes && (num_nodes == 1 || h == Hierarchy::Leader));
  const bool latency = small && num_nodes == 1 && bytes <= ShmArena::kSmallBytes;
  p.protocol = latency ? Protocol::Latency : small ? Protocol::OneBarrier : Protocol::Chunked;
  p.chunk_bytes = latency ? block_bytes : small ? 0 : chunk;
  return p;
}

// A Hierarchical with the knobs the tests turn, planning each allreduce as policy.py would.
struct Tuned : Hierarchical {
  Tuned(ShmArena* a, Transport* inter, int num_nodes)
      : Hierarchical(a, inter, num_nodes), arena_chunk(a->chunk_bytes()), nodes(num_nodes) {}
  int64_t small_bytes = 64 << 10;
  int64_t small_block_bytes = 4096;
  int64_t single_copy_bytes = -1;  // the single-copy protocol from this many bytes (after probe_single_copy)
  int64_t single_copy_chunk = 64 << 10;
  double scale_by = 1.0;  // op avg's factor
  std::atomic<int64_t> local_chunk_bytes{512 << 10};
  // The pipeline's chunk as policy.py plans it: one node min(slot, local chunk), between nodes the slot.
  int64_t chunk() const { return nodes > 1 ? arena_chunk : std::min(arena_chunk, local_chunk_bytes.load()); }
  // halves_single_copy: the halves take the single-copy protocol (one node, after the probe)
  bool halves_single_copy = false;
  Plan halves_plan(Collective c, Algorithm a) const {
    Plan p;
    p.collective = c;
    p.algorithm = a;
    p.hierarchy = Hierarchy::Rail;
    p.protocol = halves_single_copy && nodes == 1 ? Protocol::SingleCopy : Protocol::Halves;
    p.chunk_bytes = p.protocol == Protocol::SingleCopy ? std::min(single_copy_chunk, arena_chunk) / 8 * 8 : chunk();
    return p;
  }
  HierarchicalStats reduce_scatter(Algorithm a, const void* in, void* out, int64_t shard, DType t, uint64_t seq) {
    return Hierarchical::reduce_scatter(halves_plan(Collective::ReduceScatter, a), in, out, shard, t, seq);
  }
  HierarchicalStats allgather(Algorithm a, const void* in, void* out, int64_t shard, DType t, uint64_t seq) {
    return Hierarchical::allgather(halves_plan(Collective::Allgather, a), in, out, shard, t, seq);
  }
  int64_t arena_chunk;
  int nodes;
  HierarchicalStats allreduce(Hierarchy h, Algorithm a, void* data, int64_t count, DType t, uint64_t seq) {
    const int64_t es = (int64_t)dtype_size(t);
    return Hierarchical::allreduce(staged_plan(h, a, count * es, es, arena_chunk, nodes, small_bytes,
                                               local_chunk_bytes.load(), small_block_bytes, single_copy_bytes,
                                               single_copy_chunk),
                                   data, count, t, seq, scale_by);
  }
};

}  // namespace fastar
