#include "torch/communicator.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "core/flat_halves.h"
#include "core/reduce.h"
#include "torch/dtype_map.h"

namespace fastar {
namespace {

at::ScalarType wire_dtype(Wire w, at::ScalarType own) {
  // Only fp32/fp64 tensors are compressed; 16-bit ones already are.
  if (w == Wire::None || (own != at::kFloat && own != at::kDouble)) return own;
  return w == Wire::Fp16 ? at::kHalf : at::kBFloat16;
}

}  // namespace

std::string route_label(Hierarchy h, Algorithm a, Wire w) {
  return std::string(hierarchy_name(h)) + ":" + algorithm_name(a) + (w == Wire::None ? "" : std::string(":") + wire_name(w));
}

void AsyncWork::wait(double timeout_s) {
  if (!(timeout_s > 0))
    throw std::invalid_argument("fastar: a wait's timeout must be a positive number of seconds, got " +
                                std::to_string(timeout_s));
  timeout_s = std::min(timeout_s, 10 * Timeout::kMaxSeconds);  // no overflow in the clock's arithmetic
  std::unique_lock<std::mutex> l(mu_);
  if (!cv_.wait_for(l, std::chrono::duration<double>(timeout_s), [&] { return done_; })) {
    l.unlock();
    auto e = std::make_exception_ptr(std::runtime_error(
        "fastar: " + (algorithm.empty() ? std::string("a collective") : algorithm) + " did not complete within " +
        std::to_string((int64_t)timeout_s) + " s (a peer rank is stuck or dead)"));
    if (fails) fails->fail(e);  // the work may still run: nothing after it may
    std::rethrow_exception(e);
  }
  if (error_) std::rethrow_exception(error_);
  if (stream_wait) stream_wait();
}

bool AsyncWork::is_completed() {
  std::lock_guard<std::mutex> g(mu_);
  return done_;
}

void AsyncWork::finish(std::exception_ptr e) {
  {
    std::lock_guard<std::mutex> g(mu_);
    done_ = true;
    error_ = e;
  }
  cv_.notify_all();
}

Communicator::Communicator(Topology topo, c10::intrusive_ptr<c10d::ProcessGroup> world, std::vector<int> world_ranks,
                           c10::intrusive_ptr<c10d::ProcessGroup> inter, std::vector<int> inter_ranks,
                           std::string shm_name, bool shm_create, int64_t shm_chunk_bytes, double timeout_s)
    : topo_(topo), timeout_(std::make_shared<Timeout>(timeout_s)), failure_(std::make_shared<FailureState>()) {
  world_ = std::make_unique<PGTransport>(world, world_ranks, timeout_, "fastar's world group");
  world_->watch_failures(failure_);  // the first failure reaches every rank with its reason
  if (inter) inter_ = std::make_unique<PGTransport>(inter, inter_ranks, timeout_, "fastar's inter-node group");
  if (!shm_name.empty()) {
    arena_ = std::make_shared<ShmArena>(shm_name, shm_create, topo.local_rank, topo.local_size, shm_chunk_bytes,
                                        timeout_s);
    arena_->share_timeout(timeout_);
    arena_->set_first_global_rank(topo.node * topo.local_size);
    failure_->watch(arena_);
    hier_ = std::make_unique<Hierarchical>(arena_.get(), inter_.get(), topo.num_nodes);
    fast_ok_ = topo.num_nodes == 1;
  }
  tensor_ = std::make_unique<TensorAllreduce>(topo, timeout_);
}

Communicator::~Communicator() { close(); }

void Communicator::close() {
  queue_.close();  // runs what was queued before the close
  std::lock_guard<std::mutex> g(exec_mu_);
  if (!world_) return;  // closed before
  std::lock_guard<std::mutex> life(life_mu_);
  world_->stop_watching();
  // Release the transports now, not at interpreter exit (a wrapped model can keep this object
  // alive until then), so that retained Gloo works die while their process groups still exist.
  // After a failure, operations may still be posted on them, reading or writing buffers that this
  // object owns (scratch) or holds (tensors): those stay allocated for the life of the process.
  if (failure()) {
    keep_forever(std::shared_ptr<Hierarchical>(hier_.release()));
    keep_forever(std::move(arena_));
    keep_forever(std::shared_ptr<PGTransport>(world_.release()));
    keep_forever(std::shared_ptr<PGTransport>(inter_.release()));
    keep_forever(std::shared_ptr<TensorAllreduce>(tensor_.release()));
    keep_forever(std::make_shared<Executor>(std::move(exec_)));
    keep_forever(std::make_shared<std::vector<at::Tensor>>(std::move(graveyard_)));
  } else {
    hier_.reset();
    arena_.reset();
    world_.reset();
    inter_.reset();
    tensor_.reset();
  }
}

std::exception_ptr Communicator::failure() { return failure_->cause(); }

// Local peers waiting on this rank in any arena it drives fail at once, with this rank's reason.
void Communicator::fail(std::exception_ptr e) { failure_->fail(e); }

void Communicator::fail_for_test(const std::string& why) {
  fail(std::make_exception_ptr(std::runtime_error(why)));
}

bool Communicator::probe_single_copy(bool want) {
  std::lock_guard<std::mutex> g(exec_mu_);
  if (!arena_) return false;
  OpScope op(timeout_.get(), failure_.get());  // one deadline, like a collective's
  return arena_->probe_single_copy(want);
}

bool Communicator::single_copy() const { return arena_ && arena_->single_copy(); }

void Communicator::unlink_shm() {
  if (arena_) arena_->unlink();
}

void Communicator::set_timeout(double s) {
  // Every wait reads the shared timeout at each check; Gloo waits in progress are woken to re-read it.
  timeout_->set(s);
}

void Communicator::skip_sequence() {
  std::lock_guard<std::mutex> g(exec_mu_);
  seq_ = (seq_ | ((uint64_t(1) << 20) - 1)) + 1;
}

void Communicator::set_tensor_groups(const std::string& device_type, TensorGroups g) {
  std::lock_guard<std::mutex> lock(exec_mu_);
  TORCH_CHECK(tensor_, "fastar: the communicator was closed (fastar.shutdown() was called)");
  tensor_->set_groups(c10::Device(device_type).type(), std::move(g));
}

bool Communicator::has_tensor_groups(const std::string& device_type) {
  std::lock_guard<std::mutex> lock(exec_mu_);
  return tensor_ && tensor_->has_groups(c10::Device(device_type).type());
}


OpRecord Communicator::last_op() {
  std::lock_guard<std::mutex> g(rec_mu_);
  return last_;
}

void Communicator::record(const OpRecord& r) {
  std::lock_guard<std::mutex> g(rec_mu_);
  last_ = r;
}

std::shared_ptr<AsyncWork> Communicator::submit(std::function<void()> fn, const std::string& label) {
  return submit_work([fn](AsyncWork&) { fn(); }, label);
}

std::shared_ptr<AsyncWork> Communicator::submit_work(std::function<void(AsyncWork&)> fn, const std::string& label) {
  auto work = std::make_shared<AsyncWork>();
  work->algorithm = label;
  work->fails = failure_;
  queue_.push([fn, work](std::exception_ptr e) {
    work->start_s = now_s();
    if (!e) {
      try {
        fn(*work);
      } catch (...) {
        e = std::current_exception();
      }
    }
    work->end_s = now_s();
    work->finish(e);
    if (e) std::rethrow_exception(e);  // the queue fails the communicator with it (a no-op if it had)
  });
  return work;
}

namespace {

// What fastar reduces: dense contiguous CPU or CUDA tensors of a dtype it sums.
void check_for_fastar(const at::Tensor& t, DType* dt) {
  if (t.layout() != at::kStrided || !t.is_contiguous())
    throw NotForFastar("fastar: allreduce needs a dense contiguous tensor");
  if (!try_dtype(t.scalar_type(), dt)) throw NotForFastar("fastar: allreduce does not sum this dtype");
}

}  // namespace

std::shared_ptr<AsyncWork> Communicator::allreduce(at::Tensor t, const Plan& plan, bool avg, bool validate,
                                                   bool async_op) {
  if (plan.collective != Collective::Allreduce)
    throw std::invalid_argument(std::string("fastar: an allreduce got a plan for ") + collective_name(plan.collective));
  if (!async_op && plan.protocol == Protocol::Latency && run_latency(t, plan, avg)) return nullptr;
  DType dt;
  check_for_fastar(t, &dt);
  check_plan(t, plan, dt);
  // A GPU tensor's producer is whatever the caller's stream has queued so far: mark that point now.
  if (async_op || !queue_.enter_inline()) {
    StreamWait ready = TensorAllreduce::producer_event(t);
    return submit_work([this, t, plan, avg, validate, ready](
                           AsyncWork& w) { w.stream_wait = run(t, plan, avg, validate, ready); },
                       plan_label(plan));
  }
  // Inline: same order on every rank (nothing queued before it), no thread hop.
  StreamWait after;
  queue_.run_inline([&] { after = run(t, plan, avg, validate, TensorAllreduce::producer_event(t)); });
  if (after) after();  // the caller's stream waits for fastar's, as after an NCCL collective
  return nullptr;
}

void Communicator::check_plan(const at::Tensor& t, const Plan& plan, DType dt) {
  auto refuse = [&](const char* why) { refuse_plan(plan, "an allreduce", why); };
  const bool tensor_path = t.is_cuda() || wire_dtype(plan.wire, t.scalar_type()) != t.scalar_type();
  if (tensor_path || plan.hierarchy == Hierarchy::Flat) {
    if (plan.protocol != Protocol::Network) refuse("flat plans, CUDA tensors and compressed wires run the network protocol");
    if (plan.hierarchy != Hierarchy::Flat && topo_.local_size == 1) refuse("one rank per node has no local phase");
    return;
  }
  std::lock_guard<std::mutex> g(life_mu_);
  if (!hier_) {
    if (!world_) return;  // closed: the call raises that
    refuse("one rank per node has no local phase");
  }
  hier_->check_plan(plan, t.numel() * (int64_t)dtype_size(dt), dtype_size(dt));
}

bool Communicator::run_latency(const at::Tensor& t, const Plan& plan, bool avg) {
  const auto entry = profile_.on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  if (t.device().type() != c10::DeviceType::CPU)
    throw std::invalid_argument("fastar: the latency protocol runs CPU tensors (a plan of fastar/policy.py's was wrong)");
  DType dt;
  check_for_fastar(t, &dt);
  const int64_t count = t.numel();
  const int64_t bytes = count * (int64_t)dtype_size(dt);
  if (!queue_.enter_inline()) return false;  // queued work first (a failed or closed communicator raises)
  std::exception_ptr e, refused;
  std::chrono::steady_clock::time_point t1;
  bool prof;
  {
    std::lock_guard<std::mutex> g(exec_mu_);
    prof = profile_.on;
    const auto t0 = std::chrono::steady_clock::now();
    if (prof) profile_.checks_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(t0 - entry).count();
    void* data = t.data_ptr();
    try {  // a plan this node cannot run is refused before anything runs: the communicator stays healthy
      if (!hier_) throw std::invalid_argument("fastar: the latency protocol needs the node's arena (one rank per node here)");
      hier_->check_plan(plan, bytes, dtype_size(dt));
    } catch (...) {
      refused = std::current_exception();
    }
    if (refused) {
      queue_.leave_inline();
      std::rethrow_exception(refused);
    }
    try {
      OpScope op(timeout_.get(), failure_.get(), /*lazy=*/true);  // one deadline; no clock read unless it waits
      hier_->allreduce(plan, data, count, dt, ++seq_, avg ? 1.0 / topo_.size : 1.0);
    } catch (...) {
      e = std::current_exception();
      graveyard_.push_back(t);
    }
    t1 = std::chrono::steady_clock::now();
    record({plan.hierarchy, plan.algorithm, plan.protocol, bytes, std::chrono::duration<double>(t1 - t0).count()});
    if (prof) ++profile_.calls;
  }
  if (e) fail(e);
  queue_.leave_inline();
  if (prof)
    profile_.exit_ns +=
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t1).count();
  if (e) std::rethrow_exception(e);
  return true;
}

