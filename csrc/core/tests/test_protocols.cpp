// C++ tests of the node's shared-memory protocols, driven from several threads at once: L local
// ranks are L threads of this process, each with its own ShmArena over one segment (local rank 0
// creates it, the others open it by name, then it is unlinked, as fastar.init does) and its own
// Hierarchical or ArenaAllreduce. One node: no inter-node transport, except for the halves between
// nodes (N segments, an in-memory transport per rail, the driver's worker threads pipelining).
//
// Covered: the latency path (ShmArena's small regions, block by block: sizes up to 64 KiB, block
// edges, smaller blocks, profiling on), the one-barrier slot path (a larger small_bytes on every
// rank), the chunked pipeline (sizes over many chunks of a small local_chunk_bytes, chunks smaller
// than L elements), reduce_scatter and allgather, ArenaAllreduce in place (bytes outside the bucket
// untouched), long runs of back-to-back calls of every kind with varying sizes and settings (the
// generations and the two buffers' parity reused across paths), and failure marking: a rank that
// marks itself failed, times out, or disagrees on the call makes every peer raise promptly with
// its reason, never wait out the timeout.
//
// Every fill is small integers whose sum has a closed form, exact in every dtype: each element of
// every result is checked. Built and run by `make sanitize` under ASan+UBSan and TSan as well.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "../arena_allreduce.h"
#include "../hierarchical.h"
#include "../reduce.h"
#include "../shm.h"
#include "check.h"
#include "test_plan.h"

using namespace fastar;

