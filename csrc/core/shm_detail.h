// Internals of the node's shared-memory arena (shm.h), shared by its three files: shm.cpp (the
// segment: creation, checks, layout, liveness), shm_flags.cpp (flags, waits, failure marking) and
// shm_desc.cpp (the call descriptors ranks check).
#pragma once
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "shm.h"

namespace fastar {
namespace shm_detail {

constexpr size_t kCtlBytes = 4096;  // per local rank
constexpr size_t kLine = 64;
constexpr size_t kErrOffset = 1024;  // in a rank's control page: its error text, NUL-terminated
constexpr uint64_t kMagic = 0x66617374617231ull;  // "fastar1"
// A small region: the descriptor's line, a flag line per block, then the data. A flag line holds
// the generation (u32), block 0's descriptor check (u32), and the sleepers count (u32).
constexpr size_t kSmallRegion = (1 + ShmArena::kSmallBlocks) * kLine + ShmArena::kSmallBytes;
// A small flag line: the flag (one 64-bit atomic: the generation in its low word, where a futex
// sleeps, so the layout must be little-endian; block 0's descriptor check in its high word), then
// the sleepers count at byte 8.
constexpr size_t kSmallSleepersOffset = 8;
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "a small flag's futex word is its low half");
static_assert(sizeof(std::atomic<uint64_t>) == 8 && sizeof(std::atomic<uint32_t>) == 4, "lock-free flag words");
static_assert(kDescWords * sizeof(uint64_t) <= kLine, "a descriptor fits its line");
// A control page's lines: 0 the header, 1-3 the flags (ShmFlag), 8-9 the descriptors (shm_desc.cpp),
// 10 the single-copy probe's state word (then its sleepers word), 11 the single-copy addresses.
constexpr size_t kProbeLine = 10;
constexpr size_t kAddressLine = 11;
struct Addresses {
  std::atomic<uint64_t> probe;  // a word in this process that holds kMagic (probe_single_copy)
  std::atomic<uint64_t> call;   // the buffer of this rank's current single-copy call
};
static_assert(sizeof(Addresses) <= kLine, "the addresses fit a line");

struct Header {
  std::atomic<uint64_t> magic;
  std::atomic<int32_t> pid;
  std::atomic<int32_t> failed;
  std::atomic<uint64_t> start_ticks;  // the process's start time (/proc/<pid>/stat), against pid reuse
  std::atomic<uint64_t> pid_ns;       // inode of its pid namespace: pids of another one cannot be checked
};
static_assert(sizeof(Header) <= kLine, "header fits a line");

// Alive unless this host's /proc says that the process a header describes is gone (shm.cpp).
bool peer_alive(int pid, uint64_t start, uint64_t ns);

// The futex word of a flag: the flag itself, or the low half of a 64-bit one.
void futex_wait(const void* addr, uint32_t val, long usec);
void futex_wake(const void* addr);

// A flag's generation, read at the flag's own width.
inline uint32_t gen_of(const std::atomic<uint32_t>* a, std::memory_order o) { return a->load(o); }
inline uint32_t gen_of(const std::atomic<uint64_t>* a, std::memory_order o) { return (uint32_t)a->load(o); }

inline bool reached(uint32_t v, uint32_t gen) { return (int32_t)(v - gen) >= 0; }

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

}  // namespace shm_detail
}  // namespace fastar
