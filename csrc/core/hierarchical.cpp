#include "hierarchical.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

#include "reduce.h"

namespace fastar {

Hierarchical::Hierarchical(ShmArena* arena, Transport* inter, int num_nodes)
    : arena_(arena), inter_(inter), num_nodes_(num_nodes), driver_(inter, /*worker=*/inter != nullptr) {}

// What the phases over the node's arena share: the call's descriptor (call_check.h: the call and
// its plan, what the ranks must agree on) and its first generation, published before the driver
// runs the phase (Hierarchical::drive); a failure marks the arena, so that local peers waiting on
// this rank fail at once.
class ArenaCall : public LocalPhase {
 public:
  void publish() {
    first_gen_ = h_.gen_ + 1;
    a_.begin_call(first_gen_);
    a_.publish_desc(desc_, first_gen_);  // read by a peer on another protocol, to say why
  }
  void failed(const std::string& why) override { a_.mark_failed(why); }

 protected:
  ArenaCall(Hierarchical& h, const Plan& plan, uint64_t seq, int64_t count, DType t)
      : h_(h), a_(*h.arena_), t_(t), L_(a_.local_size()), lr_(a_.local_rank()), es_(dtype_size(t)) {
    encode_desc(plan, seq, count, (uint64_t)t, desc_);
  }

  Hierarchical& h_;
  ShmArena& a_;
  DType t_;
  int L_, lr_;
  size_t es_;
  uint64_t desc_[kDescWords];
  uint32_t first_gen_ = 0;
  std::vector<const void*> srcs_;
};

// The staged local phase: every local rank copies its chunk into its slot; each sums its 1/L slice
// of all slots (a reduce-scatter, every core busy); the part a rank carries between nodes is the
// whole chunk's result area (leader, local rank 0) or its own slice of it (rail); then every local
// rank copies the result back. On one node the slice is summed in place in the rank's own buffer.
// Small single-chunk buffers take one barrier: every rank sums all slots itself.
class StagedPhase final : public ArenaCall {
 public:
  // Runs the plan fastar/policy.py made (protocol and chunk included); refuses one that cannot
  // run here, with the reason, before touching the arena.
  StagedPhase(Hierarchical& h, const Plan& plan, void* data, int64_t count, DType t, uint64_t seq)
      : ArenaCall(h, plan, seq, count, t), mode_(plan.hierarchy), base_(static_cast<char*>(data)), count_(count),
        multi_(h.num_nodes_ > 1) {
    const int64_t bytes = count * (int64_t)es_;
    h.check_plan(plan, bytes, es_);
    if (multi_ && mode_ == Hierarchy::Rail && h.inter_ == nullptr) throw std::logic_error("fastar: rail without transport");
    carries_ = multi_ && h.inter_ != nullptr && (mode_ == Hierarchy::Rail || lr_ == 0);
    latency_ = plan.protocol == Protocol::Latency;
    small_ = latency_ || plan.protocol == Protocol::OneBarrier;
    single_ = plan.protocol == Protocol::SingleCopy;
    chunk_elems_ = latency_ || small_ ? std::max<int64_t>(count, 1) : plan.chunk_bytes / (int64_t)es_;
    nchunks_ = single_ ? 1 : count == 0 ? 0 : (count + chunk_elems_ - 1) / chunk_elems_;
    block_bytes_ = latency_ ? plan.chunk_bytes : 0;
    streaming_ = plan.stream;
  }
  int64_t chunks() const override { return small_ ? 1 : nchunks_; }
  bool pipelined() const override { return !small_ && !single_; }
  LatencyProfile* prof = nullptr;
  double scale_by = 1.0;  // the single-copy protocol's avg, applied to each summed slice
  bool scales() const { return single_; }

  Part reduce(int64_t c) override {
    if (single_) return reduce_single();
    return small_ ? reduce_small() : reduce_chunk(c);
  }

