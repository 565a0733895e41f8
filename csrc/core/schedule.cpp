// Recursive halving and doubling with binary blocks, and ring.
//
// Halving/doubling (Thakur, Rabenseifner, Gropp 2005) on a power-of-two group of 2^k ranks: the
// buffer is cut into P = 2^K equal chunks (2^K is the largest block, see below). Reduce-scatter: at
// step s = 0..k-1 a rank exchanges with partner rank ^ (1 << s): both split the chunk range they
// still hold in two halves; the rank whose bit s is 0 keeps the lower half and sends the upper one,
// its partner the reverse, and each sums what it receives into the half it keeps. After k steps a
// rank holds 2^(K-k) consecutive chunks, fully reduced within its block; because bit 0 of the rank
// chose the top-level half, the chunks it holds start at bitreverse_k(rank) * 2^(K-k) (the
// "bit-reversed chunk order"). Partners at distance 1 exchange the most data, which keeps the
// largest messages between neighbouring ranks (usually the same node). The allgather retraces the
// steps in reverse, doubling the held range by copying. Every rank sends 2 * (p-1)/p of the buffer
// in 2 * log2(p) steps.
//
// Binary blocks, for p that is not a power of two: p is split by its binary representation into
// blocks of 2^K > 2^k1 > ... ranks (block 0, the largest, holds ranks [0, 2^K)). Every block
// reduce-scatters internally. Then one extra step: each rank of a smaller block sends every chunk
// it holds to the rank of block 0 that holds that chunk, which sums them in block order. Block 0 now
// holds the full sum, a chunk per rank. The mirror step sends each finished chunk back to its
// holders in the smaller blocks, and every block allgathers internally. Every chunk is summed by
// exactly one rank in one fixed order, so all ranks end bitwise identical.
#include "schedule.h"

#include <stdexcept>

