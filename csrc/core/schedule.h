// Allreduce schedules as pure functions of (rank, world size, element count).
// A schedule is the list of point-to-point steps one rank performs; the executor runs it over any
// transport. Ranges are in elements of the flat buffer.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "plan.h"

namespace fastar {

struct Range {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t size() const { return end - begin; }
  bool empty() const { return end <= begin; }
};

struct Step {
  int send_peer = -1;  // -1: nothing to send in this step
  Range send;
  int recv_peer = -1;  // -1: nothing to receive in this step
  Range recv;
  bool reduce = false;  // received elements are summed into the buffer (else copied over it)
};


std::vector<Step> halving_doubling_schedule(int rank, int size, int64_t count);
std::vector<Step> ring_schedule(int rank, int size, int64_t count);
std::vector<Step> make_schedule(Algorithm algo, int rank, int size, int64_t count);

// The two halves of an allreduce as collectives of their own. `count` elements are `size` balanced
// shards (part_begin); rank r ends holding shard r, in place: reduce-scatter sums every rank's
// shard r into rank r's buffer at shard r; allgather starts with each rank's shard at its place
// and ends with all of them everywhere. HalvingDoubling here halves by distance (partner
// rank ^ size/2 first), so that ranks end in natural order, and needs a power-of-two size: for
// any other size these return the ring's steps (halves_algorithm says which ran).
std::vector<Step> reduce_scatter_schedule(Algorithm algo, int rank, int size, int64_t count);
std::vector<Step> allgather_schedule(Algorithm algo, int rank, int size, int64_t count);
Algorithm halves_algorithm(Algorithm algo, int size);

Algorithm parse_algorithm(const std::string& s);  // throws std::invalid_argument

// Element offset where part i of n balanced parts of count begins.
inline int64_t part_begin(int64_t count, int64_t n, int64_t i) {
  const int64_t q = count / n, r = count % n;
  return i * q + (i < r ? i : r);
}

}  // namespace fastar
