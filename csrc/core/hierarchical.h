// The paper's three phases, over a node's shared-memory arena and an inter-node transport.
//
// The buffer is processed in chunks of the arena's chunk size. Per chunk: every local rank copies its
// part into its slot; each local rank sums its 1/L slice of all slots into the result area (a
// reduce-scatter, all cores busy); the inter-node phase allreduces the result among the nodes
// ("leader": local rank 0 runs the schedule on the whole chunk with the other nodes' leaders, as in
// the paper; "rail": every local rank runs it on its own slice with the ranks of the same local
// rank on the other nodes, so that every NIC works); every local rank copies the result back.
// The inter-node phase runs on the driver's worker thread while the caller already copies and
// reduces the next chunk, so local phases overlap the network (hier_driver.h). Small single-chunk buffers skip the second
// barrier: every rank sums all slots straight into its own tensor; on one node they go through the
// arena's small regions in blocks instead (the latency path: ShmArena::small_data).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "executor.h"
#include "plan.h"
#include "hier_driver.h"
#include "shm.h"

namespace fastar {


struct HierarchicalStats {
  int64_t chunks = 0;
  int64_t inter_bytes_sent = 0;
};

// Where a small one-node allreduce spends its time (fastar.collectives.latency_profile): stage
// durations summed over the calls made while `on`, in steady-clock nanoseconds.
struct LatencyProfile {
  bool on = false;
  int64_t calls = 0;
  int64_t checks_ns = 0;  // entry to the C++ side: tensor checks, the queue and executor locks
  int64_t copy_in_ns = 0;  // this rank's bytes into its small region, descriptor and block flags raised
  int64_t wait_ns = 0;  // until every local peer's flag is up, and their descriptors checked
  int64_t reduce_ns = 0;  // sum of all regions into this rank's tensor (the copy-out)
  int64_t exit_ns = 0;  // avg scaling, bookkeeping, releasing the locks
};

class Hierarchical {
 public:
  // inter: the transport among this rank's inter-node peers (leaders for Leader, same local rank for
  // Rail); nullptr when there is one node, or for non-leaders in Leader mode.
  Hierarchical(ShmArena* arena, Transport* inter, int num_nodes);
  // fastar.all_reduce's hierarchy: the one driver (hier_driver.h) with the staged phase (slots).
  // plan: fastar/policy.py's (hierarchy leader or rail; protocol latency, one-barrier or chunked).
  // scale: every element of the result multiplied by it (op avg: 1 / world size); the single-copy
  // protocol scales each slice once where it is summed, the others the whole buffer at the end.
  HierarchicalStats allreduce(const Plan& plan, void* data, int64_t count, DType t, uint64_t seq,
                              double scale = 1.0);
  // Throws std::invalid_argument, saying why, when this node cannot run the plan for `bytes`.
  void check_plan(const Plan& plan, int64_t bytes, size_t elem_bytes) const;
  // The halves, over the node's ranks (local rank l of node n is global rank n * L + l) with `shard`
  // elements per rank. reduce_scatter: `out` (shard elements) gets the sum over all ranks of shard
  // `rank` of `in` (size * shard elements, left unchanged). allgather: `out` (size * shard) gets
  // every rank's `in` (shard) at its place; t may be Bytes. `algo` is the half's algorithm as it
  // runs (halves_algorithm, chosen by the caller). Through the one driver like the allreduce:
  // locally they go through the slots in chunks (every local rank sums its own shard from all
  // slots, or copies all of them out); between nodes the rail (same local rank on every node) runs
  // the schedule's half on each chunk on the driver's worker while the caller works on the next.
  // plan: fastar/policy.py's: the schedule's algorithm between nodes, the chunk (how many bytes of
  // the slots one chunk fills), streaming stores for the allgather's output.
  HierarchicalStats reduce_scatter(const Plan& plan, const void* in, void* out, int64_t shard, DType t, uint64_t seq);
  HierarchicalStats allgather(const Plan& plan, const void* in, void* out, int64_t shard, DType t, uint64_t seq);
  // Tuning, set from any thread at any time (Communicator.set_*): a call reads each once.
  // (What an allreduce reads and writes, its protocol and chunk, is the plan's: fastar/policy.py.)
  static constexpr int kMaxSmallRanks = 64;
  LatencyProfile* profile = nullptr;  // set while profiling the latency path

 private:
  friend class ArenaCall;
  friend class StagedPhase;
  friend class HalvesPhase;
  friend class SingleCopyHalves;
  HierarchicalStats halves(bool scatter, const Plan& plan, const void* in, void* out, int64_t shard, DType t,
                           uint64_t seq);
  // Every collective's tail: the phase's descriptor published, the driver run over its chunks.
  template <class Phase>
  HierarchicalStats drive(Phase& ph, Algorithm a, DType t);
  // The shard-wide chunk of the halves: how many elements of a shard go through the slots at once
  // when a chunk of chunk_bytes (the plan's) holds `pieces` of them.
  int64_t halves_chunk(int64_t chunk_bytes, int64_t pieces, DType t) const;

  ShmArena* arena_;
  Transport* inter_;
  int num_nodes_;
  uint32_t gen_ = 0;
  std::vector<char> rail_buf_;  // the halves' rail phase: this rank's shards of every node, per chunk
  std::vector<char> scratch_;  // the single-copy protocol: the peers' bytes of one chunk, per peer
  HostSum codec_;
  HierarchicalDriver driver_;  // last: its worker stops before the rest goes
};

}  // namespace fastar
