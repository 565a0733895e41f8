// The core tests' one check: counts a failure and says where, from any thread.
#pragma once
#include <atomic>
#include <cstdio>
#include <mutex>

inline std::atomic<int> failures{0};
inline std::mutex check_log_mu;

#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      ++failures;                                               \
      std::lock_guard<std::mutex> check_g_(check_log_mu);       \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                        \
      std::fprintf(stderr, "\n");                               \
    }                                                           \
  } while (0)