namespace fastar {
namespace {

int bit_reverse(int v, int bits) {
  int r = 0;
  for (int i = 0; i < bits; ++i) r |= ((v >> i) & 1) << (bits - 1 - i);
  return r;
}

struct Block {
  int offset;  // first rank
  int log2size;
};

std::vector<Block> binary_blocks(int size) {
  std::vector<Block> blocks;
  int offset = 0;
  for (int b = 30; b >= 0; --b) {
    if (size & (1 << b)) {
      blocks.push_back({offset, b});
      offset += 1 << b;
    }
  }
  return blocks;
}

// Chunk range [first, first + n) held by block-local index j of a block of 2^k after reduce-scatter.
struct ChunkSpan {
  int64_t first, n;
};
ChunkSpan held_chunks(int j, int k, int K) {
  const int64_t n = int64_t(1) << (K - k);
  return {int64_t(bit_reverse(j, k)) * n, n};
}

// One recursive-halving step with `peer` over the chunk range [lo, hi): keep (and sum into) the
// lower half when keep_low, else the upper one; send the other. Narrows [lo, hi) to the kept half.
template <class Elems>
Step halving_step(int peer, bool keep_low, int64_t& lo, int64_t& hi, const Elems& elems) {
  const int64_t mid = (lo + hi) / 2;
  Step st;
  st.send_peer = st.recv_peer = peer;
  st.reduce = true;
  if (keep_low) {
    st.send = elems(mid, hi);
    st.recv = elems(lo, mid);
    hi = mid;
  } else {
    st.send = elems(lo, mid);
    st.recv = elems(mid, hi);
    lo = mid;
  }
  return st;
}

}  // namespace

std::vector<Step> halving_doubling_schedule(int rank, int size, int64_t count) {
  if (size <= 0 || rank < 0 || rank >= size) throw std::invalid_argument("fastar: bad rank/size for schedule");
  if (count < 0) throw std::invalid_argument("fastar: negative element count");
  std::vector<Step> steps;
  if (size == 1 || count == 0) return steps;

  const std::vector<Block> blocks = binary_blocks(size);
  const int K = blocks[0].log2size;
  const int64_t P = int64_t(1) << K;
  auto elems = [&](int64_t chunk_lo, int64_t chunk_hi) {
    return Range{part_begin(count, P, chunk_lo), part_begin(count, P, chunk_hi)};
  };

  int my_block = 0;
  for (size_t b = 0; b < blocks.size(); ++b)
    if (rank >= blocks[b].offset) my_block = (int)b;
  const Block blk = blocks[my_block];
  const int j = rank - blk.offset;
  const int k = blk.log2size;

  // Intra-block reduce-scatter by recursive halving.
  int64_t lo = 0, hi = P;
  for (int s = 0; s < k; ++s) steps.push_back(halving_step(blk.offset + (j ^ (1 << s)), ((j >> s) & 1) == 0, lo, hi, elems));

  // Owner in block 0 of chunk c, and the holder of chunk c in block b.
  auto block0_owner = [&](int64_t c) { return bit_reverse((int)c, K); };
  auto holder_in = [&](const Block& b, int64_t c) {
    const int64_t per = int64_t(1) << (K - b.log2size);
    return b.offset + bit_reverse((int)(c / per), b.log2size);
  };

  // Extra step after the reduce-scatter: smaller blocks hand their partial sums to block 0.
  if (blocks.size() > 1) {
    if (my_block == 0) {
      const int64_t c = held_chunks(j, K, K).first;
      for (size_t b = 1; b < blocks.size(); ++b) {
        Step st;
        st.recv_peer = holder_in(blocks[b], c);
        st.recv = elems(c, c + 1);
        st.reduce = true;
        steps.push_back(st);
      }
    } else {
      const ChunkSpan span = held_chunks(j, k, K);
      for (int64_t c = span.first; c < span.first + span.n; ++c) {
        Step st;
        st.send_peer = block0_owner(c);
        st.send = elems(c, c + 1);
        steps.push_back(st);
      }
    }
    // Extra step before the allgather: block 0 returns the finished chunks.
    if (my_block == 0) {
      const int64_t c = held_chunks(j, K, K).first;
      for (size_t b = 1; b < blocks.size(); ++b) {
        Step st;
        st.send_peer = holder_in(blocks[b], c);
        st.send = elems(c, c + 1);
        steps.push_back(st);
      }
    } else {
      const ChunkSpan span = held_chunks(j, k, K);
      for (int64_t c = span.first; c < span.first + span.n; ++c) {
        Step st;
        st.recv_peer = block0_owner(c);
        st.recv = elems(c, c + 1);
        steps.push_back(st);
      }
    }
  }

  // Intra-block allgather by recursive doubling, retracing the halving.
  for (int s = k - 1; s >= 0; --s) {
    const int peer = blk.offset + (j ^ (1 << s));
    const int64_t width = hi - lo;
    Step st;
    st.send_peer = st.recv_peer = peer;
    st.send = elems(lo, hi);
    if (((j >> s) & 1) == 0) {
      st.recv = elems(hi, hi + width);
      hi += width;
    } else {
      st.recv = elems(lo - width, lo);
      lo -= width;
    }
    steps.push_back(st);
  }
  return steps;
}

std::vector<Step> ring_schedule(int rank, int size, int64_t count) {
  if (size <= 0 || rank < 0 || rank >= size) throw std::invalid_argument("fastar: bad rank/size for schedule");
  if (count < 0) throw std::invalid_argument("fastar: negative element count");
  std::vector<Step> steps;
  if (size == 1 || count == 0) return steps;
  const int next = (rank + 1) % size, prev = (rank + size - 1) % size;
  auto chunk = [&](int64_t c) {
    c = ((c % size) + size) % size;
    return Range{part_begin(count, size, c), part_begin(count, size, c + 1)};
  };
  for (int s = 0; s < size - 1; ++s) {  // reduce-scatter: rank ends holding chunk rank+1
    Step st;
    st.send_peer = next;
    st.send = chunk(rank - s);
    st.recv_peer = prev;
    st.recv = chunk(rank - s - 1);
    st.reduce = true;
    steps.push_back(st);
  }
  for (int s = 0; s < size - 1; ++s) {  // allgather
    Step st;
    st.send_peer = next;
    st.send = chunk(rank + 1 - s);
    st.recv_peer = prev;
    st.recv = chunk(rank - s);
    steps.push_back(st);
  }
  return steps;
}

std::vector<Step> make_schedule(Algorithm algo, int rank, int size, int64_t count) {
  switch (algo) {
    case Algorithm::HalvingDoubling: return halving_doubling_schedule(rank, size, count);
    case Algorithm::Ring: return ring_schedule(rank, size, count);
  }
  throw std::invalid_argument("fastar: unknown algorithm");
}

Algorithm halves_algorithm(Algorithm algo, int size) {
  return algo == Algorithm::HalvingDoubling && (size & (size - 1)) == 0 ? algo : Algorithm::Ring;
}

namespace {

void check_args(int rank, int size, int64_t count) {
  if (size <= 0 || rank < 0 || rank >= size) throw std::invalid_argument("fastar: bad rank/size for schedule");
  if (count < 0) throw std::invalid_argument("fastar: negative element count");
}

// Halving/doubling for the halves, over size = 2^k shards: the reduce-scatter exchanges with
// rank ^ 2^s for s = k-1 .. 0, keeping the half of its range that holds its own shard (bit s of
// the rank picks it), so that after k steps rank r holds exactly shard r. The allgather retraces it.
std::vector<Step> hd_halves(int rank, int size, int64_t count, bool scatter) {
  std::vector<Step> steps;
  int k = 0;
  while ((1 << k) < size) ++k;
  auto elems = [&](int64_t lo, int64_t hi) { return Range{part_begin(count, size, lo), part_begin(count, size, hi)}; };
  int64_t lo = 0, hi = size;
  for (int s = k - 1; s >= 0; --s) steps.push_back(halving_step(rank ^ (1 << s), ((rank >> s) & 1) == 0, lo, hi, elems));
  if (scatter) return steps;
  std::vector<Step> gather;
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    Step st = *it;  // the mirror: send what was kept, receive what was given away
    std::swap(st.send, st.recv);
    st.reduce = false;
    gather.push_back(st);
  }
  return gather;
}

std::vector<Step> ring_halves(int rank, int size, int64_t count, bool scatter) {
  std::vector<Step> steps;
  const int next = (rank + 1) % size, prev = (rank + size - 1) % size;
  auto chunk = [&](int64_t c) {
    c = ((c % size) + size) % size;
    return Range{part_begin(count, size, c), part_begin(count, size, c + 1)};
  };
  // Reduce-scatter: at step s pass on the partial sum of shard rank-s-1 and add the one of shard
  // rank-s-2 that arrives; the last arrival (s = size-2) is shard `rank`, summed over every rank.
  // Allgather: pass on shard rank-s, receive shard rank-s-1.
  for (int s = 0; s < size - 1; ++s) {
    Step st;
    st.send_peer = next;
    st.recv_peer = prev;
    st.send = scatter ? chunk(rank - s - 1) : chunk(rank - s);
    st.recv = scatter ? chunk(rank - s - 2) : chunk(rank - s - 1);
    st.reduce = scatter;
    steps.push_back(st);
  }
  return steps;
}

}  // namespace

