#include "torch/tensor_allreduce.h"

#include <dlfcn.h>

#include <ATen/Parallel.h>
#include <chrono>
#include <mutex>
#include <stdexcept>
#include <type_traits>

#include "core/executor.h"
#include "core/hier_driver.h"
#include "torch/kernels.h"  // fault_active (test-only)
#include "torch/tensor_codec.h"

#ifdef FASTAR_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fastar {
namespace {

// The element-wise ops of a CPU step (cast to the wire dtype, add, copy) run on one thread. ATen
// would split each into an OpenMP parallel region of every core's worth of threads; on a host whose
// cores are shared by several ranks (or with backward's own parallel regions running next to the
// communication thread) a region waits for a descheduled thread: measured on this 2-core host with
// 2 ranks, a 1 MiB fp16-compressed allreduce took 20-25 ms this way and 0.8 ms on one thread. One
// thread converts a 25 MiB bucket in well under a millisecond, less than sending it. OpenMP's
// thread count is per thread (this one only), looked up at run time so that a torch built without
// OpenMP needs nothing.
class OneAtenThread {
 public:
  OneAtenThread() {
    static const auto set = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
    set_ = set;
    if (!set_) return;
    prev_ = at::get_num_threads();  // also ATen's lazy per-thread initialisation, which would undo ours
    if (prev_ > 1) set_(1);
  }
  ~OneAtenThread() {
    if (set_ && prev_ > 1) set_(prev_);
  }
  OneAtenThread(const OneAtenThread&) = delete;
  OneAtenThread& operator=(const OneAtenThread&) = delete;

 private:
  void (*set_)(int) = nullptr;
  int prev_ = 1;
};

#ifdef FASTAR_WITH_CUDA
// One high-priority stream per device for all of fastar's GPU communication: buckets leave it in
// submission order, and NCCL's own streams are ordered against it by the process group.
at::cuda::CUDAStream comm_stream(c10::DeviceIndex dev) {
  static std::mutex mu;
  static std::map<c10::DeviceIndex, at::cuda::CUDAStream> streams;
  std::lock_guard<std::mutex> g(mu);
  auto it = streams.find(dev);
  if (it == streams.end()) it = streams.emplace(dev, at::cuda::getStreamFromPool(/*isHighPriority=*/true, dev)).first;
  return it->second;
}
#endif

#ifndef FASTAR_WITH_CUDA
[[noreturn]] void no_cuda_build(const at::Tensor& t) {
  TORCH_CHECK(false, "fastar was built without CUDA and cannot reduce the tensor on ", t.device(),
              "; rebuild with a CUDA toolkit (FASTAR_CUDA=1 pip install --no-build-isolation -e .)");
}
#endif

std::string first_line(const std::exception& e) {
  std::string msg = e.what();
  const auto nl = msg.find("\nException raised from");
  return nl == std::string::npos ? msg : msg.substr(0, nl);
}

}  // namespace

void TensorAllreduce::set_groups(c10::DeviceType type, TensorGroups g) {
  TORCH_CHECK(g.world, "fastar: a device group set needs its world group");
  groups_[type] = std::move(g);
}

const TensorGroups& TensorAllreduce::groups(const at::Tensor& t) const {
  auto it = groups_.find(t.device().type());
  TORCH_CHECK(it != groups_.end(), "fastar: no process groups were set up for tensors on ", t.device(),
              " (fastar.init creates them on the first such tensor; was it called on every rank?)");
  return it->second;
}

StreamWait TensorAllreduce::producer_event(const at::Tensor& t) {
  if (!t.is_cuda()) return {};
#ifdef FASTAR_WITH_CUDA
  const c10::DeviceIndex dev = t.device().index();
  auto ev = std::make_shared<at::cuda::CUDAEvent>();
  ev->record(at::cuda::getCurrentCUDAStream(dev));
  return [ev, dev] { ev->block(at::cuda::getCurrentCUDAStream(dev)); };
#else
  no_cuda_build(t);
#endif
}

