// Gradient buckets for fastar.wrap: gradients are copied (scaled by 1/world, one pass) into flat
// buckets as autograd produces them; a full bucket goes to the communicator's thread at once, in
// the same bucket order on every rank, while backward goes on; finalize waits for the last bucket
// and copies the averaged gradients back into .grad.
#pragma once
#include <torch/extension.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/arena_allreduce.h"
#include "torch/communicator.h"

namespace fastar {

struct Bucket {
  std::vector<int64_t> params;   // indices into the engine's parameter list
  std::vector<int64_t> offsets;  // element offset of each parameter in flat
  at::Tensor flat;
  int64_t pending = 0;
  Plan plan;  // fastar/policy.py's (set_plan)
  std::shared_ptr<AsyncWork> work;
  double ready_s = 0;  // when its last gradient arrived
  int64_t region_offset = 0;  // byte offset in the shared region, when buckets live there
  // CUDA buckets: gradients wait here until the bucket is complete, then one kernel packs them all.
  std::vector<at::Tensor> staged;
  std::vector<int64_t> staged_offsets;
};

class BucketEngine {
 public:
  // order: parameter indices in the order their gradients are expected (reverse definition order
  // before the first iteration). Buckets never mix dtypes or devices.
  BucketEngine(std::shared_ptr<Communicator> comm, std::vector<at::Tensor> params, std::vector<int64_t> order,
               int64_t cap_bytes, int64_t first_cap_bytes, bool as_view);
  void rebuild(const std::vector<int64_t>& order);
  // Bytes of shared memory one rank needs for its buckets, whatever their order.
  int64_t arena_bytes_needed() const;
  // Moves the buckets into this node's shared segment `name` (created by local rank 0): the local
  // phase then reads every rank's bucket where it lies. Collective over the node.
  void attach_arena(const std::string& name, bool create);
  void unlink_arena();
  // Moves the buckets back into private memory (when a peer could not map the segment).
  void detach_arena();
  bool has_arena() const { return arena_ != nullptr; }
  int64_t num_buckets() const { return (int64_t)buckets_.size(); }
  int64_t bucket_bytes(int64_t b) const;
  std::vector<int64_t> bucket_params(int64_t b) const { return buckets_.at(b).params; }
  // Bucket b's plan: the in-place protocol runs it in the bucket arena (attach_arena first), any
  // other through the communicator's allreduce.
  void set_plan(int64_t b, const Plan& plan);
  // The dtype of gradients on the wire (accumulation stays fp32).

  void mark_ready(int64_t param, const at::Tensor& grad);
  // Parameters that got no gradient this iteration (finalize then launches nothing for them).
  std::vector<int64_t> missing() const;
  // fill_unused: treat missing gradients as zeros. Waits for every bucket, writes .grad.
  void finalize(bool fill_unused);
  // Ends an iteration that cannot be finalized (a missing gradient): waits for the buckets already
  // launched, then forgets this iteration's gradients, so that the next backward starts clean.
  void abandon();
  ~BucketEngine();
  std::vector<int64_t> ready_order() const { return ready_order_; }
  bool in_iteration() const { return started_; }
  // Per bucket: bytes, ready, start, end (steady-clock seconds), algorithm.
  std::vector<std::tuple<int64_t, double, double, double, std::string>> stats() const;

 private:
  void layout(const std::vector<int64_t>& order);
  void relayout(const std::vector<int64_t>& order);  // layout() after detaching .grad views
  void launch_ready_locked();
  void complete_locked(Bucket& b);  // the bucket's last gradient arrived
  std::exception_ptr wait_launched();  // the first error of the launched buckets
  void reset_iteration();

  std::shared_ptr<Communicator> comm_;
  std::shared_ptr<ShmArena> arena_;  // also held by region_'s tensors: .grad views outlive the engine
  // Shared with the queued bucket tasks, which may outlive this engine (a wrapper dropped with
  // buckets in flight): they hold the allreduce and the mapping until they have run.
  std::shared_ptr<ArenaAllreduce> arena_ar_;
  at::Tensor region_;  // this rank's region of the segment, as bytes
  uint64_t seq_ = 0;
  std::vector<at::Tensor> params_;
  std::vector<std::pair<int64_t, int64_t>> where_;  // param -> (bucket, offset)
  std::vector<Bucket> buckets_;
  std::vector<char> marked_;
  std::vector<int64_t> ready_order_;
  int64_t cap_bytes_, first_cap_bytes_;
  bool as_view_;
  double scale_;
  size_t next_launch_ = 0;
  bool started_ = false;
  mutable std::mutex mu_;
};

}  // namespace fastar
