// Regression tests of the defects of issue 23 that a multi-process test cannot force: they drive
// the shared-memory protocols and the header exchange directly, with local ranks as threads of one
// process (each with its own ShmArena over one segment). `make sanitize` runs them under ASan/UBSan
// and TSan too.
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "../call_check.h"
#include "../failure.h"
#include "../hierarchical.h"
#include "../shm.h"
#include "../work_queue.h"
#include "check.h"
#include "test_plan.h"

using namespace fastar;


static double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// L local ranks over one fresh segment: arenas[r] is local rank r's view.
struct Node {
  std::vector<std::unique_ptr<ShmArena>> arenas;
  std::vector<std::unique_ptr<Tuned>> hier;
  Node(int L, int64_t chunk, double timeout_s) {
    static int n = 0;
    const std::string name = "/fastar_test_defects_" + std::to_string(::getpid()) + "_" + std::to_string(++n);
    for (int r = 0; r < L; ++r) {
      arenas.push_back(std::make_unique<ShmArena>(name, r == 0, r, L, chunk, timeout_s));
      arenas.back()->set_first_global_rank(0);
    }
    arenas[0]->unlink();
    for (int r = 0; r < L; ++r) hier.push_back(std::make_unique<Tuned>(arenas[r].get(), nullptr, 1));
  }
};

// Every rank allreduces `count` floats (rank r holds r + 1 + i % 7); per rank: "" when the sum is
// exact, "wrong sum" when it is not, or the error it raised.
static std::vector<std::string> allreduce_all(Node& node, int64_t count, uint64_t seq) {
  const int L = (int)node.arenas.size();
  std::vector<std::string> out(L);
  std::vector<std::thread> th;
  for (int r = 0; r < L; ++r)
    th.emplace_back([&, r] {
      std::vector<float> v(count);
      for (int64_t i = 0; i < count; ++i) v[i] = float(r + 1 + i % 7);
      try {
        node.hier[r]->allreduce(Hierarchy::Leader, Algorithm::HalvingDoubling, v.data(), count, DType::Float32, seq);
        for (int64_t i = 0; i < count; ++i) {
          const float want = float(L * (L + 1) / 2 + L * (i % 7));
          if (v[i] != want) {
            out[r] = "wrong sum";
            break;
          }
        }
      } catch (const std::exception& e) {
        out[r] = e.what();
        node.arenas[r]->mark_failed(e.what());
      }
    });
  for (auto& t : th) t.join();
  return out;
}

static bool all_raise(const std::vector<std::string>& res, const char* needle) {
  for (const auto& s : res)
    if (s.empty() || s == "wrong sum" || s.find(needle) == std::string::npos) return false;
  return true;
}

static std::string show(const std::vector<std::string>& res) {
  std::string s;
  for (size_t r = 0; r < res.size(); ++r)
    s += "\n  rank " + std::to_string(r) + ": " + (res[r].empty() ? std::string("exact") : res[r].substr(0, 200));
  return s;
}

// Defect 3: ranks whose tuning differs must raise on every rank, never return a wrong sum.
static void test_tuning_disagreement() {
  {  // the one-node pipeline's chunk: 256 KiB on rank 0, 512 KiB on rank 1; a 512 KiB buffer
    Node node(2, 1 << 20, 3.0);
    node.hier[0]->local_chunk_bytes = 256 << 10;
    const auto res = allreduce_all(node, (512 << 10) / 4, 1);
    CHECK(all_raise(res, "chunk"), "different local chunks: %s", show(res).c_str());
  }
  {  // the latency-path threshold: 256 KiB on rank 0 (one-barrier slots), 64 KiB on rank 1 (chunked)
    Node node(2, 1 << 20, 3.0);
    node.hier[0]->small_bytes = 256 << 10;
    const auto res = allreduce_all(node, (128 << 10) / 4, 1);
    CHECK(all_raise(res, "protocol"), "different small thresholds: %s", show(res).c_str());
  }
  {  // latency blocks on rank 0, the staged path on rank 1, three ranks
    Node node(3, 1 << 20, 3.0);
    node.hier[1]->small_bytes = 1024;
    const auto res = allreduce_all(node, 4096 / 4, 1);
    for (int r = 0; r < 3; ++r) CHECK(!res[r].empty() && res[r] != "wrong sum", "rank %d: %s", r, show(res).c_str());
  }
  {  // the same settings: every call exact, through every protocol, many times
    Node node(3, 1 << 20, 10.0);
    for (int r = 0; r < 3; ++r) node.hier[r]->local_chunk_bytes = 64 << 10;
    uint64_t seq = 0;
    for (int64_t count : {0, 1, 1000, 16384, 16385, 40000, 300000, 7})
      for (int rep = 0; rep < 3; ++rep) {
        const auto res = allreduce_all(node, count, ++seq);
        for (int r = 0; r < 3; ++r) CHECK(res[r].empty(), "count %lld: %s", (long long)count, show(res).c_str());
      }
  }
}