  void before_inter(int64_t c) override {
    if (!small_ && mode_ != Hierarchy::Rail && L_ > 1)
      a_.wait_all(ShmFlag::Reduced, gen(c), "local reduce, before the inter-node phase");
  }
  void after_inter(int64_t c) override {
    if (!small_) a_.signal(ShmFlag::Done, gen(c));
  }
  void distribute(int64_t c) override {
    if (single_) return distribute_single();
    if (small_) return distribute_small();
    const uint32_t g = gen(c);
    const int buf = g & 1;
    const int64_t b = c * chunk_elems_, n = std::min(chunk_elems_, count_ - b);
    if (!multi_) {
      a_.wait_all(ShmFlag::Reduced, g, "local reduce-scatter");
    } else if (mode_ == Hierarchy::Rail) {
      a_.wait_all(ShmFlag::Done, g, "inter-node allreduce of a peer's slice");
    } else if (lr_ != 0) {
      a_.wait_rank(ShmFlag::Done, 0, g, "the leader's inter-node allreduce");
    }
    if (!multi_) {  // this rank's slice is in its buffer already (see reduce_chunk)
      const int64_t s0 = part_begin(n, L_, lr_), s1 = part_begin(n, L_, lr_ + 1);
      copy_out_stream(base_ + b * es_, a_.result(buf), s0 * es_, streaming_);
      copy_out_stream(base_ + (b + s1) * es_, a_.result(buf) + s1 * es_, (n - s1) * es_, streaming_);
    } else {
      copy_out_stream(base_ + b * es_, a_.result(buf), n * es_, streaming_);
    }
  }

 private:
  uint32_t gen(int64_t c) const { return first_gen_ + (uint32_t)c; }

  void check_peers() { a_.check_peers(desc_, first_gen_, "an allreduce"); }

  // One source pointer per local rank for a sum, without an allocation up to kMaxSmallRanks.
  const void** src_array() {
    if (L_ <= Hierarchical::kMaxSmallRanks) return srcs_small_;
    srcs_.resize(L_);
    return srcs_.data();
  }

  // One node, at most the arena's small region: block by block (ShmArena::small_data). Every rank
  // copies its blocks in, raising each block's flag; then, block by block, waits for its peers'
  // block and sums all of them (rank order, the same on every rank) into its tensor. A peer starts
  // summing the first block while this rank still copies the last one.
  void reduce_small_blocks() {
    const uint32_t g = ++h_.gen_;
    const int buf = g & 1;
    const int64_t bytes = count_ * (int64_t)es_;
    const int64_t per_block = (bytes + ShmArena::kSmallBlocks - 1) / ShmArena::kSmallBlocks;  // at most 16 blocks
    const int64_t blk = std::max(block_bytes_, (per_block + 63) / 64 * 64);
    const int nb = bytes == 0 ? 1 : (int)((bytes + blk - 1) / blk);
    if (nb > ShmArena::kSmallBlocks) throw std::logic_error("fastar: small allreduce in too many blocks");
    LatencyProfile* p = prof;
    std::chrono::steady_clock::time_point tp;
    if (p) tp = std::chrono::steady_clock::now();
    char* mine = a_.small_data(lr_, buf);
    a_.small_publish_desc(buf, desc_);
    const uint32_t check = latency_check_word(desc_);
    for (int b = 0; b < nb; ++b) {
      const int64_t o = b * blk;
      if (o < bytes) std::memcpy(mine + o, base_ + o, std::min(blk, bytes - o));
      a_.small_signal(b, buf, g, check);
    }
    // For a peer that runs the staged path for this call (the ranks disagree): it sees In and fails
    // on the descriptor instead of waiting for slots that never fill.
    a_.raise_in(g);
    a_.small_wake(nb, buf);
    if (p) stamp(p->copy_in_ns, tp);
    const void** srcs = src_array();
    auto wait_block = [&](int b) {
      for (int r = 0; r < L_; ++r) {
        if (r == lr_) continue;
        a_.small_wait(r, b, buf, g, "copy-in");
        if (b == 0) a_.small_check_desc(r, buf, desc_, check, "an allreduce");
      }
    };
    auto sum = [&](int64_t o, int64_t n) {
      for (int r = 0; r < L_; ++r) srcs[r] = a_.small_data(r, buf) + o;
      reduce_sum_many(t_, base_ + o, srcs, L_, n / (int64_t)es_);
    };
    if (p) {
      // Profiling: every block waited for, then one sum, so that three clock reads split the call
      // (a clock read per block would cost more than a block); the unprofiled call overlaps them.
      for (int b = 0; b < nb; ++b) wait_block(b);
      stamp(p->wait_ns, tp);
      sum(0, bytes);
      stamp(p->reduce_ns, tp);
      return;
    }
    for (int b = 0; b < nb; ++b) {
      wait_block(b);
      const int64_t o = b * blk;
      if (o < bytes) sum(o, std::min(blk, bytes - o));
    }
  }

