#include "torch/communicator.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>

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
                           c10::intrusive_ptr<c10d::ProcessGroup> cross, std::vector<int> cross_ranks,
                           std::string shm_name, bool shm_create, int64_t shm_chunk_bytes, double timeout_s)
    : topo_(topo), timeout_(std::make_shared<Timeout>(timeout_s)), failure_(std::make_shared<FailureState>()) {
  world_ = std::make_unique<PGTransport>(world, world_ranks, timeout_, "fastar's world group");
  world_->watch_failures(failure_);  // the first failure reaches every rank with its reason
  if (cross) cross_ = std::make_unique<PGTransport>(cross, cross_ranks, timeout_, "fastar's inter-node group");
  if (!shm_name.empty()) {
    arena_ = std::make_shared<ShmArena>(shm_name, shm_create, topo.local_rank, topo.local_size, shm_chunk_bytes,
                                        timeout_s);
    arena_->share_timeout(timeout_);
    arena_->set_first_global_rank(topo.node * topo.local_size);
    failure_->watch(arena_);
    hier_ = std::make_unique<Hierarchical>(arena_.get(), cross_.get(), topo.num_nodes);
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
    keep_forever(std::shared_ptr<PGTransport>(cross_.release()));
    keep_forever(std::shared_ptr<TensorAllreduce>(tensor_.release()));
    keep_forever(std::make_shared<Executor>(std::move(exec_)));
    keep_forever(std::make_shared<std::vector<at::Tensor>>(std::move(graveyard_)));
  } else {
    hier_.reset();
    arena_.reset();
    world_.reset();
    cross_.reset();
    tensor_.reset();
  }
}

std::exception_ptr Communicator::failure() { return failure_->cause(); }

// Local peers waiting on this rank in any arena it drives fail at once, with this rank's reason.
void Communicator::fail(std::exception_ptr e) { failure_->fail(e); }

void Communicator::fail_for_test(const std::string& why) {
  fail(std::make_exception_ptr(std::runtime_error(why)));
}

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

// The tuning setters never wait for a running collective: the next call reads the new value.
void Communicator::set_small_bytes(int64_t b) {
  TORCH_CHECK(b >= 0, "fastar: the latency-path threshold must be at least 0 bytes, not ", b);
  std::lock_guard<std::mutex> g(life_mu_);
  if (hier_) hier_->small_bytes = b;
}

void Communicator::set_local_chunk_bytes(int64_t b) {
  TORCH_CHECK(b >= 4096, "fastar: the one-node chunk must be at least 4096 bytes");
  std::lock_guard<std::mutex> g(life_mu_);
  if (hier_) hier_->local_chunk_bytes = b;
}

void Communicator::set_stream_above_bytes(int64_t b) {
  std::lock_guard<std::mutex> g(life_mu_);
  if (hier_) hier_->stream_above_bytes = b;
}

OpRecord Communicator::last_op() {
  std::lock_guard<std::mutex> g(rec_mu_);
  return last_;
}

void Communicator::record(const OpRecord& r) {
  std::lock_guard<std::mutex> g(rec_mu_);
  last_ = r;
}

