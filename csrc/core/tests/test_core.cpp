// C++ tests of the torch-free core: schedules (every element reduced exactly once, bytes sent),
// the executor over an in-memory threaded transport, and the sum kernels.
#include <cassert>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <chrono>
#include <string>
#include <tuple>

#include "../executor.h"
#include "../reduce.h"
#include "../schedule.h"
#include "check.h"

using namespace fastar;


// Walks all ranks' schedules in lockstep with buffered sends; each element carries the set of ranks
// whose contribution it holds. Checks no deadlock, no double counting, full coverage.
static void simulate(Algorithm algo, int p, int64_t count, std::vector<int64_t>* sent_bytes) {
  std::vector<std::vector<Step>> sched(p);
  for (int r = 0; r < p; ++r) sched[r] = make_schedule(algo, r, p, count);
  std::vector<std::vector<uint64_t>> buf(p, std::vector<uint64_t>(count));
  for (int r = 0; r < p; ++r)
    for (auto& v : buf[r]) v = uint64_t(1) << r;
  struct Msg { Range range; std::vector<uint64_t> data; };
  std::map<std::pair<int, int>, std::deque<Msg>> box;
  std::vector<size_t> pc(p, 0);
  std::vector<bool> sent(p, false);
  if (sent_bytes) sent_bytes->assign(p, 0);
  bool progress = true;
  while (progress) {
    progress = false;
    for (int r = 0; r < p; ++r) {
      if (pc[r] >= sched[r].size()) continue;
      const Step& st = sched[r][pc[r]];
      if (!sent[r]) {
        if (st.send_peer >= 0 && !st.send.empty()) {
          Msg m{st.send, std::vector<uint64_t>(buf[r].begin() + st.send.begin, buf[r].begin() + st.send.end)};
          box[{r, st.send_peer}].push_back(m);
          if (sent_bytes) (*sent_bytes)[r] += st.send.size();
        }
        sent[r] = true;
        progress = true;
      }
      if (st.recv_peer >= 0 && !st.recv.empty()) {
        auto& q = box[{st.recv_peer, r}];
        if (q.empty()) continue;
        Msg m = q.front();
        q.pop_front();
        CHECK(m.range.begin == st.recv.begin && m.range.end == st.recv.end, "p=%d rank %d range mismatch", p, r);
        for (int64_t i = 0; i < st.recv.size(); ++i) {
          uint64_t& d = buf[r][st.recv.begin + i];
          if (st.reduce) {
            CHECK((d & m.data[i]) == 0, "p=%d count=%lld rank %d element %lld reduced twice", p, (long long)count, r,
                  (long long)(st.recv.begin + i));
            d |= m.data[i];
          } else {
            d = m.data[i];
          }
        }
      }
      ++pc[r];
      sent[r] = false;
      progress = true;
    }
  }
  const uint64_t all = p == 64 ? ~uint64_t(0) : (uint64_t(1) << p) - 1;
  for (int r = 0; r < p; ++r) {
    CHECK(pc[r] == sched[r].size(), "%s p=%d count=%lld: rank %d stuck at step %zu (deadlock)", algorithm_name(algo), p,
          (long long)count, r, pc[r]);
    for (int64_t i = 0; i < count; ++i)
      if (buf[r][i] != all) {
        CHECK(false, "%s p=%d count=%lld: rank %d element %lld holds %llx", algorithm_name(algo), p, (long long)count, r,
              (long long)i, (unsigned long long)buf[r][i]);
        break;
      }
  }
  for (auto& kv : box) CHECK(kv.second.empty(), "p=%d: unreceived message", p);
}

// In-memory transport shared by threads: messages matched by (src, dst, tag).
struct Hub {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::tuple<int, int, uint32_t>, std::deque<std::vector<char>>> box;
};