  static void stamp(int64_t& into, std::chrono::steady_clock::time_point& since) {
    const auto now = std::chrono::steady_clock::now();
    into += std::chrono::duration_cast<std::chrono::nanoseconds>(now - since).count();
    since = now;
  }

  Part reduce_small() {
    if (latency_) {
      reduce_small_blocks();
      return {};
    }
    const uint32_t g = ++h_.gen_;
    const int buf = g & 1;
    LatencyProfile* p = prof && !multi_ ? prof : nullptr;
    std::chrono::steady_clock::time_point tp;
    if (p) tp = std::chrono::steady_clock::now();
    std::memcpy(a_.slot(lr_, buf), base_, count_ * es_);
    a_.signal(ShmFlag::In, g);
    if (p) stamp(p->copy_in_ns, tp);
    a_.wait_all(ShmFlag::In, g, "copy-in");
    check_peers();
    if (p) stamp(p->wait_ns, tp);
    const void** srcs = src_array();
    for (int r = 0; r < L_; ++r) srcs[r] = a_.slot(r, buf);
    if (!multi_) {
      reduce_sum_many(t_, base_, srcs, L_, count_);
      if (p) stamp(p->reduce_ns, tp);
      return {};
    }
    if (lr_ != 0) return {};
    char* res = a_.result(buf);
    reduce_sum_many(t_, res, srcs, L_, count_);
    return {res, count_};
  }

  void distribute_small() {
    if (!multi_) return;
    const uint32_t g = first_gen_;
    char* res = a_.result(g & 1);
    if (lr_ == 0) {
      a_.signal(ShmFlag::Done, g);  // after the leaders' allreduce (the driver ran it before this)
    } else {
      a_.wait_rank(ShmFlag::Done, 0, g, "the leader's inter-node allreduce");
    }
    std::memcpy(base_, res, count_ * es_);
  }

  // One node, the peers' memory read directly (Protocol::SingleCopy): every rank's buffer stays
  // where it is. After In (addresses and descriptors published) this rank sums its slice [s0, s1)
  // in place, a chunk at a time: each peer's bytes of the chunk read once into the scratch (it
  // stays in cache), summed in rank order with its own, scaled for avg. After a peer's Reduced its
  // slice is final and is read straight into place. Done: no peer reads this rank's buffer any more,
  // so the caller may change it. Peers read only slices this rank does not write at that time.
  Part reduce_single() {
    const uint32_t g = ++h_.gen_;
    a_.publish_address(base_);
    a_.signal(ShmFlag::In, g);
    a_.wait_all(ShmFlag::In, g, "the buffers' addresses");
    check_peers();
    const int64_t s0 = part_begin(count_, L_, lr_), s1 = part_begin(count_, L_, lr_ + 1);
    const int64_t w = chunk_elems_;
    const size_t need = (size_t)(L_ - 1) * (size_t)w * es_;
    if (h_.scratch_.size() < need) h_.scratch_.resize(need);
    char* scratch = h_.scratch_.data();
    const void** srcs = src_array();
    for (int64_t o = s0; o < s1; o += w) {
      const int64_t n = std::min(w, s1 - o);
      for (int k = 1; k < L_; ++k) {
        const int r = (lr_ + k) % L_;
        char* into = scratch + (size_t)(k - 1) * (size_t)w * es_;
        a_.read_peer(r, into, o * (int64_t)es_, (size_t)n * es_, "its part of this rank's slice");
        srcs[r] = into;
      }
      srcs[lr_] = base_ + o * es_;
      reduce_sum_many(t_, base_ + o * es_, srcs, L_, n);
      if (scale_by != 1.0) scale(t_, base_ + o * es_, scale_by, n);
    }
    a_.signal(ShmFlag::Reduced, g);
    return {};
  }

