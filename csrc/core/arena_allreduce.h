// Allreduce of buffers that already live in the node's shared memory: fastar.wrap's buckets. Every
// local rank owns a region of one segment and lays its buckets out identically in it, so the local
// phase needs no copy-in: each rank sums its 1/L slice of the bucket straight from all ranks'
// regions, runs the inter-node phase on that slice ("rail"; with "leader" the slices are summed
// into local rank 0's region, which allreduces the whole bucket with the other leaders), then
// writes the finished slice into every peer's region. Per rank and bucket of B bytes that is about
// B read + B/L + B written, against 4B for copy-in, reduce and copy-out through slots.
#pragma once
#include <cstdint>

#include "executor.h"
#include "hier_driver.h"
#include "hierarchical.h"
#include "shm.h"

namespace fastar {

class ArenaAllreduce {
 public:
  // arena: a segment whose slot(r, 0) is local rank r's region.
  ArenaAllreduce(ShmArena* arena, Transport* inter, int num_nodes)
      : arena_(arena), inter_(inter), num_nodes_(num_nodes), driver_(inter, /*worker=*/false) {}
  char* region(int local_rank) const { return arena_->slot(local_rank, 0); }
  int64_t region_bytes() const { return arena_->chunk_bytes(); }
  // Sums the `count` elements at byte `offset` of every rank's region (across all nodes) into every
  // region: the one driver (hier_driver.h) with the in-place phase (one chunk: the bucket).
  // plan: fastar/policy.py's (protocol in place; hierarchy leader or rail).
  void allreduce(const Plan& plan, int64_t offset, int64_t count, DType t, uint64_t seq);

 private:
  ShmArena* arena_;
  Transport* inter_;
  int num_nodes_;
  uint32_t gen_ = 0;
  HostSum codec_;
  HierarchicalDriver driver_;
};

}  // namespace fastar