class MemTransport : public Transport {
 public:
  MemTransport(Hub& hub, int rank, int size) : hub_(hub), rank_(rank), size_(size) {}
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
    Pending p = pending_[h];
    std::unique_lock<std::mutex> l(hub_.mu);
    auto key = std::make_tuple(p.peer, rank_, p.tag);
    if (!hub_.cv.wait_for(l, std::chrono::seconds(10), [&] { return !hub_.box[key].empty(); }))
      throw std::runtime_error("rank " + std::to_string(rank_) + ": timed out waiting for rank " + std::to_string(p.peer));
    auto& m = hub_.box[key].front();
    if (m.size() != p.bytes) throw std::runtime_error("size mismatch");
    std::memcpy(p.data, m.data(), p.bytes);
    hub_.box[key].pop_front();
  }

 private:
  struct Pending { int peer; void* data; size_t bytes; uint32_t tag; };
  Hub& hub_;
  int rank_, size_;
  std::vector<Pending> pending_;
};

static void executor_test(Algorithm algo, int p, int64_t count, int64_t chunk_bytes) {
  Hub hub;
  std::vector<std::vector<float>> bufs(p, std::vector<float>(count));
  for (int r = 0; r < p; ++r)
    for (int64_t i = 0; i < count; ++i) bufs[r][i] = (float)((i % 97) * (r + 1));
  std::vector<std::thread> th;
  for (int r = 0; r < p; ++r)
    th.emplace_back([&, r] {
      MemTransport tr(hub, r, p);
      ExecutorOptions o;
      o.chunk_bytes = chunk_bytes;
      Executor ex(o);
      try {
        ex.run(make_schedule(algo, r, p, count), tr, bufs[r].data(), count, DType::Float32);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> g(hub.mu);
        CHECK(false, "executor %s p=%d: %s", algorithm_name(algo), p, e.what());
      }
    });
  for (auto& t : th) t.join();
  const float ranks_sum = (float)(p * (p + 1) / 2);
  for (int r = 0; r < p; ++r) {
    for (int64_t i = 0; i < count; ++i)
      if (bufs[r][i] != (float)(i % 97) * ranks_sum) {
        CHECK(false, "executor %s p=%d count=%lld rank %d element %lld = %f", algorithm_name(algo), p, (long long)count,
              r, (long long)i, bufs[r][i]);
        break;
      }
    CHECK(std::memcmp(bufs[r].data(), bufs[0].data(), count * 4) == 0, "ranks differ");
  }
}

// The halves: reduce-scatter leaves rank r's shard summed over all ranks at shard r (and sends
// (p-1)/p of the buffer); allgather then spreads every rank's shard to all.
static void halves_test(Algorithm algo, int p, int64_t count) {
  Hub hub;
  std::vector<std::vector<float>> bufs(p, std::vector<float>(count));
  for (int r = 0; r < p; ++r)
    for (int64_t i = 0; i < count; ++i) bufs[r][i] = (float)((i % 97) * (r + 1));
  std::vector<int64_t> sent(p, 0);
  for (bool scatter : {true, false}) {
    std::vector<std::thread> th;
    for (int r = 0; r < p; ++r)
      th.emplace_back([&, r] {
        MemTransport tr(hub, r, p);
        Executor ex;
        try {
          auto steps = scatter ? reduce_scatter_schedule(algo, r, p, count) : allgather_schedule(algo, r, p, count);
          auto st = ex.run(steps, tr, bufs[r].data(), count, DType::Float32);
          if (scatter) sent[r] = st.bytes_sent;
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> g(hub.mu);
          CHECK(false, "halves %s p=%d: %s", algorithm_name(algo), p, e.what());
        }
      });
    for (auto& t : th) t.join();
    if (scatter)
      for (int r = 0; r < p; ++r) {
        const int64_t b = part_begin(count, p, r), e = part_begin(count, p, r + 1);
        for (int64_t i = b; i < e; ++i)
          if (bufs[r][i] != (float)(i % 97) * (float)(p * (p + 1) / 2)) {
            CHECK(false, "reduce_scatter %s p=%d count=%lld rank %d element %lld = %f", algorithm_name(algo), p,
                  (long long)count, r, (long long)i, bufs[r][i]);
            break;
          }
        if (count % p == 0)
          CHECK(sent[r] * p == (int64_t)(p - 1) * count * 4, "reduce_scatter %s p=%d sent %lld", algorithm_name(algo),
                p, (long long)sent[r]);
      }
  }
  for (int r = 0; r < p; ++r)
    for (int64_t i = 0; i < count; ++i)
      if (bufs[r][i] != (float)(i % 97) * (float)(p * (p + 1) / 2)) {
        CHECK(false, "allgather %s p=%d count=%lld rank %d element %lld = %f", algorithm_name(algo), p,
              (long long)count, r, (long long)i, bufs[r][i]);
        break;
      }
}