  void distribute_single() {
    const uint32_t g = first_gen_;
    for (int k = 1; k < L_; ++k) {
      const int r = (lr_ + k) % L_;
      a_.wait_rank(ShmFlag::Reduced, r, g, "a peer's sum of its slice");
      const int64_t b = part_begin(count_, L_, r), e = part_begin(count_, L_, r + 1);
      a_.read_peer(r, base_ + b * es_, b * (int64_t)es_, (size_t)(e - b) * es_, "its summed slice");
    }
    a_.signal(ShmFlag::Done, g);
    a_.wait_all(ShmFlag::Done, g, "the peers' reads of this rank's buffer");
  }

  Part reduce_chunk(int64_t c) {
    const uint32_t g = ++h_.gen_;
    const int buf = g & 1;
    const int64_t b = c * chunk_elems_, n = std::min(chunk_elems_, count_ - b);
    const int64_t s0 = part_begin(n, L_, lr_), s1 = part_begin(n, L_, lr_ + 1);
    char* mine = base_ + b * es_;
    char* res = a_.result(buf);
    if (!multi_) {
      // One node: the slice this rank reduces never leaves its buffer. Copy in only what the
      // peers read, sum the slice in place (sources in rank order, this rank's own bytes read
      // from its buffer), and publish it in the result area for the peers' copy-out.
      std::memcpy(a_.slot(lr_, buf), mine, s0 * es_);
      std::memcpy(a_.slot(lr_, buf) + s1 * es_, mine + s1 * es_, (n - s1) * es_);
    } else {
      std::memcpy(a_.slot(lr_, buf), mine, n * es_);
    }
    a_.signal(ShmFlag::In, g);
    a_.wait_all(ShmFlag::In, g, "copy-in");
    if (c == 0) check_peers();
    const void** srcs = src_array();
    for (int r = 0; r < L_; ++r) srcs[r] = (!multi_ && r == lr_ ? mine : a_.slot(r, buf)) + s0 * es_;
    if (!multi_) {
      reduce_sum_many(t_, mine + s0 * es_, srcs, L_, s1 - s0);
      std::memcpy(res + s0 * es_, mine + s0 * es_, (s1 - s0) * es_);
    } else {
      reduce_sum_many(t_, res + s0 * es_, srcs, L_, s1 - s0);
    }
    a_.signal(ShmFlag::Reduced, g);
    if (!carries_) return {};
    if (mode_ == Hierarchy::Rail) return {res + s0 * es_, s1 - s0};
    return {res, n};
  }