void Communicator::set_latency_profile(bool on) {
  std::lock_guard<std::mutex> g(exec_mu_);
  profile_ = LatencyProfile{};
  profile_.on = on;
  if (hier_) hier_->profile = on ? &profile_ : nullptr;
}

LatencyProfile Communicator::latency_profile() {
  std::lock_guard<std::mutex> g(exec_mu_);
  return profile_;
}

void Communicator::validate_peers(PGTransport& tr, Algorithm algo, const uint64_t desc[kDescWords],
                                  const char* what) {
  // One header to and from every peer of the schedule before any data moves, so that ranks that
  // disagree fail with a message instead of mismatched receives. The peers come from the schedule
  // of a non-empty buffer, so that a rank passing an empty tensor still takes part.
  std::vector<int> peers;
  for (const auto& s : make_schedule(algo, tr.rank(), tr.size(), 1))
    for (int p : {s.send_peer, s.recv_peer})
      if (p >= 0 && std::find(peers.begin(), peers.end(), p) == peers.end()) peers.push_back(p);
  const uint32_t tag = 0x7F000000u | (uint32_t)(desc[kSeq] & 0xFFFF);
  header_.run(tr, peers, desc, tag, what, [&](int p) {
    return "rank " + std::to_string(p < 0 ? topo_.rank : tr.global_rank(p));
  });
}

