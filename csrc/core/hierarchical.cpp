#include "hierarchical.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

#include "reduce.h"

namespace fastar {
namespace {
std::string what_of(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "unknown error";
  }
}
}  // namespace

const char* hierarchy_name(Hierarchy h) {
  switch (h) {
    case Hierarchy::Flat: return "flat";
    case Hierarchy::Leader: return "leader";
    case Hierarchy::Rail: return "rail";
  }
  return "?";
}

Hierarchical::Hierarchical(ShmArena* arena, Transport* inter, int num_nodes)
    : arena_(arena), inter_(inter), num_nodes_(num_nodes) {
  if (inter_) worker_ = std::thread([this] { worker_loop(); });
}

Hierarchical::~Hierarchical() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void Hierarchical::worker_loop() {
  while (true) {
    Job j;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      j = queue_.front();
      queue_.pop_front();
    }
    try {
      if (!error_) {
        if (j.wait_reduced) arena_->wait_all(ShmFlag::Reduced, j.gen, "local reduce, before the inter-node phase");
        auto steps = make_schedule(j.algo, inter_->rank(), inter_->size(), j.count);
        auto st = exec_.run(steps, *inter_, j.data, j.count, j.dtype);
        std::lock_guard<std::mutex> g(mu_);
        inter_bytes_ += st.bytes_sent;
      }
    } catch (...) {
      std::lock_guard<std::mutex> g(mu_);
      if (!error_) error_ = std::current_exception();
      arena_->mark_failed(what_of(std::current_exception()));
    }
    if (!error_) arena_->signal(ShmFlag::Done, j.gen);
    {
      std::lock_guard<std::mutex> g(mu_);
      done_gen_ = j.gen;
    }
    cv_.notify_all();
  }
}

void Hierarchical::submit(const Job& j) {
  {
    std::lock_guard<std::mutex> g(mu_);
    queue_.push_back(j);
  }
  cv_.notify_all();
}