// Defect 8: the latency path's check word is exact in count, dtype and route.
static void test_check_word_exact() {
  uint64_t a[kDescWords] = {5, 0, 0, 16, (uint64_t)Protocol::Latency, 4096};
  for (uint64_t dt = 0; dt < 4; ++dt)
    for (uint64_t count = 0; count <= 65536; count += (count < 300 ? 1 : 997)) {
      uint64_t b[kDescWords];
      std::memcpy(b, a, sizeof a);
      a[kCount] = count;
      a[kDType] = dt;
      for (uint64_t other : {count + 1, count ^ 0x100, count + 65536 / 2}) {
        std::memcpy(b, a, sizeof a);
        b[kCount] = other & 0x1FFFF;
        if (b[kCount] != a[kCount])
          CHECK(latency_check_word(a) != latency_check_word(b), "count %llu vs %llu", (unsigned long long)count,
                (unsigned long long)b[kCount]);
      }
      std::memcpy(b, a, sizeof a);
      b[kDType] = (dt + 1) % 4;
      CHECK(latency_check_word(a) != latency_check_word(b), "dtype");
      std::memcpy(b, a, sizeof a);
      b[kRoute] = 2 * 16 + 1;
      CHECK(latency_check_word(a) != latency_check_word(b), "route");
    }
}

// Defect 4: 32-bit generations. A flag that is not advanced every generation (Reduced here, and a
// latency block) must not count as reached 2^31 generations later.
static void test_generation_wraparound() {
  Node node(2, 64 << 10, 0.3);
  ShmArena& a = *node.arenas[0];
  ShmArena& b = *node.arenas[1];
  const uint32_t old = 5;
  a.signal(ShmFlag::Reduced, old);
  a.small_signal(3, old & 1, old, 0);
  // Rank 0 goes on with calls that never touch those flags (latency calls of one block, say).
  uint32_t g = old + 1;
  for (; g - old < (1u << 31) + (1u << 27); g += 1u << 26) a.begin_call(g);
  a.begin_call(g);
  const uint32_t now = g + 2;  // g + 2: the same buffer parity as `old` when g - old is even
  bool raised = false;
  try {
    b.wait_rank(ShmFlag::Reduced, 0, now, "test: Reduced long after it was raised");
  } catch (const std::exception&) {
    raised = true;
  }
  CHECK(raised, "a Reduced flag %u generations old counted as reached", now - old);
  raised = false;
  try {
    b.small_wait(0, 3, now & 1, now, "test: a block long after it was raised");
  } catch (const std::exception&) {
    raised = true;
  }
  CHECK(raised, "a latency block flag %u generations old counted as reached", now - old);
  // Raised for real, they are reached.
  a.signal(ShmFlag::Reduced, now);
  b.wait_rank(ShmFlag::Reduced, 0, now, "test: Reduced raised");
}

// Defect 1: a header exchange whose wait fails leaves receives posted; a late peer then writes into
// its buffers (and the transport still reads the sends). Under ASan this fails when the buffers
// were freed with the call's frame.
class LateTransport : public Transport {
 public:
  int rank() const override { return 0; }
  int size() const override { return 3; }
  Handle isend(int, const void* d, size_t n, uint32_t) override {
    posts.push_back({const_cast<void*>(d), n, true});
    return (Handle)posts.size() - 1;
  }
  Handle irecv(int, void* d, size_t n, uint32_t) override {
    posts.push_back({d, n, false});
    return (Handle)posts.size() - 1;
  }
  void wait(Handle h) override {
    if (!posts[h].send) throw std::runtime_error("test: the peer is slower than the timeout");
  }
  struct Post {
    void* data;
    size_t bytes;
    bool send;
  };
  std::vector<Post> posts;
};