StreamWait Communicator::run(at::Tensor t, const Plan& plan, bool avg, bool validate, const StreamWait& ready) {
  std::lock_guard<std::mutex> g(exec_mu_);
  TORCH_CHECK(world_, "fastar: the communicator was closed (fastar.shutdown() was called)");
  try {
    return run_locked(t, plan, avg, validate, ready);
  } catch (...) {
    graveyard_.push_back(t);  // receives may still be posted into it: keep its memory
    throw;
  }
}

StreamWait Communicator::run_locked(at::Tensor t, const Plan& plan, bool avg, bool validate, const StreamWait& ready) {
  const DType dt = to_dtype(t.scalar_type());
  const at::ScalarType wire = wire_dtype(plan.wire, t.scalar_type());
  const uint64_t seq = ++seq_;
  const double t0 = now_s();
  const int64_t count = t.numel();
  const Hierarchy h = plan.hierarchy;
  const Algorithm algo = plan.algorithm;
  uint64_t desc[kDescWords];
  if (t.is_cuda() || wire != t.scalar_type()) {
    TORCH_CHECK(t.is_cuda() || t.device().is_cpu(), "fastar: tensors on ", t.device(), " are not supported");
    // An NCCL-only group (a user's subgroup) has no CPU side for the header: NCCL checks the sizes.
    if (validate && topo_.size > 1 && world_->has_backend()) {
      encode_desc(plan, seq, count, (uint64_t)t.scalar_type(), desc);
      validate_peers(*world_, algo, desc, "an allreduce");
    }
    StreamWait after = tensor_->run(t, algo, h, avg, wire, ready, seq);
    record({h, algo, plan.protocol, count * (int64_t)dtype_size(dt), now_s() - t0});
    return after;
  }
  TORCH_CHECK(t.device().is_cpu(), "fastar: tensors on ", t.device(), " are not supported (CPU or CUDA only)");
  void* data = t.data_ptr();
  encode_desc(plan, seq, count, (uint64_t)t.scalar_type(), desc);
  if (h == Hierarchy::Flat) {
    auto steps = make_schedule(algo, world_->rank(), world_->size(), count);
    if (validate && topo_.size > 1) validate_peers(*world_, algo, desc, "an allreduce");
    exec_.set_tag_base((uint32_t)(seq & 0x3FF) << 20);
    exec_.run(steps, *world_, data, count, dt);
  } else {
    if (!hier_) throw std::logic_error("fastar: a staged plan without the node's arena");
    // The shared-memory phase checks the local ranks against each other; the ranks that carry the
    // inter-node phase check their inter-node peers the same way as the flat path.
    if (validate && inter_ && topo_.num_nodes > 1 && (h == Hierarchy::Rail || topo_.local_rank == 0)) {
      try {
        validate_peers(*inter_, algo, desc, "an allreduce");
      } catch (const std::exception& e) {
        arena_->mark_failed(e.what());  // local peers fail at once, with this reason
        throw;
      }
    }
    hier_->allreduce(plan, data, count, dt, seq, avg && topo_.size > 1 ? 1.0 / topo_.size : 1.0);
  }
  if (avg && topo_.size > 1 && h == Hierarchy::Flat) scale(dt, data, 1.0 / topo_.size, count);
  record({h, algo, plan.protocol, count * (int64_t)dtype_size(dt), now_s() - t0});
  return {};
}