void Hierarchical::wait_job(uint32_t gen) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [&] { return (int32_t)(done_gen_ - gen) >= 0 || error_; });
  if (error_) {
    auto e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

HierarchicalStats Hierarchical::allreduce(Hierarchy mode, Algorithm algo, void* data, int64_t count, DType t,
                                          uint64_t seq) {
  HierarchicalStats stats;
  const int L = arena_->local_size();
  const int lr = arena_->local_rank();
  const size_t esize = dtype_size(t);
  // One node: chunks small enough that the slots and the result area stay in cache between the
  // copy-in, the reduce and the copy-out (the user's buffers stream through memory once each way).
  // Between nodes: the arena's chunk, the unit of the network phase's pipeline.
  const int64_t chunk_bytes = num_nodes_ > 1 ? arena_->chunk_bytes() : std::min(arena_->chunk_bytes(), local_chunk_bytes);
  const int64_t chunk_elems = chunk_bytes / (int64_t)esize;
  const int64_t nchunks = count == 0 ? 0 : (count + chunk_elems - 1) / chunk_elems;
  char* base = static_cast<char*>(data);
  const bool multi = num_nodes_ > 1;
  const bool i_run_inter = multi && inter_ != nullptr && (mode == Hierarchy::Rail || lr == 0);
  if (multi && mode == Hierarchy::Rail && inter_ == nullptr) throw std::logic_error("fastar: rail without transport");
  const uint64_t desc[4] = {seq, (uint64_t)count, (uint64_t)t, (uint64_t)mode * 16 + (uint64_t)algo};
  arena_->publish_desc(desc, gen_ + 1);
  const uint32_t first_gen = gen_ + 1;
  const uint64_t inter_before = inter_bytes_;

  try {
    // Small single-chunk buffers: one barrier, every rank sums all slots itself. An empty buffer
    // takes this path too, so that its peers still check that they agree on the call.
    if (count == 0 ||
        (nchunks == 1 && count * (int64_t)esize <= small_bytes && (!multi || mode == Hierarchy::Leader))) {
      const uint32_t g = ++gen_;
      const int buf = g & 1;
      LatencyProfile* prof = profile && profile->on && !multi ? profile : nullptr;
      auto stamp = [](int64_t& into, std::chrono::steady_clock::time_point& since) {
        const auto now = std::chrono::steady_clock::now();
        into += std::chrono::duration_cast<std::chrono::nanoseconds>(now - since).count();
        since = now;
      };
      std::chrono::steady_clock::time_point tp;
      if (prof) tp = std::chrono::steady_clock::now();
      std::memcpy(arena_->slot(lr, buf), base, count * esize);
      arena_->signal(ShmFlag::In, g);
      if (prof) stamp(prof->copy_in_ns, tp);
      arena_->wait_all(ShmFlag::In, g, "copy-in");
      for (int r = 0; r < L; ++r)
        if (r != lr) arena_->check_desc(r, desc, first_gen, "an allreduce");
      if (prof) stamp(prof->wait_ns, tp);
      const void* srcs_small[kMaxSmallRanks];
      std::vector<const void*> srcs_big(L > kMaxSmallRanks ? L : 0);
      const void** srcs = L > kMaxSmallRanks ? srcs_big.data() : srcs_small;
      for (int r = 0; r < L; ++r) srcs[r] = arena_->slot(r, buf);
      if (!multi) {
        reduce_sum_many(t, base, srcs, L, count);
        if (prof) stamp(prof->reduce_ns, tp);
      } else if (lr == 0) {
        char* res = arena_->result(buf);
        reduce_sum_many(t, res, srcs, L, count);
        if (inter_) {
          auto st = exec_.run(make_schedule(algo, inter_->rank(), inter_->size(), count), *inter_, res, count, t);
          inter_bytes_ += st.bytes_sent;
        }
        arena_->signal(ShmFlag::Done, g);
        std::memcpy(base, res, count * esize);
      } else {
        arena_->wait_rank(ShmFlag::Done, 0, g, "the leader's inter-node allreduce");
        std::memcpy(base, arena_->result(buf), count * esize);
      }
      stats.chunks = 1;
      stats.inter_bytes_sent = inter_bytes_ - inter_before;
      return stats;
    }

    std::vector<const void*> srcs(L);
    // A buffer larger than the cache is written with streaming stores: no read for ownership of
    // lines that are about to be overwritten, and the arena's lines stay cached.
    const bool streaming = count * (int64_t)esize >= kStreamAboveBytes;
    auto copy_out = [&](int64_t c, uint32_t g) {
      const int buf = g & 1;
      const int64_t b = c * chunk_elems;
      const int64_t n = std::min(chunk_elems, count - b);
      if (i_run_inter) wait_job(g);
      if (!multi) {
        arena_->wait_all(ShmFlag::Reduced, g, "local reduce-scatter");
      } else if (mode == Hierarchy::Rail) {
        arena_->wait_all(ShmFlag::Done, g, "inter-node allreduce of a peer's slice");
      } else if (lr != 0) {
        arena_->wait_rank(ShmFlag::Done, 0, g, "the leader's inter-node allreduce");
      }
      if (!multi) {  // this rank's slice is in its buffer already (see the loop)
        const int64_t s0 = part_begin(n, L, lr), s1 = part_begin(n, L, lr + 1);
        copy_out_stream(base + b * esize, arena_->result(buf), s0 * esize, streaming);
        copy_out_stream(base + (b + s1) * esize, arena_->result(buf) + s1 * esize, (n - s1) * esize, streaming);
      } else {
        copy_out_stream(base + b * esize, arena_->result(buf), n * esize, streaming);
      }
    };
    uint32_t prev_gen = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      const uint32_t g = ++gen_;
      const int buf = g & 1;
      const int64_t b = c * chunk_elems;
      const int64_t n = std::min(chunk_elems, count - b);
      const int64_t s0 = part_begin(n, L, lr), s1 = part_begin(n, L, lr + 1);
      char* mine = base + b * esize;
      char* res = arena_->result(buf);
      if (!multi) {
        // One node: the slice this rank reduces never leaves its buffer. Copy in only what the
        // peers read, sum the slice in place (sources in rank order, this rank's own bytes read
        // from its buffer), and publish it in the result area for the peers' copy-out.
        std::memcpy(arena_->slot(lr, buf), mine, s0 * esize);
        std::memcpy(arena_->slot(lr, buf) + s1 * esize, mine + s1 * esize, (n - s1) * esize);
      } else {
        std::memcpy(arena_->slot(lr, buf), mine, n * esize);
      }
      arena_->signal(ShmFlag::In, g);
      arena_->wait_all(ShmFlag::In, g, "copy-in");
      if (c == 0)
        for (int r = 0; r < L; ++r)
          if (r != lr) arena_->check_desc(r, desc, first_gen, "an allreduce");
      for (int r = 0; r < L; ++r) srcs[r] = (!multi && r == lr ? mine : arena_->slot(r, buf)) + s0 * esize;
      if (!multi) {
        reduce_sum_many(t, mine + s0 * esize, srcs.data(), L, s1 - s0);
        std::memcpy(res + s0 * esize, mine + s0 * esize, (s1 - s0) * esize);
      } else {
        reduce_sum_many(t, res + s0 * esize, srcs.data(), L, s1 - s0);
      }
      arena_->signal(ShmFlag::Reduced, g);
      if (i_run_inter) {
        if (mode == Hierarchy::Rail)
          submit({res + s0 * esize, s1 - s0, g, false, algo, t});
        else
          submit({res, n, g, L > 1, algo, t});
      }
      if (c > 0) copy_out(c - 1, prev_gen);  // the previous chunk's network phase overlapped this one
      prev_gen = g;
    }
    if (nchunks > 0) copy_out(nchunks - 1, prev_gen);
    stats.chunks = nchunks;
    stats.inter_bytes_sent = inter_bytes_ - inter_before;
    return stats;
  } catch (...) {
    arena_->mark_failed(what_of(std::current_exception()));
    throw;
  }
}

}  // namespace fastar