  Hierarchy mode_;
  char* base_;
  int64_t count_;
  bool multi_, carries_ = false, small_ = false, latency_ = false, single_ = false, streaming_ = false;
  int64_t chunk_elems_ = 1, nchunks_ = 0, block_bytes_ = 0;
  const void* srcs_small_[Hierarchical::kMaxSmallRanks];
};

HierarchicalStats Hierarchical::allreduce(const Plan& plan, void* data, int64_t count, DType t, uint64_t seq,
                                          double scale_by) {
  StagedPhase ph(*this, plan, data, count, t, seq);
  ph.prof = profile && profile->on ? profile : nullptr;
  ph.scale_by = scale_by;
  const HierarchicalStats stats = drive(ph, plan.algorithm, t);
  if (scale_by != 1.0 && !ph.scales()) scale(t, data, scale_by, count);
  return stats;
}

template <class Phase>
HierarchicalStats Hierarchical::drive(Phase& ph, Algorithm a, DType t) {
  ph.publish();
  codec_.set_dtype(t);
  HierarchicalStats stats;
  stats.inter_bytes_sent = driver_.run(ph, a, codec_);
  stats.chunks = ph.chunks();
  return stats;
}

void Hierarchical::check_plan(const Plan& plan, int64_t bytes, size_t es) const {
  auto refuse = [&](const std::string& why) { refuse_plan(plan, "an allreduce of " + std::to_string(bytes) + " B", why); };
  const bool multi = num_nodes_ > 1;
  if (plan.collective != Collective::Allreduce) refuse("it is not an allreduce plan");
  if (plan.hierarchy == Hierarchy::Flat) refuse("a flat plan has no local phase");
  switch (plan.protocol) {
    case Protocol::Latency:
      if (multi || !arena_->has_small()) refuse("the latency protocol runs on one node, in the arena's small regions");
      if (bytes > ShmArena::kSmallBytes) refuse("the small regions hold " + std::to_string(ShmArena::kSmallBytes) + " B");
      if (plan.chunk_bytes < 64) refuse("the latency protocol's block must be at least 64 B");
      return;
    case Protocol::OneBarrier:
      if (bytes > arena_->chunk_bytes())
        refuse("one barrier needs the buffer in one slot of " + std::to_string(arena_->chunk_bytes()) + " B");
      if (multi && plan.hierarchy != Hierarchy::Leader && bytes != 0)
        refuse("one barrier between nodes is a leader protocol (or an empty call)");
      if (plan.chunk_bytes != 0) refuse("one barrier has no chunk");
      return;
    case Protocol::Chunked:
      if (plan.chunk_bytes < (int64_t)es || plan.chunk_bytes > arena_->chunk_bytes() || plan.chunk_bytes % (int64_t)es)
        refuse("the chunk must be whole elements, at most the arena's slot of " + std::to_string(arena_->chunk_bytes()) +
               " B");
      return;
    case Protocol::SingleCopy:
      if (multi) refuse("the single-copy protocol runs on one node");
      if (!arena_->single_copy())
        refuse("this node's ranks may not read each other's memory (the probe at init: process_vm_readv was "
               "refused on some local rank, or FASTAR_SINGLE_COPY=0 there)");
      if (plan.chunk_bytes < (int64_t)es || plan.chunk_bytes % (int64_t)es || plan.chunk_bytes > arena_->chunk_bytes())
        refuse("the chunk must be whole elements, at most the arena's slot of " + std::to_string(arena_->chunk_bytes()) +
               " B");
      return;
    default:
      refuse("the staged phase runs the latency, one-barrier, chunked or single-copy protocol");
  }
}

int64_t Hierarchical::halves_chunk(int64_t chunk_bytes, int64_t pieces, DType t) const {
  if (chunk_bytes > arena_->chunk_bytes() || chunk_bytes < 1)
    throw std::invalid_argument("fastar: a halves plan's chunk of " + std::to_string(chunk_bytes) +
                                " B does not fit the arena's slot of " + std::to_string(arena_->chunk_bytes()) +
                                " B (plans come from fastar/policy.py; this is a bug of fastar's)");
  const int64_t w = chunk_bytes / (pieces * (int64_t)dtype_size(t));
  if (w < 1)
    throw std::invalid_argument("fastar: the shared-memory chunk (" + std::to_string(arena_->chunk_bytes()) +
                                " bytes) is too small for one element of each of " + std::to_string(pieces) +
                                " ranks; raise FASTAR_SHM_CHUNK_MB");
  return w;
}

// The halves' staged phase (Hierarchical::reduce_scatter / allgather), through the driver like the
// allreduce. Local rank l of node nd is global rank nd * L + l; S = L * N shards of `shard`
// elements. A chunk is w shard elements (e = c * w, n of them); the slots hold, per chunk, one
// piece of w for each rank the local exchange needs (piece i at i * w). Between nodes the rail
// buffer holds, per chunk, this local rank's N pieces in node order, contiguous: N * n elements at
// N * e, which are the N balanced shards (part_begin) of the schedule's half on that chunk alone,
// so that the rail runs chunk c on the driver's worker while the caller works on chunk c + 1.
//  - reduce-scatter: every local rank copies in the pieces its peers sum (not its own: it reads
//    those from `in`) and sums, for each node nd, piece nd * L + l of every slot: on one node
//    straight into `out`, else into the rail's chunk; the rail reduce-scatters it; this node's
//    piece is copied out.
//  - allgather: this rank's piece goes into the rail's chunk at its node's place; the rail
//    allgathers it; then every local rank puts its N pieces in its slot (and its own output) and
//    copies every peer's out. Between nodes one barrier without data comes first, for the local
//    descriptor check, before the first chunk goes between nodes.
// Two slot buffers alternate by generation: a rank writes buffer g & 1 again only after every peer
// raised In for g - 1, which each does after its last read of generation g - 2.
class HalvesPhase final : public ArenaCall {
 public:
  HalvesPhase(Hierarchical& h, bool scatter, const Plan& plan, const void* in, void* out, int64_t shard, DType t,
              uint64_t seq)
      : ArenaCall(h, plan, seq, shard, t), scatter_(scatter), in_(static_cast<const char*>(in)),
        out_(static_cast<char*>(out)), shard_(shard), N_(h.num_nodes_), multi_(h.num_nodes_ > 1) {
    if (multi_ && h.inter_ == nullptr)
      throw std::logic_error(std::string("fastar: ") + (scatter ? "reduce_scatter" : "allgather") +
                             " between nodes without a rail");
    node_ = multi_ ? h.inter_->rank() : 0;
    w_ = h.halves_chunk(plan.chunk_bytes, scatter ? (int64_t)L_ * N_ : N_, t);
    nchunks_ = shard == 0 ? 1 : (shard + w_ - 1) / w_;  // an empty call still meets its peers
    if (multi_) {
      h.rail_buf_.resize((size_t)(N_ * shard) * es_);
      rail_ = h.rail_buf_.data();
    }
    // A large allgather result is written with streaming stores (no read for ownership of lines
    // about to be overwritten; the slots stay cached).
    streaming_ = !scatter && plan.stream;
  }
  int64_t chunks() const override { return nchunks_; }
  Collective collective() const override { return scatter_ ? Collective::ReduceScatter : Collective::Allgather; }
  bool pipelined() const override { return multi_; }
  Part reduce(int64_t c) override { return scatter_ ? scatter_reduce(c) : gather_place(c); }
  void distribute(int64_t c) override {
    if (scatter_)
      scatter_out(c);
    else
      gather_local(c);
  }

