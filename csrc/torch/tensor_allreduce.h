// The allreduce of a tensor over c10d process groups, for what the byte-level core (csrc/core,
// over Gloo and shared memory) does not move:
//  - CUDA tensors: NCCL process groups, every step enqueued on fastar's own CUDA stream, which waits
//    for the producer's stream through an event; the consumer's stream waits for fastar's through
//    another event. The CPU never waits for the GPU.
//  - a compressed wire (fp16/bf16 on the wire, accumulation in the tensor's own dtype), on either
//    device: the schedules' sends are cast down, the received halves summed into the full-precision
//    buffer.
// The schedules run through the one step loop (core/executor) over a PGTransport of the device's
// backend, with a TensorCodec (fastar's CUDA kernels on a GPU, the casts of a compressed wire); the
// hierarchy through the one driver (core/hier_driver) with a c10d local group as its local phase.
// Hierarchies: flat (halving/doubling or ring over send/recv of the whole group), leader (reduce
// to local rank 0, the schedule between leaders, broadcast), rail (reduce-scatter inside the node,
// the schedule over each rail, allgather). The intra-node phase is the group's own collective:
// NCCL inside a GPU node, Gloo for the CPU's compressed path.
#pragma once
#include <array>
#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/hierarchical.h"
#include "core/schedule.h"
#include "torch/pg_transport.h"

namespace fastar {

struct Topology {
  int rank = 0, size = 1;
  int local_rank = 0, local_size = 1;
  int node = 0, num_nodes = 1;
};

// fastar's groups for one device type. inter: this rank's rail (for local rank 0: the leaders).
struct TensorGroups {
  c10::intrusive_ptr<c10d::ProcessGroup> world, local, inter;
  std::vector<int> world_ranks, inter_ranks;
};

// Makes the current stream of the calling thread wait for GPU work; empty for CPU tensors.
using StreamWait = std::function<void()>;

class TensorAllreduce {
 public:
  TensorAllreduce(Topology topo, SharedTimeout timeout) : topo_(topo), timeout_(std::move(timeout)) {}
  void set_groups(c10::DeviceType type, TensorGroups g);
  bool has_groups(c10::DeviceType type) const { return groups_.count(type) > 0; }

  // An event on the current stream of t's device (the producer's): the returned function makes
  // the calling thread's current stream wait for it. Empty for CPU tensors.
  static StreamWait producer_event(const at::Tensor& t);

  // In-place sum of t over the group set of its device (divided by the world size when avg).
  // wire: the dtype on the wire (t's own dtype: no compression). ready: producer_event(t) or empty.
  // Returns what the consumer must call to order its stream after the result (empty on the CPU).
  StreamWait run(const at::Tensor& t, Algorithm a, Hierarchy h, bool avg, at::ScalarType wire,
                 const StreamWait& ready, uint64_t seq);

 private:
  class C10dPhase;  // the local phase over a c10d local group (tensor_allreduce.cpp)
  void body(const at::Tensor& flat, Algorithm a, Hierarchy h, bool avg, at::ScalarType wire, uint64_t seq);
  void p2p(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const std::vector<int>& granks, const at::Tensor& flat,
           Algorithm a, at::ScalarType wire, uint64_t seq, const char* what);
  // Posts an operation (start() returns its Work, or null) and waits for it (stream order for NCCL,
  // the timeout for Gloo); `what` (a string, or a callable that makes one) names the operation in
  // the error, whether posting or waiting failed. Defined and used in tensor_allreduce.cpp only.
  template <class Start, class What>
  void guarded(bool cuda, const Start& start, const What& what);
  const TensorGroups& groups(const at::Tensor& t) const;
  // The transport over pg for t's device, made on first use and kept (with its retired works).
  PGTransport& transport(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const std::vector<int>& granks,
                         const at::Tensor& t, const char* what);

  Topology topo_;
  SharedTimeout timeout_;
  std::map<c10::DeviceType, TensorGroups> groups_;
  std::vector<c10::intrusive_ptr<c10d::Work>> retired_;  // CPU: the last call's finished works
  std::array<at::Tensor, 4> buffers_;                       // CPU: the codec's scratch (receive x2, send, widening)
  std::map<std::pair<c10d::ProcessGroup*, c10::DeviceType>, std::unique_ptr<PGTransport>> transports_;
};

}  // namespace fastar
