// The one stateful object Python holds (fastar._C.Communicator): the process groups fastar made,
// this node's shared-memory arena, and a thread that runs queued collectives in submission order.
#pragma once
#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "core/call_check.h"
#include "core/failure.h"
#include "core/hierarchical.h"
#include "core/work_queue.h"
#include "core/shm.h"
#include "torch/pg_transport.h"
#include "torch/tensor_allreduce.h"

namespace fastar {

// Steady-clock seconds: the time base of AsyncWork's and the bucket engine's timestamps.
inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A route's name, as records and AsyncWork labels show it: "leader:halving_doubling[:bf16]".
std::string route_label(Hierarchy h, Algorithm a, Wire w = Wire::None);

// A handle for an allreduce in flight (async_op=True, or a bucket of fastar.wrap).
class AsyncWork {
 public:
  // Rethrows the collective's error. A wait that times out fails the communicator (`fails`): the
  // work may still be running, and everything after it would run out of step.
  void wait(double timeout_s);
  bool is_completed();
  void finish(std::exception_ptr e);
  // GPU work: after the CPU side finished, makes the waiting thread's current stream wait for it.
  StreamWait stream_wait;
  double start_s = 0, end_s = 0;  // steady clock, seconds
  std::string algorithm;
  std::shared_ptr<FailureState> fails;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
};

// A tensor fastar does not reduce (sparse, not contiguous, a dtype it does not sum): thrown before
// anything runs, so that the caller can take torch.distributed's way (fastar._C.NotForFastar).
struct NotForFastar : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct OpRecord {
  Hierarchy hierarchy = Hierarchy::Flat;
  Algorithm algorithm = Algorithm::HalvingDoubling;
  Protocol protocol = Protocol::Network;
  int64_t bytes = 0;
  double seconds = 0;
};

class Communicator {
 public:
  Communicator(Topology topo, c10::intrusive_ptr<c10d::ProcessGroup> world, std::vector<int> world_ranks,
               c10::intrusive_ptr<c10d::ProcessGroup> inter, std::vector<int> inter_ranks, std::string shm_name,
               bool shm_create, int64_t shm_chunk_bytes, double timeout_s);
  ~Communicator();
  void close();
  void unlink_shm();
  // The single-copy protocol's probe (ShmArena::probe_single_copy): every local rank calls it once,
  // together, after the arena is mapped by all; false without an arena.
  bool probe_single_copy(bool want);
  bool single_copy() const;
  // The one entry of an allreduce: in-place sum (avg: then divided by the world size) of t by
  // `plan` (fastar/policy.py's; plan.h). Inline, on the caller's thread, when nothing is queued and
  // not async_op: returns nullptr, done. Else queued behind the earlier work: the returned work
  // completes it. The plan's wire is the dtype on the wire, accumulation in the tensor's. CUDA
  // tensors and compressed wires take the TensorAllreduce path (process groups registered with
  // set_tensor_groups); the rest the byte-level core (Gloo, shared memory). The latency protocol
  // (one node, small CPU tensors) inline allocates nothing and formats no strings; the arena's
  // descriptor check validates the call. Throws NotForFastar for a tensor fastar does not reduce,
  // and std::invalid_argument for a plan that cannot run here, before anything runs.
  std::shared_ptr<AsyncWork> allreduce(at::Tensor t, const Plan& plan, bool avg, bool validate, bool async_op);
  // Stage timings of the latency path (LatencyProfile), reset when switched; for
  // bench/latency_breakdown.py. Off by default (each stage costs a clock read when on).
  void set_latency_profile(bool on);
  LatencyProfile latency_profile();
  // The two halves of the allreduce as collectives (fastar.reduce_scatter_single and
  // fastar.all_gather_single, and the torch.distributed backend's), CPU tensors only. reduce_scatter: `out` gets
  // the sum (avg: mean) over all ranks of shard `rank` of `in` (size x out's elements, float dtypes).
  // allgather: `out` (size x in's elements, any dtype: bytes are moved) gets every rank's `in` at
  // its place. In shared memory on each node, the schedule's half between nodes. plan: fastar/
  // policy.py's (collective, algorithm, protocol halves with an arena or network without, chunk);
  // one it cannot run is refused before anything runs, and so are tensors it does not run
  // (NotForFastar: CUDA, strided or sparse, two dtypes, a dtype a reduce-scatter does not sum;
  // std::invalid_argument: sizes that do not match the world size). Run at once when nothing is queued and not
  // async_op (then nullptr is returned: it is complete), else queued in submission order (its work).
  std::shared_ptr<AsyncWork> reduce_scatter(at::Tensor out, at::Tensor in, const Plan& plan, bool avg, bool validate,
                                            bool async_op);
  std::shared_ptr<AsyncWork> allgather(at::Tensor out, at::Tensor in, const Plan& plan, bool validate, bool async_op);
  // Queues fn behind every collective submitted before it (fastar.wrap's shared-memory buckets).
  std::shared_ptr<AsyncWork> submit(std::function<void()> fn, const std::string& label);
  void set_tensor_groups(const std::string& device_type, TensorGroups g);
  bool has_tensor_groups(const std::string& device_type);
  Transport* inter_transport() const { return inter_.get(); }
  double timeout_s() const { return timeout_->seconds(); }
  // Shared by every wait of this communicator (its transports and arenas, wrap's bucket arena).
  const SharedTimeout& timeout() const { return timeout_; }
  const std::shared_ptr<FailureState>& failure_state() const { return failure_; }
  // The first failure (timeout, dead peer, disagreement) fails the communicator: every queued and
  // later operation then fails at once with it, instead of each waiting out its own timeout.
  // fastar.shutdown() + fastar.init() make a new one. Null while healthy.
  std::exception_ptr failure();
  // Marks the communicator failed with e (the first call wins), and every arena it drives.
  void fail(std::exception_ptr e);
  // Takes effect at once, also for waits in progress (no lock that a running collective holds).
  void set_timeout(double s);
  // A rank abandoned an iteration of wrap (a missing gradient): call numbers jump to the next
  // multiple of 2^20, so that a later call never matches a call of the abandoned iteration that a
  // peer still runs (ranks that abandoned alike stay in step).
  void skip_sequence();
  const Topology& topology() const { return topo_; }
  bool has_shm() const { return arena_ != nullptr; }
  int64_t shm_chunk_bytes() const { return arena_ ? arena_->chunk_bytes() : 0; }  // a fact the plan needs
  std::string shm_name() const { return arena_ ? arena_->name() : ""; }
  OpRecord last_op();
  // Test hook: fails the communicator with this message (as a first error would).
  void fail_for_test(const std::string& why);