static void test_header_exchange_buffers_outlive_a_failure() {
  LateTransport tr;
  const uint64_t mine[kDescWords] = {1, 2, 3, 4, 5, 6};
  bool raised = false;
  {
    HeaderExchange hx;
    try {
      hx.run(tr, {1, 2}, mine, 7, "an allreduce", [](int p) { return "rank " + std::to_string(p); });
    } catch (const std::runtime_error&) {
      raised = true;
    }
    // The exchange object is reused by its owner for the next call: new buffers, not the posted ones.
    LateTransport tr2;
    try {
      hx.run(tr2, {1}, mine, 8, "an allreduce", [](int p) { return "rank " + std::to_string(p); });
    } catch (const std::runtime_error&) {
    }
    for (const auto& p2 : tr2.posts)
      for (const auto& p : tr.posts) CHECK(p2.data != p.data, "a posted buffer was handed out again");
  }
  CHECK(raised, "the failed wait did not raise");
  // The late peer: every receive lands, every send is read, after the call and its owner are gone.
  for (const auto& p : tr.posts) {
    if (p.send) {
      uint64_t sent[kDescWords];
      std::memcpy(sent, p.data, sizeof sent);
      CHECK(std::memcmp(sent, mine, sizeof sent) == 0, "the sent header changed");
    } else {
      std::memset(p.data, 0xAB, p.bytes);
    }
  }
}