 private:
  int64_t begin(int64_t c) const { return c * w_; }
  int64_t size(int64_t c) const { return std::min(w_, shard_ - c * w_); }
  char* rail_piece(int64_t c, int nd) const { return rail_ + ((int64_t)N_ * begin(c) + (int64_t)nd * size(c)) * es_; }
  Part rail_part(int64_t c) const { return {rail_piece(c, 0), (int64_t)N_ * size(c)}; }

  Part scatter_reduce(int64_t c) {
    const uint32_t g = ++h_.gen_;
    const int buf = g & 1;
    const int64_t e = begin(c), n = size(c);
    const int64_t S = (int64_t)L_ * N_;
    char* slot = a_.slot(lr_, buf);
    if (n > 0)
      for (int64_t i = 0; i < S; ++i)
        if (i % L_ != lr_) std::memcpy(slot + i * w_ * es_, in_ + (i * shard_ + e) * es_, n * es_);
    a_.signal(ShmFlag::In, g);
    a_.wait_all(ShmFlag::In, g, "copy-in of a reduce_scatter");
    if (c == 0) a_.check_peers(desc_, first_gen_, "a reduce_scatter");
    const void** srcs = src_array();
    if (n > 0)
      for (int nd = 0; nd < N_; ++nd) {
        const int64_t i = (int64_t)nd * L_ + lr_;
        for (int r = 0; r < L_; ++r)
          srcs[r] = r == lr_ ? in_ + (i * shard_ + e) * es_ : a_.slot(r, buf) + i * w_ * es_;
        reduce_sum_many(t_, multi_ ? rail_piece(c, nd) : out_ + e * es_, srcs, L_, n);
      }
    return multi_ ? rail_part(c) : Part{};
  }