 private:
  std::shared_ptr<AsyncWork> submit_work(std::function<void(AsyncWork&)> fn, const std::string& label);
  // Refuses (std::invalid_argument, before anything runs) a plan this communicator cannot run.
  void check_plan(const at::Tensor& t, const Plan& plan, DType dt);
  // The latency protocol inline; false (nothing done) when queued work must go first.
  bool run_latency(const at::Tensor& t, const Plan& plan, bool avg);
  StreamWait run(at::Tensor t, const Plan& plan, bool avg, bool validate, const StreamWait& ready);
  StreamWait run_locked(at::Tensor t, const Plan& plan, bool avg, bool validate, const StreamWait& ready);
  // The header exchange with the peers of a schedule (call_check.h) before any data moves.
  void validate_peers(PGTransport& tr, Algorithm algo, const uint64_t desc[kDescWords], const char* what);
  void record(const OpRecord& r);
  std::shared_ptr<AsyncWork> halves(bool scatter, at::Tensor out, at::Tensor in, const Plan& plan, bool avg,
                                    bool validate, bool async_op);
  void run_halves_locked(bool scatter, const at::Tensor& out, const at::Tensor& in, const Plan& plan, bool avg,
                         bool validate);

  Topology topo_;
  SharedTimeout timeout_;
  std::shared_ptr<FailureState> failure_;
  std::unique_ptr<PGTransport> world_;
  std::unique_ptr<PGTransport> inter_;
  std::shared_ptr<ShmArena> arena_;
  std::unique_ptr<Hierarchical> hier_;
  std::unique_ptr<TensorAllreduce> tensor_;
  Executor exec_;
  uint64_t seq_ = 0;
  bool fast_ok_ = false;
  LatencyProfile profile_;  // one node, several local ranks: the latency protocol may run
  HeaderExchange header_;
  OpRecord last_;  // guarded by rec_mu_ (read while a collective runs)
  std::vector<at::Tensor> graveyard_;  // tensors of failed operations (see close())

  std::mutex exec_mu_;  // one collective at a time, in submission order
  std::mutex rec_mu_;
  std::mutex life_mu_;  // the objects close() releases, for the calls that do not take exec_mu_
  WorkQueue queue_{failure_, timeout_};  // last: its worker stops (close) before the rest goes
};

}  // namespace fastar
