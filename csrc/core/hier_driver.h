// The one hierarchical driver (issue #12): the paper's three phases, with the node's phase
// pluggable, for the three collectives (allreduce, reduce-scatter, allgather). For each chunk of a
// buffer the LocalPhase does its node's part first and says which part this rank carries between
// nodes; the driver runs the schedule of the phase's collective on that part over the inter-node
// transport (the step loop, with the caller's codec); then the phase hands the result to every
// local rank. A pipelined phase gets the inter-node run of chunk c on the driver's worker thread
// while the caller already works on chunk c+1 (and hands out chunk c-1).
//  - allreduce: reduce inside the node, allreduce between nodes, copy the result back;
//  - reduce-scatter: reduce inside the node into the rail's N shard pieces of the chunk,
//    reduce-scatter them between nodes, copy this node's piece out;
//  - allgather: this rank's piece of the chunk into the rail's buffer, allgather it between
//    nodes, then the local exchange that hands every piece to every local rank.
//
// The phases:
//  - staged slots in the node's shared-memory arena (hierarchical.cpp: fastar.all_reduce, and the
//    halves: reduce_scatter / allgather);
//  - in place in the bucket arena (arena_allreduce.cpp: fastar.wrap's buckets);
//  - a c10d local group, NCCL or Gloo (csrc/torch/tensor_allreduce.cpp: CUDA tensors and
//    compressed wires).
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "executor.h"
#include "failure.h"
#include "plan.h"

namespace fastar {

struct Part {
  void* data = nullptr;  // nullptr: this rank carries nothing between nodes for this chunk
  int64_t count = 0;
};

class LocalPhase {
 public:
  virtual ~LocalPhase() = default;
  virtual int64_t chunks() const = 0;
  // Which schedule the driver runs between nodes on a chunk's part (schedule.h): make_schedule, or
  // one half (reduce_scatter_schedule, allgather_schedule: the part is N balanced shard pieces).
  virtual Collective collective() const { return Collective::Allreduce; }
  // Chunk c's local work before the inter-node run (the local reduction; for an allgather, this
  // rank's piece into place); returns the part this rank carries between nodes.
  virtual Part reduce(int64_t c) = 0;
  // Around this rank's inter-node run of chunk c (on the worker, for a pipelined phase): e.g. the
  // leader waits for every local slice first, and tells the local ranks when the result is in.
  virtual void before_inter(int64_t c) { (void)c; }
  virtual void after_inter(int64_t c) { (void)c; }
  // Chunk c's result into every local rank's buffer (after its inter-node run).
  virtual void distribute(int64_t c) = 0;
  virtual bool pipelined() const { return false; }
  // The run failed (this rank's error): local peers waiting on this rank fail at once.
  virtual void failed(const std::string& why) { (void)why; }
};

class HierarchicalDriver {
 public:
  // inter: this rank's transport to its inter-node peers (nullptr: one node, or none for this
  // rank); worker: start the pipeline thread (phases that are never pipelined need none).
  HierarchicalDriver(Transport* inter, bool worker);
  ~HierarchicalDriver();
  HierarchicalDriver(const HierarchicalDriver&) = delete;
  HierarchicalDriver& operator=(const HierarchicalDriver&) = delete;
  void set_tag_base(uint32_t t) { exec_.set_tag_base(t); }
  // Runs the phase over every chunk; returns the bytes this rank sent between nodes.
  int64_t run(LocalPhase& ph, Algorithm algo, Codec& codec);

 private:
  struct Job {
    LocalPhase* ph;
    int64_t c;
    Part part;
    Algorithm algo;
    Codec* codec;
    const OpContext* op = nullptr;  // the caller's operation: the worker's waits keep its deadline
  };
  std::vector<Step> schedule(const Job& j) const;  // the phase's collective over the inter-node peers
  void inter_run(const Job& j);  // before_inter, the schedule, after_inter
  void worker_loop();
  void wait_job(int64_t c);

  Transport* inter_;
  Executor exec_;
  int64_t bytes_ = 0;
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  int64_t done_ = -1;  // the last chunk the worker finished, this run
  std::exception_ptr error_;  // the worker's failure, this run
  bool busy_ = false;  // the worker holds a job
  bool abort_ = false;  // the caller failed: the worker skips what is left
  bool stop_ = false;
};

}  // namespace fastar