StreamWait TensorAllreduce::run(const at::Tensor& t, Algorithm a, Hierarchy h, bool avg, at::ScalarType wire,
                                const StreamWait& ready, uint64_t seq) {
  TORCH_CHECK(t.is_contiguous(), "fastar: allreduce needs a contiguous tensor");
  const at::Tensor flat = t.view({-1});
  if (!t.is_cuda()) {
    TORCH_CHECK(t.device().is_cpu(), "fastar: tensors on ", t.device(), " are not supported (CPU or CUDA only)");
    OneAtenThread one;
    retired_.clear();  // the previous call's Gloo works (see guarded): their pairs are idle by now
    body(flat, a, h, avg, wire, seq);
    for (auto& kv : transports_) kv.second->drain_skipped();  // empty unless a test injected Fault::SkipWait
    return {};
  }
#ifdef FASTAR_WITH_CUDA
  const c10::DeviceIndex dev = t.device().index();
  c10::cuda::CUDAGuard device_guard(dev);
  const at::cuda::CUDAStream stream = comm_stream(dev);
  c10::cuda::CUDAStreamGuard stream_guard(stream);
  if (ready) ready();  // fastar's stream waits for the producer's work on the tensor
  body(flat, a, h, avg, wire, seq);
  // The caller's allocator must not hand t's memory out again before fastar's stream is done with it.
  c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
  auto done = std::make_shared<at::cuda::CUDAEvent>();
  done->record(stream);
  return [done, dev] { done->block(at::cuda::getCurrentCUDAStream(dev)); };
#else
  no_cuda_build(t);
#endif
}

// what: a string, or a callable that makes one, only called when posting or waiting failed.
template <class Start, class What>
void TensorAllreduce::guarded(bool cuda, const Start& start, const What& what) {
  try {
    const c10::intrusive_ptr<c10d::Work> w = start();  // Gloo throws here when a peer has closed its pair
    if (!w) return;
    if (cuda) {
      w->wait();  // NCCL: the current stream waits, the CPU does not; the group's watchdog enforces its timeout
    } else {
      PGTransport::wait_work(w, timeout_);
      // Destroying a Gloo work right after its wait contends with Gloo's loop thread for the pair's
      // lock (milliseconds on a loaded host; docs/results.md, "Problems found"): keep it until the
      // next call. That holds one call's temporaries (about the buffer's size in the wire dtype).
      retired_.push_back(w);
    }
  } catch (const std::exception& e) {
    std::string op;
    if constexpr (std::is_invocable_v<const What&>)
      op = what();
    else
      op = what;
    throw std::runtime_error("fastar: rank " + std::to_string(topo_.rank) + ": " + op + " failed: " + first_line(e) +
                             "\nA peer rank has probably exited or timed out, or the ranks called fastar with "
                             "different tensor sizes or in a different order.");
  }
}

PGTransport& TensorAllreduce::transport(const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                        const std::vector<int>& granks, const at::Tensor& t, const char* what) {
  auto& tr = transports_[{pg.get(), t.device().type()}];
  if (!tr) tr = std::make_unique<PGTransport>(pg, granks, timeout_, what, t.device());
  return *tr;
}

void TensorAllreduce::p2p(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const std::vector<int>& granks,
                          const at::Tensor& flat, Algorithm a, at::ScalarType wire, uint64_t seq, const char* what) {
  const int rank = pg->getRank(), size = pg->getSize();
  if (size == 1 || flat.numel() == 0) return;
  PGTransport& tr = transport(pg, granks, flat, what);
  TensorCodec codec(flat.options(), wire, &buffers_);
  // Gloo matches messages by tag (the executor counts each pair's messages from tag_base); NCCL
  // ignores tags.
  ExecutorOptions o;
  o.tag_base = (uint32_t)((seq & 0x3FF) << 16);
  Executor(o).run(make_schedule(a, rank, size, flat.numel()), tr, flat.data_ptr(), flat.numel(), codec);
}

// The local phase over the device's local group: "leader" reduces to local rank 0 (which carries
// the whole buffer between nodes) and broadcasts back; "rail" reduce-scatters (every local rank
// carries its shard, the buffer padded to a multiple of L) and allgathers. One node with "leader":
// the group's own allreduce (NCCL's ring/tree over NVLink) is the whole job.
class TensorAllreduce::C10dPhase final : public LocalPhase {
 public:
  C10dPhase(TensorAllreduce& ta, const TensorGroups& g, const at::Tensor& flat, Hierarchy h)
      : ta_(ta), flat_(flat), h_(h), cuda_(flat.is_cuda()), local_(g.local->getBackend(flat.device().type())),
        carry_(g.inter != nullptr) {}
  int64_t chunks() const override { return 1; }