std::shared_ptr<AsyncWork> Communicator::allreduce_async(at::Tensor t, Algorithm algorithm, Hierarchy hierarchy,
                                                         bool avg, bool validate, Wire wire) {
  // A GPU tensor's producer is whatever the caller's stream has queued so far: mark that point now.
  StreamWait ready = TensorAllreduce::producer_event(t);
  return submit_work(
      [this, t, algorithm, hierarchy, avg, validate, wire, ready](AsyncWork& w) {
        w.stream_wait = run(t, algorithm, hierarchy, avg, validate, wire, ready);
      },
      route_label(hierarchy, algorithm, wire));
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

void Communicator::allreduce(at::Tensor t, Algorithm algorithm, Hierarchy hierarchy, bool avg, bool validate,
                             Wire wire) {
  // Run inline unless queued work must go first: same order on every rank, no thread hop.
  if (!queue_.enter_inline()) {
    allreduce_async(t, algorithm, hierarchy, avg, validate, wire)->wait(timeout_s() * 2 + 60);
    return;
  }
  StreamWait after;
  queue_.run_inline([&] { after = run(t, algorithm, hierarchy, avg, validate, wire, TensorAllreduce::producer_event(t)); });
  if (after) after();  // the caller's stream waits for fastar's, as after an NCCL collective
}

bool Communicator::allreduce_fast(const at::Tensor& t, bool avg) {
  const auto entry = profile_.on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  if (!fast_ok_ || t.device().type() != c10::DeviceType::CPU || t.layout() != at::kStrided || !t.is_contiguous())
    return false;
  DType dt;
  if (!try_dtype(t.scalar_type(), &dt)) return false;
  const int64_t count = t.numel();
  const int64_t bytes = count * (int64_t)dtype_size(dt);
  if (!queue_.try_enter()) return false;
  if (bytes > hier_->small_bytes.load(std::memory_order_relaxed)) {  // hier_ lives while the queue is held
    queue_.leave_inline();
    return false;
  }
  std::exception_ptr e;
  std::chrono::steady_clock::time_point t1;
  bool prof;
  {
    std::lock_guard<std::mutex> g(exec_mu_);
    prof = profile_.on;
    const auto t0 = std::chrono::steady_clock::now();
    if (prof) profile_.checks_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(t0 - entry).count();
    void* data = t.data_ptr();
    try {
      OpScope op(timeout_.get(), failure_.get(), /*lazy=*/true);  // one deadline; no clock read unless it waits
      // The route "auto" takes on one node (fastar/policy.py): leader, halving/doubling.
      hier_->allreduce(Hierarchy::Leader, Algorithm::HalvingDoubling, data, count, dt, ++seq_);
      if (avg) scale(dt, data, 1.0 / topo_.size, count);
    } catch (...) {
      e = std::current_exception();
      graveyard_.push_back(t);
    }
    t1 = std::chrono::steady_clock::now();
    record({Hierarchy::Leader, Algorithm::HalvingDoubling, bytes, std::chrono::duration<double>(t1 - t0).count()});
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

StreamWait Communicator::run(at::Tensor t, Algorithm algorithm, Hierarchy hierarchy, bool avg, bool validate,
                             Wire wire_name, const StreamWait& ready) {
  std::lock_guard<std::mutex> g(exec_mu_);
  TORCH_CHECK(world_, "fastar: the communicator was closed (fastar.shutdown() was called)");
  try {
    return run_locked(t, algorithm, hierarchy, avg, validate, wire_name, ready);
  } catch (...) {
    graveyard_.push_back(t);  // receives may still be posted into it: keep its memory
    throw;
  }
}

StreamWait Communicator::run_locked(at::Tensor t, Algorithm algo, Hierarchy h, bool avg, bool validate,
                                    Wire wire_name, const StreamWait& ready) {
  TORCH_CHECK(t.is_contiguous() && t.layout() == at::kStrided, "fastar: allreduce needs a dense contiguous tensor");
  const DType dt = to_dtype(t.scalar_type());
  const at::ScalarType wire = wire_dtype(wire_name, t.scalar_type());
  const uint64_t seq = ++seq_;
  const double t0 = now_s();
  const int64_t count = t.numel();
  if (t.is_cuda() || wire != t.scalar_type()) {
    TORCH_CHECK(t.is_cuda() || t.device().is_cpu(), "fastar: tensors on ", t.device(), " are not supported");
    if (h != Hierarchy::Flat && topo_.local_size == 1) h = Hierarchy::Flat;
    const int wire_id = wire == t.scalar_type() ? 0 : wire == at::kHalf ? 1 : 2;
    // An NCCL-only group (a user's subgroup) has no CPU side for the header: NCCL checks the sizes.
    if (validate && topo_.size > 1 && world_->has_backend()) {
      const uint64_t desc[kDescWords] = {seq, (uint64_t)count, (uint64_t)t.scalar_type(),
                                         (uint64_t)(64 + wire_id * 256 + (int)h * 16 + (int)algo),
                                         (uint64_t)Protocol::Network, 0};
      validate_peers(*world_, algo, desc, "an allreduce");
    }
    StreamWait after = tensor_->run(t, algo, h, avg, wire, ready, seq);
    record({h, algo, count * (int64_t)dtype_size(dt), now_s() - t0});
    return after;
  }
  TORCH_CHECK(t.device().is_cpu(), "fastar: tensors on ", t.device(), " are not supported (CPU or CUDA only)");
  if (h != Hierarchy::Flat && !hier_) h = Hierarchy::Flat;  // one rank per node: nothing to do locally
  void* data = t.data_ptr();
  if (h == Hierarchy::Flat) {
    auto steps = make_schedule(algo, world_->rank(), world_->size(), count);
    if (validate && topo_.size > 1) {
      const uint64_t desc[kDescWords] = {seq, (uint64_t)count, (uint64_t)t.scalar_type(), (uint64_t)algo,
                                         (uint64_t)Protocol::Network, 0};
      validate_peers(*world_, algo, desc, "an allreduce");
    }
    exec_.set_tag_base((uint32_t)(seq & 0x3FF) << 20);
    exec_.run(steps, *world_, data, count, dt);
  } else {
    // The shared-memory phase checks the local ranks against each other; the ranks that carry the
    // inter-node phase check their inter-node peers the same way as the flat path.
    if (validate && cross_ && topo_.num_nodes > 1 && (h == Hierarchy::Rail || topo_.local_rank == 0)) {
      try {
        const uint64_t desc[kDescWords] = {seq, (uint64_t)count, (uint64_t)t.scalar_type(),
                                           (uint64_t)h * 16 + (uint64_t)algo, (uint64_t)Protocol::Chunked,
                                           (uint64_t)arena_->chunk_bytes()};
        validate_peers(*cross_, algo, desc, "an allreduce");
      } catch (const std::exception& e) {
        arena_->mark_failed(e.what());  // local peers fail at once, with this reason
        throw;
      }
    }
    hier_->allreduce(h, algo, data, count, dt, seq);
  }
  if (avg && topo_.size > 1) scale(dt, data, 1.0 / topo_.size, count);
  record({h, algo, count * (int64_t)dtype_size(dt), now_s() - t0});
  return {};
}

std::shared_ptr<AsyncWork> Communicator::reduce_scatter(at::Tensor out, at::Tensor in, Algorithm algorithm,
                                                        bool avg, bool validate, bool async_op) {
  return halves(true, std::move(out), std::move(in), algorithm, avg, validate, async_op);
}

std::shared_ptr<AsyncWork> Communicator::allgather(at::Tensor out, at::Tensor in, Algorithm algorithm,
                                                   bool validate, bool async_op) {
  return halves(false, std::move(out), std::move(in), algorithm, false, validate, async_op);
}

std::shared_ptr<AsyncWork> Communicator::halves(bool scatter, at::Tensor out, at::Tensor in, Algorithm algorithm,
                                                bool avg, bool validate, bool async_op) {
  const std::string label = std::string(scatter ? "reduce_scatter:" : "allgather:") + algorithm_name(algorithm);
  auto body = [this, scatter, out, in, algorithm, avg, validate] {
    std::lock_guard<std::mutex> g(exec_mu_);
    TORCH_CHECK(world_, "fastar: the communicator was closed (fastar.shutdown() was called)");
    try {
      run_halves_locked(scatter, out, in, algorithm, avg, validate);
    } catch (...) {
      graveyard_.push_back(out);  // receives may still be posted into them: keep their memory
      graveyard_.push_back(in);
      throw;
    }
  };
  if (async_op || !queue_.enter_inline()) return submit_work([body](AsyncWork&) { body(); }, label);
  auto work = std::make_shared<AsyncWork>();
  work->algorithm = label;
  work->start_s = now_s();
  queue_.run_inline([&] { body(); });
  work->end_s = now_s();
  work->finish(nullptr);
  return work;
}

void Communicator::run_halves_locked(bool scatter, const at::Tensor& out, const at::Tensor& in, Algorithm algorithm,
                                     bool avg, bool validate) {
  const char* what = scatter ? "a reduce_scatter" : "an allgather";
  for (const at::Tensor* t : {&out, &in}) {
    TORCH_CHECK(t->device().is_cpu(), "fastar: ", what, " runs on CPU tensors (CUDA ones go to NCCL), not ",
                t->device());
    TORCH_CHECK(t->layout() == at::kStrided && t->is_contiguous(), "fastar: ", what,
                " needs dense contiguous tensors (call .contiguous() first)");
  }
  TORCH_CHECK(in.scalar_type() == out.scalar_type(), "fastar: ", what, " needs one dtype for input and output, not ",
              in.scalar_type(), " and ", out.scalar_type());
  const int64_t S = topo_.size;
  const at::Tensor& whole = scatter ? in : out;
  const at::Tensor& part = scatter ? out : in;
  TORCH_CHECK(whole.numel() == part.numel() * S, "fastar: ", what, ": the ", scatter ? "input" : "output",
              " must hold world size (", S, ") x ", part.numel(), " elements (the ", scatter ? "output" : "input",
              "'s), not ", whole.numel());
  // A reduce-scatter sums (float dtypes); an allgather only moves bytes, of any dtype.
  const DType dt = scatter ? to_dtype(in.scalar_type()) : DType::Bytes;
  const int64_t shard = scatter ? part.numel() : part.numel() * (int64_t)part.element_size();
  const uint64_t seq = ++seq_;
  const double t0 = now_s();
  const int kind = (scatter ? 512 : 1024);
  Algorithm algo;
  if (hier_) {
    algo = halves_algorithm(algorithm, topo_.num_nodes);
    if (validate && cross_ && topo_.num_nodes > 1) {
      try {
        const uint64_t desc[kDescWords] = {seq, (uint64_t)in.numel(), (uint64_t)in.scalar_type(),
                                           (uint64_t)(kind + (int)algo), (uint64_t)Protocol::Halves,
                                           (uint64_t)arena_->chunk_bytes()};
        validate_peers(*cross_, algo, desc, what);
      } catch (const std::exception& e) {
        arena_->mark_failed(e.what());  // local peers fail at once, with this reason
        throw;
      }
    }
    if (scatter)
      hier_->reduce_scatter(algorithm, in.data_ptr(), out.data_ptr(), shard, dt, seq);
    else
      hier_->allgather(algorithm, in.data_ptr(), out.data_ptr(), shard, dt, seq);
  } else {
    algo = halves_algorithm(algorithm, (int)S);
    if (validate && S > 1) {
      const uint64_t desc[kDescWords] = {seq, (uint64_t)in.numel(), (uint64_t)in.scalar_type(),
                                         (uint64_t)(kind + (int)algo), (uint64_t)Protocol::Network, 0};
      validate_peers(*world_, algo, desc, what);
    }
    exec_.set_tag_base((uint32_t)(seq & 0x3FF) << 20);
    const int r = world_->rank();
    const size_t es = dtype_size(dt);
    if (scatter) {
      at::Tensor work = in.clone();  // the schedule sums in place; the input stays as it was
      graveyard_.push_back(work);
      exec_.run(reduce_scatter_schedule(algo, r, (int)S, S * shard), *world_, work.data_ptr(), S * shard, dt);
      graveyard_.pop_back();
      std::memcpy(out.data_ptr(), static_cast<char*>(work.data_ptr()) + r * shard * es, shard * es);
    } else {
      char* o = static_cast<char*>(out.data_ptr());
      std::memcpy(o + r * shard, in.data_ptr(), shard);
      exec_.run(allgather_schedule(algo, r, (int)S, S * shard), *world_, o, S * shard, dt);
    }
  }
  if (scatter && avg && S > 1) scale(dt, out.data_ptr(), 1.0 / S, shard);
  record({hier_ ? Hierarchy::Rail : Hierarchy::Flat, algo, whole.numel() * (int64_t)whole.element_size(),
          now_s() - t0});
}

}  // namespace fastar