  void scatter_out(int64_t c) {
    if (multi_ && size(c) > 0) std::memcpy(out_ + begin(c) * es_, rail_piece(c, node_), size(c) * es_);
  }

  Part gather_place(int64_t c) {
    if (!multi_) return {};
    if (c == 0) {
      // Between nodes the allgather's first local exchange comes after the rail's first runs: the
      // local ranks compare descriptors first (a barrier that moves no data), so that ranks that
      // disagree raise before any chunk goes between nodes (the rail was checked by the caller).
      const uint32_t g = ++h_.gen_;
      a_.signal(ShmFlag::In, g);
      a_.wait_all(ShmFlag::In, g, "the descriptors of an allgather");
      a_.check_peers(desc_, first_gen_, "an allgather");
    }
    if (size(c) > 0) std::memcpy(rail_piece(c, node_), in_ + begin(c) * es_, size(c) * es_);
    return rail_part(c);
  }

  void gather_local(int64_t c) {
    const uint32_t g = ++h_.gen_;
    const int buf = g & 1;
    const int64_t e = begin(c), n = size(c);
    char* slot = a_.slot(lr_, buf);
    auto piece = [&](int nd) { return multi_ ? rail_piece(c, nd) : in_ + e * es_; };
    if (n > 0)
      for (int nd = 0; nd < N_; ++nd) std::memcpy(slot + (int64_t)nd * w_ * es_, piece(nd), n * es_);
    a_.signal(ShmFlag::In, g);
    // This rank's own pieces into its output while the peers still copy theirs in: off the path
    // to the barrier (it reads no slot).
    if (n > 0)
      for (int nd = 0; nd < N_; ++nd)
        copy_out_stream(out_ + (((int64_t)nd * L_ + lr_) * shard_ + e) * es_, piece(nd), n * es_, streaming_);
    a_.wait_all(ShmFlag::In, g, "copy-in of an allgather");
    if (c == 0 && !multi_) a_.check_peers(desc_, first_gen_, "an allgather");
    if (n > 0)
      for (int r = 0; r < L_; ++r)
        if (r != lr_)
          for (int nd = 0; nd < N_; ++nd)
            copy_out_stream(out_ + (((int64_t)nd * L_ + r) * shard_ + e) * es_,
                            a_.slot(r, buf) + (int64_t)nd * w_ * es_, n * es_, streaming_);
  }

  const void** src_array() {
    if (L_ <= Hierarchical::kMaxSmallRanks) return srcs_small_;
    srcs_.resize(L_);
    return srcs_.data();
  }