namespace {


// A protocol that hangs fails here (the waits throw) instead of hanging the test.
constexpr double kTimeout = 30;
// A rank whose peer failed must raise well before the timeout.
constexpr double kPromptS = 5;
constexpr int64_t kArenaChunk = 256 << 10;

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// ---- fills with a closed-form sum -------------------------------------------------------------

// Rank r's element i of call k: a small integer, exact in every dtype (bf16 holds integers to 256).
int64_t val(int r, int64_t i, int k) { return (i * 7 + (int64_t)k * 3) % 11 + r; }
// The sum over local ranks 0..L-1 of val(r, i, k).
int64_t sum_val(int L, int64_t i, int k) { return L * ((i * 7 + (int64_t)k * 3) % 11) + L * (L - 1) / 2; }
uint8_t byte_val(int r, int64_t i, int k) { return (uint8_t)(r * 31 + i * 7 + k * 13); }

void put(DType t, char* p, int64_t i, int64_t v) {
  switch (t) {
    case DType::Float32: { const float f = (float)v; std::memcpy(p + i * 4, &f, 4); break; }
    case DType::Float64: { const double d = (double)v; std::memcpy(p + i * 8, &d, 8); break; }
    case DType::Float16: { const uint16_t h = float_to_half((float)v); std::memcpy(p + i * 2, &h, 2); break; }
    case DType::BFloat16: { const uint16_t h = float_to_bf16((float)v); std::memcpy(p + i * 2, &h, 2); break; }
    case DType::Bytes: p[i] = (char)v; break;
  }
}

double get(DType t, const char* p, int64_t i) {
  switch (t) {
    case DType::Float32: { float f; std::memcpy(&f, p + i * 4, 4); return f; }
    case DType::Float64: { double d; std::memcpy(&d, p + i * 8, 8); return d; }
    case DType::Float16: { uint16_t h; std::memcpy(&h, p + i * 2, 2); return half_to_float(h); }
    case DType::BFloat16: { uint16_t h; std::memcpy(&h, p + i * 2, 2); return bf16_to_float(h); }
    case DType::Bytes: return (double)(uint8_t)p[i];
  }
  return -1;
}

// Buffers are exactly as large as the call says (ASan sees any byte past them). An empty one is a
// null pointer, as an empty tensor's data_ptr() is, where `null_if_empty` (the halves too: their
// phase skips empty copies, which UBSan would report for a null pointer even with 0 bytes).
constexpr bool kHalvesNullIfEmpty = true;
struct Buf {
  std::vector<char> v;
  explicit Buf(size_t bytes, bool null_if_empty = true) : v(bytes ? bytes : null_if_empty ? 0 : 1) {}
  char* data() { return v.empty() ? nullptr : v.data(); }
};

// ---- L local ranks as threads -----------------------------------------------------------------

// The test's own meeting point (outside the protocols): e.g. every rank finished its good calls
// before one of them fails, so that the failure lands on the call the test means.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> l(mu_);
    const int round = round_;
    if (++in_ == n_) {
      in_ = 0;
      ++round_;
      cv_.notify_all();
      return;
    }
    cv_.wait(l, [&] { return round_ != round; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, in_ = 0, round_ = 0;
};

std::string segment_name() {
  static std::atomic<int> n{0};
  return "/fastar_test_" + std::to_string(::getpid()) + "_" + std::to_string(n++);
}

// Runs body(arena, local_rank) on L threads, each with its own ShmArena over one new segment.
// Returns each rank's exception message ("" where the body returned).
std::vector<std::string> on_ranks(int L, bool regions_only, const std::function<void(ShmArena&, int)>& body,
                                  int64_t chunk = kArenaChunk) {
  const std::string name = segment_name();
  std::vector<std::unique_ptr<ShmArena>> arenas(L);
  try {
    arenas[0] = std::make_unique<ShmArena>(name, /*create=*/true, 0, L, chunk, kTimeout, regions_only);
    for (int lr = 1; lr < L; ++lr)
      arenas[lr] = std::make_unique<ShmArena>(name, /*create=*/false, lr, L, chunk, kTimeout, regions_only);
  } catch (const std::exception& e) {
    CHECK(false, "segment %s for %d ranks: %s", name.c_str(), L, e.what());
    return std::vector<std::string>(L, "no segment");
  }
  arenas[0]->unlink();  // every rank mapped it
  CHECK(::access(("/dev/shm" + name).c_str(), F_OK) != 0, "%s still in /dev/shm after unlink", name.c_str());
  std::vector<std::string> errors(L);
  std::vector<std::thread> threads;
  for (int lr = 0; lr < L; ++lr)
    threads.emplace_back([&, lr] {
      try {
        body(*arenas[lr], lr);
      } catch (const std::exception& e) {
        errors[lr] = e.what();
        if (errors[lr].empty()) errors[lr] = "(exception without a message)";
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

void expect_no_errors(const std::vector<std::string>& errors, const char* test, int L) {
  for (size_t lr = 0; lr < errors.size(); ++lr)
    CHECK(errors[lr].empty(), "%s L=%d: local rank %zu raised: %s", test, L, lr, errors[lr].c_str());
}

// ---- one call of each kind, checked -----------------------------------------------------------

// Rank lr's allreduce of `count` elements of t (call k); checks every element and the chunk count.
void allreduce_checked(Tuned& h, int L, int lr, int k, int64_t count, DType t, int64_t want_chunks,
                       const char* what) {
  Buf b(count * dtype_size(t));
  for (int64_t i = 0; i < count; ++i) put(t, b.data(), i, val(lr, i, k));
  const auto st = h.allreduce(Hierarchy::Leader, Algorithm::HalvingDoubling, b.data(), count, t, (uint64_t)k);
  for (int64_t i = 0; i < count; ++i) {
    const double got = get(t, b.data(), i);
    if (got != (double)sum_val(L, i, k)) {
      CHECK(false, "%s L=%d rank %d call %d: %s count %lld element %lld = %g, want %lld", what, L, lr, k,
            dtype_name(t), (long long)count, (long long)i, got, (long long)sum_val(L, i, k));
      break;
    }
  }
  if (want_chunks >= 0)
    CHECK(st.chunks == want_chunks, "%s L=%d call %d: %s count %lld ran %lld chunks, want %lld", what, L, k,
          dtype_name(t), (long long)count, (long long)st.chunks, (long long)want_chunks);
}

void reduce_scatter_checked(Tuned& h, int L, int lr, int k, int64_t shard, DType t, const char* what) {
  const size_t es = dtype_size(t);
  Buf in(L * shard * es, kHalvesNullIfEmpty), out(shard * es, kHalvesNullIfEmpty);
  for (int64_t i = 0; i < L * shard; ++i) put(t, in.data(), i, val(lr, i, k));
  h.reduce_scatter(Algorithm::Ring, in.data(), out.data(), shard, t, (uint64_t)k);
  for (int64_t e = 0; e < shard; ++e) {
    const int64_t want = sum_val(L, lr * shard + e, k);
    if (get(t, out.data(), e) != (double)want) {
      CHECK(false, "%s L=%d rank %d call %d: reduce_scatter %s shard %lld element %lld = %g, want %lld", what, L, lr,
            k, dtype_name(t), (long long)shard, (long long)e, get(t, out.data(), e), (long long)want);
      break;
    }
  }
  for (int64_t i = 0; i < L * shard; ++i)
    if (get(t, in.data(), i) != (double)val(lr, i, k)) {
      CHECK(false, "%s L=%d rank %d: reduce_scatter changed its input at %lld", what, L, lr, (long long)i);
      break;
    }
}

void allgather_checked(Tuned& h, int L, int lr, int k, int64_t shard, DType t, const char* what) {
  const size_t es = dtype_size(t);
  Buf in(shard * es, kHalvesNullIfEmpty), out(L * shard * es, kHalvesNullIfEmpty);
  for (int64_t e = 0; e < shard; ++e) put(t, in.data(), e, t == DType::Bytes ? byte_val(lr, e, k) : val(lr, e, k));
  h.allgather(Algorithm::Ring, in.data(), out.data(), shard, t, (uint64_t)k);
  for (int r = 0; r < L; ++r)
    for (int64_t e = 0; e < shard; ++e) {
      const double want = t == DType::Bytes ? (double)byte_val(r, e, k) : (double)val(r, e, k);
      const double got = get(t, out.data(), r * shard + e);
      if (got != want) {
        CHECK(false, "%s L=%d rank %d call %d: allgather %s shard %lld: rank %d's element %lld = %g, want %g", what,
              L, lr, k, dtype_name(t), (long long)shard, r, (long long)e, got, want);
        r = L;
        break;
      }
    }
}

// In place in this rank's region: the bucket [offset, offset + count * es) is summed; every
// other byte of the region keeps its sentinel.
constexpr char kSentinel = (char)0xA5;
void arena_checked(ArenaAllreduce& ar, int L, int lr, int k, int64_t offset, int64_t count, DType t,
                   const char* what) {
  const size_t es = dtype_size(t);
  char* reg = ar.region(lr);
  std::memset(reg, kSentinel, ar.region_bytes());
  for (int64_t i = 0; i < count; ++i) put(t, reg + offset, i, val(lr, i, k));
  Plan plan;
  plan.hierarchy = k % 2 ? Hierarchy::Rail : Hierarchy::Leader;
  plan.protocol = Protocol::InPlace;
  ar.allreduce(plan, offset, count, t, (uint64_t)k);
  for (int64_t i = 0; i < count; ++i)
    if (get(t, reg + offset, i) != (double)sum_val(L, i, k)) {
      CHECK(false, "%s L=%d rank %d call %d: bucket %s at %lld count %lld element %lld = %g, want %lld", what, L, lr,
            k, dtype_name(t), (long long)offset, (long long)count, (long long)i, get(t, reg + offset, i),
            (long long)sum_val(L, i, k));
      break;
    }
  const int64_t end = offset + count * (int64_t)es;
  for (int64_t b = 0; b < ar.region_bytes(); ++b)
    if ((b < offset || b >= end) && reg[b] != kSentinel) {
      CHECK(false, "%s L=%d rank %d call %d: bucket at %lld of %lld bytes: byte %lld outside it changed", what, L,
            lr, k, (long long)offset, (long long)(count * es), (long long)b);
      break;
    }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the happy paths --------------------------------------------------------------------------

// Sizes up to the small region's 64 KiB, at and around the block edges, in every dtype, with the
// default 4 KiB blocks and smaller ones (up to 16 blocks), and once with the profile on.
void latency_path(int L) {
  const int64_t bytes_list[] = {0,    2,     4,     8,     60,    64,    68,    1020,  1024,  1028, 4092,
                                4096, 4100,  8188,  8192,  8196,  16380, 16384, 16388, 32768, 40000,
                                61440, 65532, 65534, 65536};
  const DType types[] = {DType::Float32, DType::Float64, DType::Float16, DType::BFloat16};
  auto errors = on_ranks(L, false, [&](ShmArena& a, int lr) {
    Tuned h(&a, nullptr, 1);
    LatencyProfile prof;
    int k = 0;
    for (int64_t block : {4096, 1024, 64})
      for (bool profiled : {false, true}) {
        if (profiled && block != 1024) continue;
        h.small_block_bytes = block;
        prof.on = profiled;
        h.profile = profiled ? &prof : nullptr;
        for (DType t : types)
          for (int64_t bytes : bytes_list)
            for (int rep = 0; rep < 2; ++rep) {  // both buffers of the small region
              const int64_t count = bytes / (int64_t)dtype_size(t);
              allreduce_checked(h, L, lr, ++k, count, t, 1, "latency path");
            }
      }
  });
  expect_no_errors(errors, "latency path", L);
}

// small_bytes raised on every rank alike: single-chunk calls above 64 KiB take the one-barrier
// slot path; smaller ones the latency path; calls of more than one chunk the pipeline.
void one_barrier_path(int L) {
  auto errors = on_ranks(L, false, [&](ShmArena& a, int lr) {
    Tuned h(&a, nullptr, 1);
    h.small_bytes = kArenaChunk;
    h.local_chunk_bytes = kArenaChunk;
    int k = 0;
    for (int rep = 0; rep < 3; ++rep)
      for (int64_t bytes : {65536 + 8, 65600, 100000, 131072, 200000, 262136, 262144, 4096, 262144 + 8}) {
        for (DType t : {DType::Float32, DType::Float64, DType::BFloat16}) {
          const int64_t es = dtype_size(t), count = bytes / es;
          allreduce_checked(h, L, lr, ++k, count, t, ceil_div(count, kArenaChunk / es), "one-barrier path");
        }
      }
  });
  expect_no_errors(errors, "one-barrier path", L);
}

// The chunked pipeline: sizes over many chunks of small local chunks, the last chunk partial,
// chunks of fewer elements than ranks (empty slices), and the arena's own chunk as the limit.
void chunked_path(int L) {
  struct Case { int64_t chunk_bytes; int64_t count; DType t; };
  const Case cases[] = {
      {4096, 1025, DType::Float32},   {4096, 1024 * 5, DType::Float32}, {4096, 10007, DType::Float32},
      {4096, 20001, DType::Float16},  {4096, 777, DType::Float64},      {8192, 100003, DType::Float32},
      {65536, 300007, DType::Float32}, {65536, 70001, DType::BFloat16},  {kArenaChunk, 200000, DType::Float32},
      {1 << 20, 150000, DType::Float32},  // above the arena's chunk: the arena's chunk is the limit
      {8, 11, DType::Float32},        {12, 40, DType::Float32},         {16, 9, DType::Float64},
  };
  auto errors = on_ranks(L, false, [&](ShmArena& a, int lr) {
    Tuned h(&a, nullptr, 1);
    int k = 0;
    for (int rep = 0; rep < 2; ++rep)
      for (const Case& c : cases) {
        h.local_chunk_bytes = c.chunk_bytes;
        const int64_t per = std::min(c.chunk_bytes, kArenaChunk) / (int64_t)dtype_size(c.t);
        const bool small = ceil_div(c.count, per) == 1 && c.count * (int64_t)dtype_size(c.t) <= h.small_bytes;
        allreduce_checked(h, L, lr, ++k, c.count, c.t, small ? 1 : ceil_div(c.count, per), "chunked path");
      }
  });
  expect_no_errors(errors, "chunked path", L);
}

// The single-copy protocol (peers' buffers read with process_vm_readv; the threads of this process
// stand in for the node's processes): the probe agrees on every rank, then sizes from empty to
// several chunks per slice, slices shorter than a chunk or empty (fewer elements than ranks), every
// dtype, chunks of 4 KiB to the arena's slot, op avg's scale; with calls of the other protocols in
// between (the flags' generations and the slots' buffers stay in step). A rank that does not want
// it makes the probe fail on every rank, and a plan of it is then refused before anything runs.
void single_copy_path(int L) {
  struct Case { int64_t count; DType t; int64_t chunk; };
  const Case cases[] = {
      {0, DType::Float32, 4096},        {1, DType::Float32, 4096},          {(int64_t)L - 1, DType::Float64, 4096},
      {1000, DType::Float32, 4096},     {16387, DType::Float32, 65536},     {100003, DType::Float32, 4096},
      {300007, DType::Float32, 65536},  {70001, DType::BFloat16, 8192},     {50001, DType::Float16, 65536},
      {40009, DType::Float64, 4096},    {262144, DType::Float32, kArenaChunk}, {9, DType::Float64, 64},
  };
  auto errors = on_ranks(L, false, [&](ShmArena& a, int lr) {
    Tuned h(&a, nullptr, 1);
    CHECK(a.probe_single_copy(true), "single copy L=%d: the probe failed on local rank %d", L, lr);
    int k = 0;
    for (int rep = 0; rep < 2; ++rep)
      for (const Case& c : cases) {
        h.single_copy_bytes = 0;
        h.single_copy_chunk = c.chunk;
        allreduce_checked(h, L, lr, ++k, c.count, c.t, 1, "single-copy path");
        h.single_copy_bytes = -1;  // a call of the other protocols in between
        allreduce_checked(h, L, lr, ++k, 3000 + rep, DType::Float32, -1, "after a single-copy call");
      }
    // op avg: each slice scaled where it is summed (a power of two: exact)
    h.single_copy_bytes = 0;
    h.scale_by = 0.25;
    const int64_t count = 50000;
    Buf b(count * 4);
    ++k;
    for (int64_t i = 0; i < count; ++i) put(DType::Float32, b.data(), i, val(lr, i, k));
    h.allreduce(Hierarchy::Leader, Algorithm::HalvingDoubling, b.data(), count, DType::Float32, (uint64_t)k);
    for (int64_t i = 0; i < count; ++i)
      if (get(DType::Float32, b.data(), i) != sum_val(L, i, k) * 0.25) {
        CHECK(false, "single copy L=%d rank %d: avg element %lld = %g, want %g", L, lr, (long long)i,
              get(DType::Float32, b.data(), i), sum_val(L, i, k) * 0.25);
        break;
      }
  });
  expect_no_errors(errors, "single-copy path", L);
  // One rank does not want it: no rank may use it, and its plan is refused with the reason.
  std::vector<int> agreed(L, -1);
  std::vector<std::string> refused(L);
  errors = on_ranks(L, false, [&](ShmArena& a, int lr) {
    agreed[lr] = a.probe_single_copy(lr != L - 1);
    Tuned h(&a, nullptr, 1);
    h.single_copy_bytes = 0;
    Buf b(4096);
    try {
      h.allreduce(Hierarchy::Leader, Algorithm::HalvingDoubling, b.data(), 1024, DType::Float32, 1);
    } catch (const std::invalid_argument& e) {
      refused[lr] = e.what();
    }
  });
  expect_no_errors(errors, "single-copy probe refused", L);
  for (int lr = 0; lr < L; ++lr) {
    CHECK(agreed[lr] == 0, "single copy L=%d: local rank %d's probe said %d though local rank %d did not want it", L,
          lr, agreed[lr], L - 1);
    CHECK(contains(refused[lr], "may not read each other's memory"),
          "single copy L=%d: local rank %d ran a single-copy plan the probe refused: %s", L, lr, refused[lr].c_str());
  }
}

// reduce_scatter then allgather over shards of many sizes, with chunks of one element per rank
// up to the arena's chunk; allgather of raw bytes too.
// single_copy: the same calls through the single-copy protocol (chunks of the scratch instead of
// the slots'), with a slot-protocol call after each change.
void halves(int L, bool single_copy) {
  auto errors = on_ranks(L, false, [&](ShmArena& a, int lr) {
    Tuned h(&a, nullptr, 1);
    if (single_copy && !a.probe_single_copy(true)) throw std::runtime_error("the single-copy probe failed");
    h.halves_single_copy = single_copy;
    int k = 0;
    for (int64_t chunk : {(int64_t)L * 8, (int64_t)4096, (int64_t)512 << 10}) {
      h.local_chunk_bytes = chunk;
      h.single_copy_chunk = std::max<int64_t>(chunk, 64);
      for (int64_t shard : {0, 1, 5, 64, 1000, 4099, 70001}) {
        if (chunk < 4096 && shard > 1000) continue;  // a chunk per element: keep it short
        for (DType t : {DType::Float32, DType::Float64}) {
          reduce_scatter_checked(h, L, lr, ++k, shard, t, "halves");
          allgather_checked(h, L, lr, ++k, shard, t, "halves");
        }
        allgather_checked(h, L, lr, ++k, shard, DType::Bytes, "halves");
        reduce_scatter_checked(h, L, lr, ++k, shard, DType::BFloat16, "halves");
        if (single_copy) {  // a call of the slots' protocol in between
          h.halves_single_copy = false;
          reduce_scatter_checked(h, L, lr, ++k, shard, DType::Float32, "halves between single-copy calls");
          h.halves_single_copy = true;
        }
      }
    }
  });
  expect_no_errors(errors, single_copy ? "single-copy halves" : "halves", L);
}

// fastar.wrap's buckets: in place in every rank's region, at several offsets, to the region's end.
void arena_allreduce(int L) {
  auto errors = on_ranks(L, true, [&](ShmArena& a, int lr) {
    ArenaAllreduce ar(&a, nullptr, 1);
    const int64_t R = ar.region_bytes();
    int k = 0;
    struct Case { int64_t offset; int64_t count; DType t; };
    const Case cases[] = {{0, 0, DType::Float32},         {0, 1, DType::Float32},        {64, 3, DType::Float32},
                          {4, 1000, DType::Float32},      {4096, 10007, DType::Float32}, {8, 5000, DType::Float64},
                          {2, 7777, DType::Float16},      {6, 12345, DType::BFloat16},   {0, R / 4, DType::Float32},
                          {R - 4 * 999, 999, DType::Float32}, {R - 8, 1, DType::Float64}};
    for (int rep = 0; rep < 3; ++rep)
      for (const Case& c : cases) arena_checked(ar, L, lr, ++k, c.offset, c.count, c.t, "arena allreduce");
  });
  expect_no_errors(errors, "arena allreduce", L);
}

// Back-to-back calls of every kind on one Hierarchical per rank, sizes and settings drawn from one
// seed (the same on every rank): the generations and both buffers of the slots, the result area
// and the small regions are reused across the paths in every order.
void mixed_run(int L, int calls, uint32_t seed) {
  auto errors = on_ranks(L, false, [&](ShmArena& a, int lr) {
    Tuned h(&a, nullptr, 1);
    std::mt19937 rng(seed);
    auto pick = [&](int n) { return (int)(rng() % (uint32_t)n); };
    const DType types[] = {DType::Float32, DType::Float64, DType::BFloat16, DType::Float16};
    for (int k = 1; k <= calls; ++k) {
      h.small_bytes = pick(2) ? 64 << 10 : kArenaChunk;
      const int64_t chunks[] = {4096, 12288, 65536, 512 << 10};
      h.local_chunk_bytes = chunks[pick(4)];
      h.small_block_bytes = pick(2) ? 4096 : 256;
      const DType t = types[pick(4)];
      const int64_t es = dtype_size(t);
      // bytes log-uniform from 0 to ~1 MiB, often at the 64 KiB edge
      int64_t bytes = pick(8) == 0 ? (64 << 10) + (pick(3) - 1) * es : (int64_t)(std::exp2(pick(2100) / 100.0)) - 1;
      const int64_t count = bytes / es;
      const int op = pick(6);
      if (op <= 3) {
        allreduce_checked(h, L, lr, k, count, t, -1, "mixed run");
      } else if (op == 4) {
        reduce_scatter_checked(h, L, lr, k, count / L, t, "mixed run");
      } else {
        allgather_checked(h, L, lr, k, count / L, pick(2) ? DType::Bytes : t, "mixed run");
      }
    }
  });
  expect_no_errors(errors, "mixed run", L);
}

// ---- failures ---------------------------------------------------------------------------------

enum class Path { Latency, OneBarrier, Chunked, ReduceScatter, Allgather, Arena, SingleCopy };
const char* path_name(Path p) {
  switch (p) {
    case Path::Latency: return "latency path";
    case Path::OneBarrier: return "one-barrier path";
    case Path::Chunked: return "chunked path";
    case Path::ReduceScatter: return "reduce_scatter";
    case Path::Allgather: return "allgather";
    case Path::Arena: return "arena allreduce";
    case Path::SingleCopy: return "single-copy path";
  }
  return "?";
}
const Path kPaths[] = {Path::Latency, Path::OneBarrier,   Path::Chunked,   Path::ReduceScatter,
                       Path::Allgather, Path::Arena, Path::SingleCopy};

// One rank's call on `path` (call k; `grow` elements more than its peers' to make it disagree).
struct Rank {
  std::unique_ptr<Tuned> h;
  std::unique_ptr<ArenaAllreduce> ar;
  Rank(ShmArena& a, Path p) {
    if (p == Path::Arena) {
      ar = std::make_unique<ArenaAllreduce>(&a, nullptr, 1);
      return;
    }
    h = std::make_unique<Tuned>(&a, nullptr, 1);
    if (p == Path::OneBarrier) {
      h->small_bytes = kArenaChunk;
      h->local_chunk_bytes = kArenaChunk;
    } else if (p == Path::SingleCopy) {
      if (!a.probe_single_copy(true)) throw std::runtime_error("the single-copy probe failed");
      h->single_copy_bytes = 0;
      h->single_copy_chunk = 4096;
    } else {
      h->local_chunk_bytes = 16 << 10;
    }
  }
  void call(Path p, int L, int lr, int k, int64_t grow = 0) {
    switch (p) {
      case Path::Latency: return allreduce_checked(*h, L, lr, k, 1000 + grow, DType::Float32, -1, "failure test");
      case Path::OneBarrier: return allreduce_checked(*h, L, lr, k, 30000 + grow, DType::Float32, 1, "failure test");
      case Path::Chunked: return allreduce_checked(*h, L, lr, k, 20000 + grow, DType::Float32, 5, "failure test");
      case Path::ReduceScatter: return reduce_scatter_checked(*h, L, lr, k, 3000 + grow, DType::Float32, "failure test");
      case Path::Allgather: return allgather_checked(*h, L, lr, k, 3000 + grow, DType::Float32, "failure test");
      case Path::Arena: return arena_checked(*ar, L, lr, k, 4096, 10000 + grow, DType::Float32, "failure test");
      case Path::SingleCopy:
        return allreduce_checked(*h, L, lr, k, 40000 + grow, DType::Float32, 1, "failure test");
    }
  }
};

// After two good calls on every rank, local rank `victim` marks itself failed (after `delay_ms`,
// by which time its peers sleep in their waits, or at once) instead of calling: every peer raises within kPromptS, naming
// the victim and its reason, and raises again at once on its next call.
void mark_failed_test(int L, Path path, int victim, int delay_ms) {
  const std::string reason = "injected failure " + std::to_string(L * 100 + victim) + " of " + path_name(path);
  std::vector<double> took(L, 0), again(L, 0);
  std::vector<std::string> first(L), second(L);
  Barrier good(L);
  auto errors = on_ranks(L, path == Path::Arena, [&](ShmArena& a, int lr) {
    Rank rk(a, path);
    rk.call(path, L, lr, 1);
    rk.call(path, L, lr, 2);
    // A rank that fails while a peer still waits on a flag it raised before failing can make that
    // peer raise on the call it completed (the waits look at the failure first): not this test's
    // subject.
    good.wait();
    if (lr == victim) {
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      a.mark_failed(reason);
      return;
    }
    auto t0 = Clock::now();
    try {
      rk.call(path, L, lr, 3);
    } catch (const std::exception& e) {
      first[lr] = e.what();
    }
    took[lr] = since(t0);
    t0 = Clock::now();
    try {
      rk.call(path, L, lr, 4);
    } catch (const std::exception& e) {
      second[lr] = e.what();
    }
    again[lr] = since(t0);
  });
  expect_no_errors(errors, "mark_failed", L);
  const std::string who = "local rank " + std::to_string(victim);
  for (int lr = 0; lr < L; ++lr) {
    if (lr == victim) continue;
    CHECK(!first[lr].empty(), "mark_failed %s L=%d victim %d: local rank %d returned", path_name(path), L, victim, lr);
    CHECK(contains(first[lr], reason) && contains(first[lr], who),
          "mark_failed %s L=%d victim %d: local rank %d's error does not name the victim's reason: %s", path_name(path),
          L, victim, lr, first[lr].c_str());
    CHECK(took[lr] < kPromptS + delay_ms / 1000.0, "mark_failed %s L=%d victim %d: local rank %d raised after %.1f s",
          path_name(path), L, victim, lr, took[lr]);
    CHECK(!second[lr].empty() && again[lr] < kPromptS,
          "mark_failed %s L=%d victim %d: local rank %d's next call: %.1f s, %s", path_name(path), L, victim, lr,
          again[lr], second[lr].empty() ? "returned" : second[lr].c_str());
  }
}

// A real error inside the protocol: the victim's timeout is short and the last rank comes only
// once the victim timed out (its own error, raised inside the driver, which marks it failed). The
// late rank then either completes its call exactly (the victim's data was in) or raises naming the
// victim's time-out; every rank but the victim raises by its next call, promptly after the late
// rank came, never by a time-out of its own.
void timeout_test(int L, Path path) {
  const int victim = 0, late = L - 1;
  std::vector<std::string> err(L), next_err(L);
  std::vector<Clock::time_point> done(L);
  Clock::time_point late_start;
  std::atomic<bool> victim_done{false};
  Barrier good(L);
  auto errors = on_ranks(L, path == Path::Arena, [&](ShmArena& a, int lr) {
    Rank rk(a, path);
    rk.call(path, L, lr, 1);
    good.wait();
    if (lr == victim) a.set_timeout(0.3);
    if (lr == late) {
      const auto t0 = Clock::now();
      while (!victim_done.load() && since(t0) < kTimeout / 2) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      late_start = Clock::now();
    }
    try {
      rk.call(path, L, lr, 2);
    } catch (const std::exception& e) {
      err[lr] = e.what();
    }
    if (lr == victim) victim_done = true;
    if (lr != victim && err[lr].empty()) {
      try {
        rk.call(path, L, lr, 3);
      } catch (const std::exception& e) {
        next_err[lr] = e.what();
      }
    }
    done[lr] = Clock::now();
  });
  expect_no_errors(errors, "timeout", L);
  CHECK(contains(err[victim], "timed out"), "timeout %s L=%d: the victim's error: %s", path_name(path), L,
        err[victim].empty() ? "(returned)" : err[victim].c_str());
  for (int lr = 0; lr < L; ++lr) {
    if (lr == victim) continue;
    const std::string& e = err[lr].empty() ? next_err[lr] : err[lr];
    CHECK(!e.empty(), "timeout %s L=%d: local rank %d never raised", path_name(path), L, lr);
    CHECK(contains(e, "local rank 0 failed") && contains(e, "timed out"),
          "timeout %s L=%d: local rank %d's error does not name the victim's time-out: %s", path_name(path), L, lr,
          e.c_str());
    const double after = std::chrono::duration<double>(done[lr] - late_start).count();
    CHECK(after < kPromptS, "timeout %s L=%d: local rank %d raised %.1f s after the late rank came", path_name(path),
          L, lr, after);
  }
}

// One rank calls with one more element than its peers: every rank raises (none returns a sum,
// none waits out the timeout).
void disagree_test(int L, Path path, int odd) {
  std::vector<std::string> err(L);
  std::vector<double> took(L, 0);
  Barrier good(L);
  auto errors = on_ranks(L, path == Path::Arena, [&](ShmArena& a, int lr) {
    Rank rk(a, path);
    rk.call(path, L, lr, 1);
    good.wait();
    const auto t0 = Clock::now();
    try {
      rk.call(path, L, lr, 2, lr == odd ? 1 : 0);
    } catch (const std::exception& e) {
      err[lr] = e.what();
    }
    took[lr] = since(t0);
  });
  expect_no_errors(errors, "disagree", L);
  for (int lr = 0; lr < L; ++lr) {
    CHECK(!err[lr].empty(), "disagree %s L=%d odd %d: local rank %d returned", path_name(path), L, odd, lr);
    CHECK(!contains(err[lr], "timed out") && took[lr] < kPromptS, "disagree %s L=%d odd %d: local rank %d: %.1f s, %s",
          path_name(path), L, odd, lr, took[lr], err[lr].c_str());
  }
}

// ---- the halves between nodes -----------------------------------------------------------------

// The ranks of one rail (the same local rank on every node) as threads: messages matched by
// (source, destination, tag), as Gloo matches them.
struct RailHub {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::tuple<int, int, uint32_t>, std::deque<std::vector<char>>> box;
};

class RailTransport final : public Transport {
 public:
  RailTransport(RailHub& hub, int rank, int size) : hub_(hub), rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Handle isend(int peer, const void* data, size_t bytes, uint32_t tag) override {
    std::lock_guard<std::mutex> g(hub_.mu);
    hub_.box[{rank_, peer, tag}].emplace_back((const char*)data, (const char*)data + bytes);
    hub_.cv.notify_all();
    return -1;
  }
  Handle irecv(int peer, void* data, size_t bytes, uint32_t tag) override {
    pending_.push_back({peer, data, bytes, tag});
    return (Handle)pending_.size() - 1;
  }
  void wait(Handle h) override {
    if (h < 0) return;
    const Pending p = pending_[h];
    std::unique_lock<std::mutex> l(hub_.mu);
    const auto key = std::make_tuple(p.peer, rank_, p.tag);
    if (!hub_.cv.wait_for(l, std::chrono::seconds((int64_t)kTimeout), [&] { return !hub_.box[key].empty(); }))
      throw std::runtime_error("rail rank " + std::to_string(rank_) + ": timed out waiting for " + std::to_string(p.peer));
    auto& m = hub_.box[key].front();
    if (m.size() != p.bytes) throw std::runtime_error("rail message of the wrong size");
    if (p.bytes) std::memcpy(p.data, m.data(), p.bytes);
    hub_.box[key].pop_front();
  }

 private:
  struct Pending {
    int peer;
    void* data;
    size_t bytes;
    uint32_t tag;
  };
  RailHub& hub_;
  int rank_, size_;
  std::vector<Pending> pending_;
};

// N nodes of L local ranks as N * L threads: a segment per node, a rail transport per local rank.
// reduce_scatter and allgather through the driver, pipelined (the rail's half of chunk c on the
// driver's worker while the caller works on chunk c + 1), over shards of many chunks of a small
// arena chunk; every element checked, and the chunk count.
void halves_between_nodes(int N, int L) {
  const int S = N * L;
  const int64_t chunk = 4096;
  std::vector<std::vector<std::unique_ptr<ShmArena>>> arenas(N);
  for (int nd = 0; nd < N; ++nd) {
    const std::string name = segment_name();
    arenas[nd].resize(L);
    try {
      for (int lr = 0; lr < L; ++lr)
        arenas[nd][lr] = std::make_unique<ShmArena>(name, /*create=*/lr == 0, lr, L, chunk, kTimeout, false);
    } catch (const std::exception& e) {
      CHECK(false, "segment %s for %d ranks: %s", name.c_str(), L, e.what());
      return;
    }
    arenas[nd][0]->unlink();
  }
  std::vector<RailHub> hubs(L);
  std::vector<std::string> errors(S);
  std::vector<std::thread> threads;
  for (int nd = 0; nd < N; ++nd)
    for (int lr = 0; lr < L; ++lr)
      threads.emplace_back([&, nd, lr] {
        const int g = nd * L + lr;
        try {
          RailTransport rail(hubs[lr], nd, N);
          Tuned h(arenas[nd][lr].get(), &rail, N);
          int k = 0;
          for (Algorithm algo : {Algorithm::Ring, Algorithm::HalvingDoubling})
            for (int64_t shard : {0, 1, 5, 255, 256, 257, 5000, 20011})
              for (DType t : {DType::Float32, DType::Float64, DType::Bytes}) {
                const size_t es = dtype_size(t);
                const Algorithm a = halves_algorithm(algo, N);
                ++k;
                if (t != DType::Bytes) {  // reduce_scatter
                  Buf in(S * shard * es, kHalvesNullIfEmpty), out(shard * es, kHalvesNullIfEmpty);
                  for (int64_t i = 0; i < S * shard; ++i) put(t, in.data(), i, val(g, i, k));
                  const auto st = h.reduce_scatter(a, in.data(), out.data(), shard, t, (uint64_t)k);
                  const int64_t w = chunk / (S * (int64_t)es);
                  CHECK(st.chunks == (shard == 0 ? 1 : ceil_div(shard, w)), "halves %dx%d: reduce_scatter ran %lld chunks",
                        N, L, (long long)st.chunks);
                  for (int64_t e = 0; e < shard; ++e)
                    if (get(t, out.data(), e) != (double)sum_val(S, g * shard + e, k)) {
                      CHECK(false, "halves %dx%d rank %d call %d: reduce_scatter %s %s shard %lld element %lld = %g, want %lld",
                            N, L, g, k, algorithm_name(a), dtype_name(t), (long long)shard, (long long)e,
                            get(t, out.data(), e), (long long)sum_val(S, g * shard + e, k));
                      break;
                    }
                  for (int64_t i = 0; i < S * shard; ++i)
                    if (get(t, in.data(), i) != (double)val(g, i, k)) {
                      CHECK(false, "halves %dx%d rank %d: reduce_scatter changed its input at %lld", N, L, g, (long long)i);
                      break;
                    }
                }
                ++k;
                Buf in(shard * es, kHalvesNullIfEmpty), out(S * shard * es, kHalvesNullIfEmpty);
                for (int64_t i = 0; i < shard; ++i) put(t, in.data(), i, val(g, i, k));
                const auto st = h.allgather(a, in.data(), out.data(), shard, t, (uint64_t)k);
                const int64_t w = chunk / (N * (int64_t)es);
                CHECK(st.chunks == (shard == 0 ? 1 : ceil_div(shard, w)), "halves %dx%d: allgather ran %lld chunks", N, L,
                      (long long)st.chunks);
                bool ok = true;
                for (int r = 0; r < S && ok; ++r)
                  for (int64_t e = 0; e < shard && ok; ++e)
                    if (get(t, out.data(), r * shard + e) != (double)val(r, e, k)) {
                      CHECK(false, "halves %dx%d rank %d call %d: allgather %s %s shard %lld: rank %d's element %lld = %g",
                            N, L, g, k, algorithm_name(a), dtype_name(t), (long long)shard, r, (long long)e,
                            get(t, out.data(), r * shard + e));
                      ok = false;
                    }
              }
        } catch (const std::exception& e) {
          errors[g] = e.what();
        }
      });
  for (auto& t : threads) t.join();
  expect_no_errors(errors, N == 2 ? "halves between 2 nodes" : "halves between 3 nodes", L);
}

}  // namespace

int main(int argc, char** argv) {
  // Optional argument: how many back-to-back calls the mixed run makes per L (default 300).
  const int mixed_calls = argc > 1 ? std::atoi(argv[1]) : 300;
  const auto t0 = Clock::now();
  int groups = 0;
  for (int L : {2, 3, 4}) {
    latency_path(L);
    one_barrier_path(L);
    chunked_path(L);
    single_copy_path(L);
    halves(L, false);
    halves(L, true);
    arena_allreduce(L);
    mixed_run(L, mixed_calls, 1234 + L);
    groups += 6;
    for (Path p : kPaths) {
      for (int victim : {0, L - 1}) {
        mark_failed_test(L, p, victim, victim == 0 ? 20 : 0);
        ++groups;
      }
      disagree_test(L, p, L - 1);
      ++groups;
    }
  }
  for (int N : {2, 3})
    for (int L : {2, 3}) {
      halves_between_nodes(N, L);
      ++groups;
    }
  for (Path p : {Path::Latency, Path::Chunked, Path::ReduceScatter, Path::Arena}) {
    timeout_test(3, p);
    ++groups;
  }
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures.load());
    return 1;
  }
  std::printf("protocol tests passed: %d groups of local ranks as threads in %.1f s\n", groups, since(t0));
  return 0;
}