  Part reduce(int64_t) override {
    const Topology& topo = ta_.topo_;
    if (h_ == Hierarchy::Leader) {
      std::vector<at::Tensor> v{flat_};
      if (topo.num_nodes == 1) {
        ta_.guarded(cuda_, [&] { return local_->allreduce(v); }, on_node("the intra-node allreduce"));
        return {};
      }
      c10d::ReduceOptions ro;
      ro.rootRank = 0;
      ta_.guarded(cuda_, [&] { return local_->reduce(v, ro); }, on_node("the intra-node reduce to local rank 0"));
      return topo.local_rank == 0 && carry_ ? Part{flat_.data_ptr(), flat_.numel()} : Part{};
    }
    // Rail: each local rank owns 1/L of the buffer (padded to a multiple of L) between nodes.
    const int64_t L = topo.local_size, n = flat_.numel();
    const int64_t padded = (n + L - 1) / L * L, shard_n = padded / L;
    buf_ = flat_;
    if (padded != n) {
      buf_ = at::zeros({padded}, flat_.options());
      buf_.narrow(0, 0, n).copy_(flat_);
    }
    shard_ = at::empty({shard_n}, flat_.options());
    for (int64_t i = 0; i < L; ++i) parts_.push_back(buf_.narrow(0, i * shard_n, shard_n));
    std::vector<at::Tensor> sv{shard_};
    if (local_->getBackendName() == "nccl") {
      ta_.guarded(cuda_, [&] { return local_->_reduce_scatter_base(shard_, buf_); },
                  on_node("the intra-node reduce-scatter"));
    } else {
      std::vector<std::vector<at::Tensor>> in{parts_};
      ta_.guarded(cuda_, [&] { return local_->reduce_scatter(sv, in); }, on_node("the intra-node reduce-scatter"));
    }
    return carry_ ? Part{shard_.data_ptr(), shard_n} : Part{};
  }

  void distribute(int64_t) override {
    const Topology& topo = ta_.topo_;
    if (h_ == Hierarchy::Leader) {
      if (topo.num_nodes == 1) return;
      std::vector<at::Tensor> v{flat_};
      c10d::BroadcastOptions bo;
      bo.rootRank = 0;
      ta_.guarded(cuda_, [&] { return local_->broadcast(v, bo); }, on_node("the intra-node broadcast from local rank 0"));
      return;
    }
    std::vector<at::Tensor> sv{shard_};
    if (local_->getBackendName() == "nccl") {
      ta_.guarded(cuda_, [&] { return local_->_allgather_base(buf_, shard_); }, on_node("the intra-node allgather"));
    } else {
      std::vector<std::vector<at::Tensor>> out{parts_};
      ta_.guarded(cuda_, [&] { return local_->allgather(out, sv); }, on_node("the intra-node allgather"));
    }
    if (buf_.data_ptr() != flat_.data_ptr()) flat_.copy_(buf_.narrow(0, 0, flat_.numel()));
  }

 private:
  // For the error of a failed intra-node collective (built only then): a collective cannot say
  // which member broke it, so name them all; on a two-rank node there is only one.
  std::function<std::string()> on_node(const char* op) const {
    const Topology topo = ta_.topo_;
    return [topo, op] {
      std::string s;
      for (int i = 0; i < topo.local_size; ++i)
        if (i != topo.local_rank) s += (s.empty() ? "" : ", ") + std::to_string(topo.node * topo.local_size + i);
      return op + std::string(topo.local_size == 2 ? " with rank " : " with ranks ") + s;
    };
  }

  TensorAllreduce& ta_;
  at::Tensor flat_;
  Hierarchy h_;
  bool cuda_;
  c10::intrusive_ptr<c10d::Backend> local_;
  bool carry_;
  at::Tensor buf_, shard_;
  std::vector<at::Tensor> parts_;
};

void TensorAllreduce::body(const at::Tensor& flat, Algorithm a, Hierarchy h, bool avg, at::ScalarType wire,
                           uint64_t seq) {
  const TensorGroups& g = groups(flat);
  if (h == Hierarchy::Flat || topo_.local_size == 1 || !g.local) {
    p2p(g.world, g.world_ranks, flat, a, wire, seq, "fastar's world group");
  } else {
    C10dPhase ph(*this, g, flat, h);
    Transport* inter = g.inter ? &transport(g.inter, g.inter_ranks, flat,
                                            h == Hierarchy::Leader ? "the leaders' group" : "this rank's rail")
                               : nullptr;
    TensorCodec codec(flat.options(), wire, &buffers_);
    HierarchicalDriver driver(inter, /*worker=*/false);
    driver.set_tag_base((uint32_t)((seq & 0x3FF) << 16));
    driver.run(ph, a, codec);
  }
  if (avg && topo_.size > 1) flat.div_(topo_.size);
}

}  // namespace fastar