  bool scatter_;
  const char* in_;
  char* out_;
  int64_t shard_;
  int N_, node_ = 0;
  bool multi_, streaming_ = false;
  int64_t w_ = 1, nchunks_ = 1;
  char* rail_ = nullptr;
  const void* srcs_small_[Hierarchical::kMaxSmallRanks];
};

// The halves on one node with the peers' memory read directly (Protocol::SingleCopy; one node, so
// local rank = rank). After In (every rank's input published): a reduce-scatter sums shard `lr` of
// every rank's input into `out`, a chunk at a time through the scratch (each peer's piece read once,
// summed in rank order); an allgather puts its own input in place and reads every peer's input
// straight into its place in `out`. Done: no peer reads this rank's input any more.
class SingleCopyHalves final : public ArenaCall {
 public:
  SingleCopyHalves(Hierarchical& h, bool scatter, const Plan& plan, const void* in, void* out, int64_t shard, DType t,
                   uint64_t seq)
      : ArenaCall(h, plan, seq, shard, t), scatter_(scatter), in_(static_cast<const char*>(in)),
        out_(static_cast<char*>(out)), shard_(shard) {
    auto refuse = [&](const std::string& why) { refuse_plan(plan, scatter ? "a reduce_scatter" : "an allgather", why); };
    if (h.num_nodes_ > 1) refuse("the single-copy protocol runs on one node");
    if (!a_.single_copy()) refuse("this node's ranks may not read each other's memory (the probe at init)");
    if (plan.chunk_bytes < (int64_t)es_ || plan.chunk_bytes % (int64_t)es_ || plan.chunk_bytes > a_.chunk_bytes())
      refuse("the chunk must be whole elements, at most the arena's slot");
    w_ = plan.chunk_bytes / (int64_t)es_;
  }
  int64_t chunks() const override { return 1; }
  Collective collective() const override { return scatter_ ? Collective::ReduceScatter : Collective::Allgather; }
  Part reduce(int64_t) override {
    const uint32_t g = ++h_.gen_;
    a_.publish_address(in_);
    a_.signal(ShmFlag::In, g);
    a_.wait_all(ShmFlag::In, g, scatter_ ? "the inputs' addresses of a reduce_scatter" : "the inputs' addresses of an allgather");
    a_.check_peers(desc_, first_gen_, scatter_ ? "a reduce_scatter" : "an allgather");
    if (scatter_) {
      const size_t need = (size_t)(L_ - 1) * (size_t)w_ * es_;
      if (h_.scratch_.size() < need) h_.scratch_.resize(need);
      std::vector<const void*>& srcs = srcs_;
      srcs.resize(L_);
      const int64_t mine = (int64_t)lr_ * shard_;
      for (int64_t o = 0; o < shard_; o += w_) {
        const int64_t n = std::min(w_, shard_ - o);
        for (int k = 1; k < L_; ++k) {
          const int r = (lr_ + k) % L_;
          char* into = h_.scratch_.data() + (size_t)(k - 1) * (size_t)w_ * es_;
          a_.read_peer(r, into, (mine + o) * (int64_t)es_, (size_t)n * es_, "its part of this rank's shard");
          srcs[r] = into;
        }
        srcs[lr_] = in_ + (mine + o) * es_;
        reduce_sum_many(t_, out_ + o * es_, srcs.data(), L_, n);
      }
    } else {
      // In pieces of the plan's chunk, this rank's own copy beside its reads of the peers': every
      // rank then reads each input while its owner copies it, from the cache they share.
      const int64_t bytes = shard_ * (int64_t)es_, piece = w_ * (int64_t)es_;
      for (int64_t o = 0; o < bytes; o += piece) {
        const size_t n = (size_t)std::min(piece, bytes - o);
        for (int k = 0; k < L_; ++k) {
          const int r = (lr_ + k) % L_;
          char* into = out_ + (int64_t)r * bytes + o;
          if (k == 0)
            std::memcpy(into, in_ + o, n);
          else
            a_.read_peer(r, into, o, n, "its input");
        }
      }
    }
    a_.signal(ShmFlag::Done, g);
    return {};
  }
  void distribute(int64_t) override {
    a_.wait_all(ShmFlag::Done, first_gen_, "the peers' reads of this rank's input");
  }

 private:
  bool scatter_;
  const char* in_;
  char* out_;
  int64_t shard_;
  int64_t w_ = 1;
};

HierarchicalStats Hierarchical::halves(bool scatter, const Plan& plan, const void* in, void* out, int64_t shard, DType t,
                                       uint64_t seq) {
  if (plan.protocol == Protocol::SingleCopy) {
    SingleCopyHalves ph(*this, scatter, plan, in, out, shard, t, seq);
    return drive(ph, plan.algorithm, t);
  }
  HalvesPhase ph(*this, scatter, plan, in, out, shard, t, seq);
  return drive(ph, plan.algorithm, t);
}

HierarchicalStats Hierarchical::reduce_scatter(const Plan& plan, const void* in, void* out, int64_t shard, DType t,
                                               uint64_t seq) {
  return halves(true, plan, in, out, shard, t, seq);
}

HierarchicalStats Hierarchical::allgather(const Plan& plan, const void* in, void* out, int64_t shard, DType t,
                                          uint64_t seq) {
  return halves(false, plan, in, out, shard, t, seq);
}

}  // namespace fastar