namespace fastar {

int64_t Hierarchical::halves_chunk(int64_t pieces, DType t) const {
  // One node: chunks that stay in cache between the copy-in and the peers' reads (as the
  // allreduce's one-node pipeline); between nodes the arena's.
  const int64_t chunk = num_nodes_ > 1 ? arena_->chunk_bytes() : std::min(arena_->chunk_bytes(), local_chunk_bytes);
  const int64_t w = chunk / (pieces * (int64_t)dtype_size(t));
  if (w < 1)
    throw std::invalid_argument("fastar: the shared-memory chunk (" + std::to_string(arena_->chunk_bytes()) +
                                " bytes) is too small for one element of each of " + std::to_string(pieces) +
                                " ranks; raise FASTAR_SHM_CHUNK_MB");
  return w;
}

void Hierarchical::check_first(uint32_t g, const uint64_t desc[4], const char* what) {
  for (int r = 0; r < arena_->local_size(); ++r)
    if (r != arena_->local_rank()) arena_->check_desc(r, desc, g, what);
}

// Slots hold, per chunk of w shard elements, one piece of w for each rank (piece i at i * w).
// Every local rank copies in the pieces its peers sum (not its own: it reads those from `in`), and
// sums, for each node n, piece n * L + l of every slot: on one node straight into `out`, else into
// the rail buffer, whose N shards the rail then reduce-scatters. Two buffers alternate by
// generation: a rank writes buffer g & 1 again only after every peer raised In for g - 1, which
// each does after its last read of generation g - 2.
HierarchicalStats Hierarchical::reduce_scatter(Algorithm algo, const void* in, void* out, int64_t shard, DType t,
                                               uint64_t seq) {
  HierarchicalStats stats;
  const int L = arena_->local_size(), lr = arena_->local_rank(), N = num_nodes_;
  const int64_t S = (int64_t)L * N;
  const size_t es = dtype_size(t);
  if (N > 1 && inter_ == nullptr) throw std::logic_error("fastar: reduce_scatter between nodes without a rail");
  const int node = N > 1 ? inter_->rank() : 0;
  const int64_t w = halves_chunk(S, t);
  const int64_t nchunks = shard == 0 ? 1 : (shard + w - 1) / w;  // an empty call still meets its peers
  const char* src = static_cast<const char*>(in);
  char* dst = N > 1 ? nullptr : static_cast<char*>(out);
  if (N > 1) {
    rail_buf_.resize((size_t)(N * shard) * es);
    dst = rail_buf_.data();
  }
  const uint64_t desc[4] = {seq, (uint64_t)shard, (uint64_t)t, 512 + (uint64_t)algo};
  const uint32_t first_gen = gen_ + 1;
  arena_->publish_desc(desc, first_gen);
  std::vector<const void*> srcs(L);
  try {
    for (int64_t c = 0; c < nchunks; ++c) {
      const uint32_t g = ++gen_;
      const int buf = g & 1;
      const int64_t e = c * w, n = std::min(w, shard - e);
      char* slot = arena_->slot(lr, buf);
      for (int64_t i = 0; i < S; ++i)
        if (i % L != lr) std::memcpy(slot + i * w * es, src + (i * shard + e) * es, n * es);
      arena_->signal(ShmFlag::In, g);
      arena_->wait_all(ShmFlag::In, g, "copy-in of a reduce_scatter");
      if (c == 0) check_first(first_gen, desc, "a reduce_scatter");
      for (int nd = 0; nd < N; ++nd) {
        const int64_t i = (int64_t)nd * L + lr;
        for (int r = 0; r < L; ++r)
          srcs[r] = r == lr ? src + (i * shard + e) * es : arena_->slot(r, buf) + i * w * es;
        reduce_sum_many(t, dst + ((int64_t)nd * shard + e) * es, srcs.data(), L, n);
      }
    }
    stats.chunks = nchunks;
    if (N > 1) {
      auto st = exec_.run(reduce_scatter_schedule(algo, node, N, N * shard), *inter_, dst, N * shard, t);
      std::memcpy(out, dst + (int64_t)node * shard * es, shard * es);
      stats.inter_bytes_sent = st.bytes_sent;
    }
    return stats;
  } catch (...) {
    arena_->mark_failed(what_of(std::current_exception()));
    throw;
  }
}

// Between nodes first: the rail gathers this local rank's shards of every node. Then per chunk of
// w shard elements each local rank puts its N pieces in its slot and copies every peer's out.
HierarchicalStats Hierarchical::allgather(Algorithm algo, const void* in, void* out, int64_t shard, DType t,
                                          uint64_t seq) {
  HierarchicalStats stats;
  const int L = arena_->local_size(), lr = arena_->local_rank(), N = num_nodes_;
  const size_t es = dtype_size(t);
  if (N > 1 && inter_ == nullptr) throw std::logic_error("fastar: allgather between nodes without a rail");
  const int node = N > 1 ? inter_->rank() : 0;
  const int64_t w = halves_chunk(N, t);
  const int64_t nchunks = shard == 0 ? 1 : (shard + w - 1) / w;
  char* dst = static_cast<char*>(out);
  const char* mine = static_cast<const char*>(in);
  const uint64_t desc[4] = {seq, (uint64_t)shard, (uint64_t)t, 1024 + (uint64_t)algo};
  // A large result is written with streaming stores (no read for ownership of lines about to be
  // overwritten; the slots stay cached).
  const bool streaming = (int64_t)L * N * shard * (int64_t)es >= kStreamAboveBytes;
  const uint32_t first_gen = gen_ + 1;
  arena_->publish_desc(desc, first_gen);
  try {
    if (N > 1) {
      rail_buf_.resize((size_t)(N * shard) * es);
      std::memcpy(rail_buf_.data() + (int64_t)node * shard * es, in, shard * es);
      auto st = exec_.run(allgather_schedule(algo, node, N, N * shard), *inter_, rail_buf_.data(), N * shard, t);
      stats.inter_bytes_sent = st.bytes_sent;
      mine = rail_buf_.data();
    }
    for (int64_t c = 0; c < nchunks; ++c) {
      const uint32_t g = ++gen_;
      const int buf = g & 1;
      const int64_t e = c * w, n = std::min(w, shard - e);
      char* slot = arena_->slot(lr, buf);
      for (int nd = 0; nd < N; ++nd) {
        const char* piece = mine + ((int64_t)(N > 1 ? nd : 0) * shard + e) * es;
        std::memcpy(slot + (int64_t)nd * w * es, piece, n * es);
        copy_out_stream(dst + (((int64_t)nd * L + lr) * shard + e) * es, piece, n * es, streaming);
      }
      arena_->signal(ShmFlag::In, g);
      arena_->wait_all(ShmFlag::In, g, "copy-in of an allgather");
      if (c == 0) check_first(first_gen, desc, "an allgather");
      for (int r = 0; r < L; ++r)
        if (r != lr)
          for (int nd = 0; nd < N; ++nd)
            copy_out_stream(dst + (((int64_t)nd * L + r) * shard + e) * es,
                            arena_->slot(r, buf) + (int64_t)nd * w * es, n * es, streaming);
    }
    stats.chunks = nchunks;
    return stats;
  } catch (...) {
    arena_->mark_failed(what_of(std::current_exception()));
    throw;
  }
}

}  // namespace fastar