static void reduce_tests() {
  // half conversions round-trip every finite half exactly
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;  // nan payloads
    CHECK(float_to_half(half_to_float((uint16_t)h)) == h, "half round trip %x", h);
  }
  CHECK(float_to_half(1.0f + 1.0f / 2048) == 0x3c00, "round half to even (down)");
  CHECK(float_to_half(1.0f + 3.0f / 2048) == 0x3c02, "round half to even (up)");
  CHECK(float_to_bf16(1.0f) == 0x3f80, "bf16 one");
  CHECK(bf16_to_float(float_to_bf16(3.0f)) == 3.0f, "bf16 three");
  std::vector<uint16_t> a(100), b(100);
  for (int i = 0; i < 100; ++i) { a[i] = float_to_half((float)i); b[i] = float_to_half(2.0f * i); }
  reduce_sum(DType::Float16, a.data(), b.data(), 100);
  for (int i = 0; i < 100; ++i) CHECK(half_to_float(a[i]) == 3.0f * i, "fp16 sum %d", i);
  std::vector<double> x(3000, 1.0), y(3000, 2.0), z(3000, 4.0), out(3000);
  const void* srcs[] = {x.data(), y.data(), z.data()};
  reduce_sum_many(DType::Float64, out.data(), srcs, 3, 3000);
  for (double v : out) CHECK(v == 7.0, "sum_many");
}

int main() {
  reduce_tests();
  const int64_t counts[] = {0, 1, 2, 3, 7, 64, 1000, 1027};
  for (int p = 1; p <= 33; ++p)
    for (int64_t c : counts) {
      simulate(Algorithm::HalvingDoubling, p, c, nullptr);
      simulate(Algorithm::Ring, p, c, nullptr);
    }
  simulate(Algorithm::HalvingDoubling, 64, 640, nullptr);
  // Bytes sent: 2 (p-1)/p of the buffer per rank, for powers of two (and for ring, any p).
  for (int p : {2, 4, 8, 16, 32}) {
    const int64_t count = 64 * p;
    for (Algorithm a : {Algorithm::HalvingDoubling, Algorithm::Ring}) {
      std::vector<int64_t> sent;
      simulate(a, p, count, &sent);
      for (int r = 0; r < p; ++r)
        CHECK(sent[r] * p == 2 * (p - 1) * count, "%s p=%d rank %d sent %lld of %lld", algorithm_name(a), p, r,
              (long long)sent[r], (long long)count);
      CHECK((int)make_schedule(a, 0, p, count).size() == (a == Algorithm::Ring ? 2 * (p - 1) : 2 * __builtin_ctz(p)),
            "%s p=%d step count", algorithm_name(a), p);
    }
  }
  for (int p : {1, 2, 3, 5, 6, 8, 12})
    for (int64_t c : {0, 1, 5, 1000, 100003}) {
      executor_test(Algorithm::HalvingDoubling, p, c, 4096);
      executor_test(Algorithm::Ring, p, c, 1 << 20);
    }
  for (int p : {1, 2, 3, 4, 5, 8, 16})
    for (int64_t c : {0, 1, 5, 64, 1000, 4099}) {
      halves_test(Algorithm::HalvingDoubling, p, c);
      halves_test(Algorithm::Ring, p, c);
    }
  CHECK(halves_algorithm(Algorithm::HalvingDoubling, 6) == Algorithm::Ring, "halves fall back to ring");
  CHECK(halves_algorithm(Algorithm::HalvingDoubling, 8) == Algorithm::HalvingDoubling, "halves keep hd");
  if (failures) {
    std::fprintf(stderr, "%d failures\n", failures.load());
    return 1;
  }
  std::printf("core tests passed\n");
  return 0;
}
