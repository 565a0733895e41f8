// The call descriptors local ranks check (call_check.h): on the control pages (by the parity of
// the call's first generation) and in the latency path's small regions.
#include <stdexcept>
#include <string>

#include "shm_detail.h"

namespace fastar {

using namespace shm_detail;

// Two descriptor slots by parity of the collective's first generation: a peer can be at most one
// collective ahead (it cannot pass the next copy-in barrier without us), so it never overwrites
// the slot we are about to check.
std::atomic<uint64_t>* ShmArena::desc_slot(int rank, uint32_t gen) const {
  return reinterpret_cast<std::atomic<uint64_t>*>(base_ + kCtlBytes * rank + kLine * (8 + (gen & 1)));
}

void ShmArena::publish_desc(const uint64_t desc[kDescWords], uint32_t gen) {
  auto* d = desc_slot(local_rank_, gen);
  for (int i = 0; i < kDescWords; ++i) d[i].store(desc[i], std::memory_order_relaxed);
}

void ShmArena::check_desc(int rank, const uint64_t desc[kDescWords], uint32_t gen, const char* what) {
  auto* d = desc_slot(rank, gen);
  for (int i = 0; i < kDescWords; ++i)
    if (d[i].load(std::memory_order_relaxed) != desc[i]) throw_mismatch(rank, desc, d, what);
}

void ShmArena::throw_mismatch(int rank, const uint64_t mine[kDescWords], const std::atomic<uint64_t>* theirs,
                              const char* what) const {
  uint64_t t[kDescWords];
  for (int i = 0; i < kDescWords; ++i) t[i] = theirs[i].load(std::memory_order_relaxed);
  const std::string m = desc_mismatch(mine, t, what, who(local_rank_), who(rank));
  if (!m.empty()) throw std::runtime_error(m);
  throw std::runtime_error("fastar: " + who(rank) + " runs the staged path for " + std::string(what) + " while " +
                           who(local_rank_) + " runs the latency path: the ranks disagree on the latency path's "
                           "threshold (fastar.policy.Tuning.small_bytes)");
}

std::atomic<uint64_t>* ShmArena::small_desc(int rank, int buf) const {
  return reinterpret_cast<std::atomic<uint64_t>*>(small_region(rank, buf));
}

void ShmArena::small_publish_desc(int buf, const uint64_t desc[kDescWords]) {
  auto* d = small_desc(local_rank_, buf);
  for (int i = 0; i < kDescWords; ++i) d[i].store(desc[i], std::memory_order_relaxed);
}

void ShmArena::small_check_desc(int rank, int buf, const uint64_t desc[kDescWords], uint32_t check,
                                const char* what) {
  const uint64_t w = small_flag(rank, 0, buf)->load(std::memory_order_acquire);
  if ((uint32_t)(w >> 32) == check) return;
  throw_mismatch(rank, desc, small_desc(rank, buf), what);  // the descriptor was stored before the flag
}

void ShmArena::check_peers(const uint64_t desc[kDescWords], uint32_t gen, const char* what) {
  for (int r = 0; r < local_size_; ++r)
    if (r != local_rank_) check_desc(r, desc, gen, what);
}

}  // namespace fastar