// Defect 6: the first failure marks every arena the communicator drives, so that a local peer
// waiting in any of them raises at once with the first rank's reason, not after its timeout.
static void test_failure_marks_every_arena() {
  Node staged(2, 64 << 10, 30.0);
  Node buckets(2, 64 << 10, 30.0);
  auto fs = std::make_shared<FailureState>();
  // Rank 0's communicator drives both arenas (shared ownership as the communicator and wrap hold them).
  std::shared_ptr<ShmArena> a0(staged.arenas[0].get(), [](ShmArena*) {});
  std::shared_ptr<ShmArena> b0(buckets.arenas[0].get(), [](ShmArena*) {});
  fs->watch(a0);
  fs->watch(b0);
  std::string err;
  const auto t0 = std::chrono::steady_clock::now();
  std::thread peer([&] {
    try {
      buckets.arenas[1]->wait_rank(ShmFlag::In, 0, 1, "bucket ready on every local rank");
    } catch (const std::exception& e) {
      err = e.what();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  fs->fail(std::make_exception_ptr(std::runtime_error("test: the first error on rank 0")));
  peer.join();
  CHECK(err.find("the first error on rank 0") != std::string::npos, "peer's error: %s", err.c_str());
  CHECK(since(t0) < 10, "the peer waited %.1f s", since(t0));
  // An arena watched after the failure is marked at once.
  Node late(2, 64 << 10, 30.0);
  std::shared_ptr<ShmArena> l0(late.arenas[0].get(), [](ShmArena*) {});
  fs->watch(l0);
  err.clear();
  try {
    late.arenas[1]->wait_rank(ShmFlag::In, 0, 1, "test");
  } catch (const std::exception& e) {
    err = e.what();
  }
  CHECK(err.find("the first error on rank 0") != std::string::npos, "late arena: %s", err.c_str());
}

// Defect 5: a shared timeout lowered while a wait is in progress ends that wait within the new one.
static void test_timeout_reaches_a_wait_in_progress() {
  Node node(2, 64 << 10, 120.0);
  auto timeout = std::make_shared<Timeout>(120.0);
  node.arenas[1]->share_timeout(timeout);
  std::string err;
  const auto t0 = std::chrono::steady_clock::now();
  std::thread waiter([&] {
    try {
      node.arenas[1]->wait_rank(ShmFlag::In, 0, 1, "test: a stuck peer");
    } catch (const std::exception& e) {
      err = e.what();
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  timeout->set(1.0);
  waiter.join();
  CHECK(err.find("timed out") != std::string::npos, "error: %s", err.c_str());
  CHECK(since(t0) < 10, "the wait took %.1f s after the timeout became 1 s", since(t0));
  bool bad = false;
  for (double s : {0.0, -1.0, 1e300, 0.0 / 0.0}) {
    try {
      timeout->set(s);
      bad = true;
    } catch (const std::invalid_argument&) {
    }
  }
  CHECK(!bad, "an invalid timeout was accepted");
}

// Issue 24: one deadline per operation. Inside an operation (OpScope), a wait that follows a
// timed-out one has no time left: it raises at its first check, not a whole timeout later. And
// the operation's first failure stops a wait on a peer that never fails itself.
static void test_operation_deadline_spans_its_waits() {
  Node node(2, 64 << 10, 2.0);
  auto timeout = std::make_shared<Timeout>(2.0);
  auto fs = std::make_shared<FailureState>();
  node.arenas[1]->share_timeout(timeout);
  std::string err1, err2;
  double first = 0, second = 0;
  {
    OpScope op(timeout.get(), fs.get());
    auto t0 = std::chrono::steady_clock::now();
    try {
      node.arenas[1]->wait_rank(ShmFlag::In, 0, 1, "test: the first wait");
    } catch (const std::exception& e) {
      err1 = e.what();
    }
    first = since(t0);
    t0 = std::chrono::steady_clock::now();
    try {
      node.arenas[1]->wait_rank(ShmFlag::Reduced, 0, 1, "test: the second wait");
    } catch (const std::exception& e) {
      err2 = e.what();
    }
    second = since(t0);
  }
  CHECK(err1.find("timed out after 2 s") != std::string::npos, "first wait: %s", err1.c_str());
  CHECK(err2.find("timed out after 2 s") != std::string::npos, "second wait: %s", err2.c_str());
  CHECK(first >= 1.9, "the first wait raised after %.2f s, before the 2 s timeout", first);
  // The deadline passed during the first wait: well under a timeout (about one 100 ms check).
  CHECK(second < 1.0, "the second wait of the operation took %.2f s after the deadline had passed", second);
  CHECK(OpContext::current() == nullptr, "the operation outlived its scope");

  // The operation's failure state fails (e.g. a remote peer's message): the wait stops with it.
  Node node2(2, 64 << 10, 30.0);
  auto timeout2 = std::make_shared<Timeout>(30.0);
  auto fs2 = std::make_shared<FailureState>();
  node2.arenas[1]->share_timeout(timeout2);
  std::string err;
  const auto t0 = std::chrono::steady_clock::now();
  std::thread failer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    fs2->fail(std::make_exception_ptr(std::runtime_error("test: rank 5 failed first")));
  });
  {
    OpScope op(timeout2.get(), fs2.get());
    try {
      node2.arenas[1]->wait_rank(ShmFlag::In, 0, 1, "test: a peer that never fails itself");
    } catch (const std::exception& e) {
      err = e.what();
    }
  }
  failer.join();
  CHECK(err.find("stopped waiting") != std::string::npos && err.find("rank 5 failed first") != std::string::npos,
        "error: %s", err.c_str());
  CHECK(since(t0) < 10, "the wait took %.1f s after the failure", since(t0));
}

// The work queue: submission order, the inline gate, one sticky error.
static void test_work_queue_order_gate_and_sticky_error() {
  auto fs = std::make_shared<FailureState>();
  WorkQueue q(fs);
  std::vector<int> ran;
  std::vector<std::string> errs(4);
  std::mutex mu;
  std::atomic<bool> go{false};
  q.push([&](std::exception_ptr) {
    while (!go) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::lock_guard<std::mutex> g(mu);
    ran.push_back(0);
  });
  CHECK(!q.enter_inline(), "an inline call entered while work was queued");
  q.push([&](std::exception_ptr) {
    {
      std::lock_guard<std::mutex> g(mu);
      ran.push_back(1);
    }
    throw std::runtime_error("test: task 1 fails");
  });
  for (int i = 2; i < 4; ++i)
    q.push([&, i](std::exception_ptr e) {
      std::lock_guard<std::mutex> g(mu);
      ran.push_back(i);
      if (e) errs[i] = what_of(e);
    });
  go = true;
  for (int i = 0; i < 200 && !fs->failed(); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  q.close();
  CHECK((ran == std::vector<int>{0, 1, 2, 3}), "tasks ran out of order");
  CHECK(errs[2].find("task 1 fails") != std::string::npos && errs[3].find("task 1 fails") != std::string::npos,
        "queued tasks did not get the first error: '%s' '%s'", errs[2].c_str(), errs[3].c_str());
  bool threw = false;
  try {
    q.enter_inline();
  } catch (const std::exception&) {
    threw = true;
  }
  CHECK(threw, "a closed queue let an inline call in");
  threw = false;
  try {
    q.push([](std::exception_ptr) {});
  } catch (const std::exception&) {
    threw = true;
  }
  CHECK(threw, "a closed queue took a task");
}

int main() {
  test_work_queue_order_gate_and_sticky_error();
  test_check_word_exact();
  test_header_exchange_buffers_outlive_a_failure();
  test_generation_wraparound();
  test_failure_marks_every_arena();
  test_timeout_reaches_a_wait_in_progress();
  test_operation_deadline_spans_its_waits();
  test_tuning_disagreement();
  if (failures) std::fprintf(stderr, "%d failure(s)\n", failures.load());
  else std::printf("test_defects: all passed\n");
  return failures ? 1 : 0;
}
