// The plan of one collective call: what fastar/policy.py chose, crossing the binding as these enums
// (fastar._C.Collective, Algorithm, Hierarchy, Protocol, Wire, Plan). Nothing below the binding
// chooses: the C++ side runs the plan it is given, and refuses (std::invalid_argument) a plan that
// cannot run on this communicator, with the reason. The call descriptor that ranks compare (the
// arena's check, the header exchange between nodes) is the plan plus the call (encode_desc), so
// ranks whose plans differ raise on every rank instead of reading each other's bytes wrongly.
#pragma once
#include <cstdint>
#include <string>

namespace fastar {

enum class Collective : uint64_t { Allreduce = 0, ReduceScatter = 1, Allgather = 2 };
enum class Algorithm { HalvingDoubling = 0, Ring = 1 };
enum class Hierarchy { Flat = 0, Leader = 1, Rail = 2 };
// The dtype on the wire: the buffer's own, or fp16/bf16 (fp32/fp64 buffers; accumulation stays in
// the buffer's dtype).
enum class Wire { None = 0, Fp16 = 1, Bf16 = 2 };
// How the node's phase runs. Values are part of the descriptor.
enum class Protocol : uint64_t {
  Latency = 1,     // one node, small: the arena's small regions in blocks (chunk: the smallest block)
  OneBarrier = 2,  // small, one chunk: every rank sums all slots itself (chunk: 0)
  Chunked = 3,     // the pipeline of chunks through the slots (chunk: the pipeline's chunk)
  Halves = 4,      // reduce-scatter / allgather through the slots (chunk: the slots' chunk)
  InPlace = 5,     // fastar.wrap's buckets in the bucket arena
  Network = 6,     // no local phase: the schedule over the transport alone
  // One node: every rank reads its peers' buffers straight from their memory (process_vm_readv,
  // where the node's probe found it allowed): its 1/L slice summed in place through a scratch of
  // chunk bytes per peer, then every peer's reduced slice copied into place. One copy of the
  // peers' bytes instead of the slots' two (chunk: the scratch per peer).
  SingleCopy = 7,
};

struct Plan {
  Collective collective = Collective::Allreduce;
  Algorithm algorithm = Algorithm::HalvingDoubling;
  Hierarchy hierarchy = Hierarchy::Flat;
  Protocol protocol = Protocol::Network;
  int64_t chunk_bytes = 0;
  Wire wire = Wire::None;
  bool stream = false;  // results written with streaming stores (large ones; not part of the descriptor)
};

const char* hierarchy_name(Hierarchy h);
const char* algorithm_name(Algorithm a);
inline const char* wire_name(Wire w) { return w == Wire::Fp16 ? "fp16" : w == Wire::Bf16 ? "bf16" : "none"; }
const char* protocol_name(uint64_t p);
const char* collective_name(Collective c);
// "leader:halving_doubling:chunked" (records, AsyncWork labels, errors)
std::string plan_label(const Plan& p);

// seq, element count, dtype, route (collective * 4096 + wire * 256 + hierarchy * 16 + algorithm),
// protocol, chunk (bytes of the pipeline's chunk, the latency path's block, the halves' chunk).
enum DescField { kSeq = 0, kCount, kDType, kRoute, kProtocol, kChunk, kDescWords };

// The one encoding of a call's descriptor (the arena's check and the header exchange alike).
inline void encode_desc(const Plan& p, uint64_t seq, int64_t count, uint64_t dtype, uint64_t out[kDescWords]) {
  out[kSeq] = seq;
  out[kCount] = (uint64_t)count;
  out[kDType] = dtype;
  out[kRoute] = (uint64_t)p.collective * 4096 + (uint64_t)p.wire * 256 + (uint64_t)p.hierarchy * 16 +
                (uint64_t)p.algorithm;
  out[kProtocol] = (uint64_t)p.protocol;
  out[kChunk] = (uint64_t)p.chunk_bytes;
}

}  // namespace fastar
