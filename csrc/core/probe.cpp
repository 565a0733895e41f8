// A probe of the host for the benchmarks, not used by the library: the cost of passing a cache line
// between two cores, which decides what every flag and slot of the arena costs.
#include "probe.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace fastar {
namespace {

inline void relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

double core_round_trip_ns(int cpu_a, int cpu_b, int iters) {
  alignas(64) static std::atomic<int> ping;
  alignas(64) static std::atomic<int> pong;
  auto pin = [](int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
  };
  std::atomic<bool> ok{true};
  double ns = -1;
  ping = 0;
  pong = 0;
  std::thread other([&] {
    if (!pin(cpu_b)) {
      ok = false;
      return;
    }
    for (int i = 1; i <= iters; ++i) {
      int v;
      while ((v = ping.load(std::memory_order_acquire)) != i && v >= 0) relax();
      if (v < 0) return;
      pong.store(i, std::memory_order_release);
    }
  });
  std::thread self([&] {
    if (!pin(cpu_a) || !ok) {
      ok = false;
      ping.store(-1);
      return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 1; i <= iters; ++i) {
      ping.store(i, std::memory_order_release);
      while (pong.load(std::memory_order_acquire) != i) {
        if (!ok.load(std::memory_order_relaxed)) return;  // the other thread could not be pinned
        relax();
      }
    }
    ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / iters;
  });
  self.join();
  other.join();
  return ok ? ns : -1;
}

}  // namespace fastar