std::shared_ptr<AsyncWork> Communicator::reduce_scatter(at::Tensor out, at::Tensor in, const Plan& plan, bool avg,
                                                        bool validate, bool async_op) {
  return halves(true, std::move(out), std::move(in), plan, avg, validate, async_op);
}

std::shared_ptr<AsyncWork> Communicator::allgather(at::Tensor out, at::Tensor in, const Plan& plan, bool validate,
                                                   bool async_op) {
  return halves(false, std::move(out), std::move(in), plan, false, validate, async_op);
}

std::shared_ptr<AsyncWork> Communicator::halves(bool scatter, at::Tensor out, at::Tensor in, const Plan& plan,
                                                bool avg, bool validate, bool async_op) {
  // The plan is checked before anything runs: a plan this communicator cannot run is refused
  // (std::invalid_argument) and leaves it healthy.
  const Collective want = scatter ? Collective::ReduceScatter : Collective::Allgather;
  const char* what = scatter ? "a reduce_scatter" : "an allgather";
  // Tensors fastar does not run (CUDA ones, strided or sparse, a dtype a reduce-scatter does not sum)
  // raise NotForFastar, and a wrong size std::invalid_argument, before anything runs: the
  // communicator stays healthy and the caller takes torch.distributed's way or gives its message.
  for (const at::Tensor* t : {&out, &in}) {
    if (!t->device().is_cpu())
      throw NotForFastar(std::string("fastar: ") + what + " runs on CPU tensors (CUDA ones go to NCCL)");
    if (t->layout() != at::kStrided || !t->is_contiguous())
      throw NotForFastar(std::string("fastar: ") + what + " needs dense contiguous tensors");
  }
  if (in.scalar_type() != out.scalar_type())
    throw NotForFastar(std::string("fastar: ") + what + " needs one dtype for its input and output");
  DType summed;
  if (scatter && !try_dtype(in.scalar_type(), &summed))
    throw NotForFastar("fastar: a reduce_scatter does not sum this dtype");
  {
    const at::Tensor& whole = scatter ? in : out;
    const at::Tensor& part = scatter ? out : in;
    if (whole.numel() != part.numel() * (int64_t)topo_.size)
      throw std::invalid_argument(std::string("fastar: ") + what + ": the " + (scatter ? "input" : "output") +
                                  " must hold world size (" + std::to_string(topo_.size) + ") x " +
                                  std::to_string(part.numel()) + " elements (the " + (scatter ? "output" : "input") +
                                  "'s), not " + std::to_string(whole.numel()));
  }
  auto refuse = [&](const std::string& why) { refuse_plan(plan, what, why); };
  if (plan.collective != want) refuse(std::string("it is a plan for ") + collective_name(plan.collective));
  const int participants = arena_ ? topo_.num_nodes : topo_.size;
  if (plan.algorithm == Algorithm::HalvingDoubling && (participants & (participants - 1)) != 0)
    refuse("halving/doubling halves need a power-of-two count of participants, not " + std::to_string(participants));
  if (plan.protocol != (arena_ ? Protocol::Halves : Protocol::Network) && !(arena_ && plan.protocol == Protocol::SingleCopy))
    refuse(arena_ ? "the node's arena runs the halves or single-copy protocol"
                  : "without an arena the halves run the network protocol");
  if (arena_ && (plan.chunk_bytes < 1 || plan.chunk_bytes > arena_->chunk_bytes()))
    refuse("the chunk must fit the arena's slot of " + std::to_string(arena_->chunk_bytes()) + " B");
  auto body = [this, scatter, out, in, plan, avg, validate] {
    std::lock_guard<std::mutex> g(exec_mu_);
    TORCH_CHECK(world_, "fastar: the communicator was closed (fastar.shutdown() was called)");
    try {
      run_halves_locked(scatter, out, in, plan, avg, validate);
    } catch (...) {
      graveyard_.push_back(out);  // receives may still be posted into them: keep their memory
      graveyard_.push_back(in);
      throw;
    }
  };
  if (async_op || !queue_.enter_inline()) return submit_work([body](AsyncWork&) { body(); }, plan_label(plan));
  queue_.run_inline([&] { body(); });  // inline: same order on every rank (nothing queued before it), no thread hop
  return nullptr;
}