std::vector<Step> reduce_scatter_schedule(Algorithm algo, int rank, int size, int64_t count) {
  check_args(rank, size, count);
  if (size == 1 || count == 0) return {};
  return halves_algorithm(algo, size) == Algorithm::HalvingDoubling ? hd_halves(rank, size, count, true)
                                                                    : ring_halves(rank, size, count, true);
}

std::vector<Step> allgather_schedule(Algorithm algo, int rank, int size, int64_t count) {
  check_args(rank, size, count);
  if (size == 1 || count == 0) return {};
  return halves_algorithm(algo, size) == Algorithm::HalvingDoubling ? hd_halves(rank, size, count, false)
                                                                    : ring_halves(rank, size, count, false);
}

const char* hierarchy_name(Hierarchy h) {
  switch (h) {
    case Hierarchy::Flat: return "flat";
    case Hierarchy::Leader: return "leader";
    case Hierarchy::Rail: return "rail";
  }
  return "?";
}

const char* algorithm_name(Algorithm a) {
  return a == Algorithm::Ring ? "ring" : "halving_doubling";
}

Algorithm parse_algorithm(const std::string& s) {
  if (s == "halving_doubling" || s == "hd") return Algorithm::HalvingDoubling;
  if (s == "ring") return Algorithm::Ring;
  throw std::invalid_argument("fastar: unknown algorithm '" + s + "' (expected 'halving_doubling' or 'ring')");
}

}  // namespace fastar