void Communicator::run_halves_locked(bool scatter, const at::Tensor& out, const at::Tensor& in, const Plan& plan,
                                     bool avg, bool validate) {
  // halves() checked the tensors before the call was queued or run.
  const char* what = scatter ? "a reduce_scatter" : "an allgather";
  const int64_t S = topo_.size;
  const at::Tensor& whole = scatter ? in : out;
  const at::Tensor& part = scatter ? out : in;
  // A reduce-scatter sums (float dtypes); an allgather only moves bytes, of any dtype.
  const DType dt = scatter ? to_dtype(in.scalar_type()) : DType::Bytes;
  const int64_t shard = scatter ? part.numel() : part.numel() * (int64_t)part.element_size();
  const uint64_t seq = ++seq_;
  const double t0 = now_s();
  // The half's algorithm as it runs among the ranks that run the schedule (the nodes' rails, or
  // every rank): the plan's (halving/doubling for a power of two; halves() checked it).
  const Algorithm algo = plan.algorithm;
  uint64_t desc[kDescWords];
  encode_desc(plan, seq, in.numel(), (uint64_t)in.scalar_type(), desc);
  if (hier_) {
    if (validate && inter_ && topo_.num_nodes > 1) {
      try {
        validate_peers(*inter_, algo, desc, what);
      } catch (const std::exception& e) {
        arena_->mark_failed(e.what());  // local peers fail at once, with this reason
        throw;
      }
    }
    if (scatter)
      hier_->reduce_scatter(plan, in.data_ptr(), out.data_ptr(), shard, dt, seq);
    else
      hier_->allgather(plan, in.data_ptr(), out.data_ptr(), shard, dt, seq);
  } else {
    if (validate && S > 1) validate_peers(*world_, algo, desc, what);
    flat_halves(scatter, exec_, *world_, algo, in.data_ptr(), out.data_ptr(), shard, dt, seq);
  }
  if (scatter && avg && S > 1) scale(dt, out.data_ptr(), 1.0 / S, shard);
  record({plan.hierarchy, algo, plan.protocol, whole.numel() * (int64_t)whole.element_size(), now_s() - t0});
}

}  // namespace fastar
