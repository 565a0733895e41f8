// Flags and waits: generation counters on the control pages and the latency path's block flags,
// the one wait (spin, yield, futex), failure marking, and the refresh that keeps 32-bit
// generations comparable; the single-copy protocol's probe and reads of a peer's memory.
#include <sched.h>
#include <sys/uio.h>

#include <cerrno>

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>

#include "shm_detail.h"

namespace fastar {

using namespace shm_detail;

void shm_detail::futex_wait(const void* addr, uint32_t val, long usec) {
  struct timespec ts{usec / 1000000, (usec % 1000000) * 1000};
  syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, nullptr, 0);
}

void shm_detail::futex_wake(const void* addr) { syscall(SYS_futex, addr, FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0); }

std::atomic<uint32_t>* ShmArena::flag(int rank, ShmFlag f) const {
  return reinterpret_cast<std::atomic<uint32_t>*>(base_ + kCtlBytes * rank + kLine * (1 + (int)f));
}

// On the flag's own cache line, next to it: how many peers sleep on the flag in a futex.
std::atomic<uint32_t>* ShmArena::sleepers(int rank, ShmFlag f) const { return flag(rank, f) + 1; }

int64_t ShmArena::default_spin_ns(int local_size) {
  // A core per local rank: spin up to 50 us before yielding (a peer a little behind is then met
  // without a system call); more local ranks than cores: 2 us, then the core goes to the others.
  cpu_set_t set;
  CPU_ZERO(&set);
  const int cores = ::sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  return local_size <= cores ? 50000 : 2000;
}

void ShmArena::signal(ShmFlag f, uint32_t gen) {
  auto* a = flag(local_rank_, f);
  a->store(gen, std::memory_order_seq_cst);
  // A futex wake is a system call: only when a peer went to sleep on this flag (it counts itself
  // in the flag's sleepers word, then re-checks the flag, both seq_cst: it sees gen or is woken).
  if (sleepers(local_rank_, f)->load(std::memory_order_seq_cst) != 0) futex_wake(a);
}

void ShmArena::wait_rank(ShmFlag f, int rank, uint32_t gen, const char* what) {
  auto* a = flag(rank, f);
  if (reached(a->load(std::memory_order_acquire), gen)) return;
  wait_word(a, a + 1, rank, gen, what, false);
}

template <class Word>
void ShmArena::wait_word(Word* a, std::atomic<uint32_t>* sl, int rank, uint32_t gen, const char* what, bool small) {
  // Spin first: with a core per local rank the peer is usually well under a microsecond away, and
  // a yield or futex costs more than that. Oversubscribed (more local ranks than cores), spin_ns_
  // is short, so that the core goes to the rank we wait for.
  const auto start = std::chrono::steady_clock::now();
  for (uint32_t i = 1;; ++i) {
    cpu_relax();
    if (reached(gen_of(a, std::memory_order_acquire), gen)) return;
    if ((i & 63) == 0 && std::chrono::steady_clock::now() - start > std::chrono::nanoseconds(spin_ns_)) break;
  }
  auto last_check = start;
  // The operation this wait belongs to: its deadline (not the timeout from this wait's start), and
  // its communicator's failure (a first failure elsewhere, e.g. a remote peer's, stops this wait).
  OpContext* op = OpContext::current();
  int yields = 0;
  while (true) {
    uint32_t v = gen_of(a, std::memory_order_acquire);
    if (reached(v, gen)) return;
    if (yields < 64) {  // give the core to the rank we wait for (ranks may outnumber cores)
      ++yields;
      sched_yield();
    } else {
      sl->fetch_add(1, std::memory_order_seq_cst);
      v = gen_of(a, std::memory_order_seq_cst);
      if (!reached(v, gen)) futex_wait(a, v, 2000);
      sl->fetch_sub(1, std::memory_order_seq_cst);
    }
    const auto now = std::chrono::steady_clock::now();
    auto* hdr = reinterpret_cast<Header*>(base_ + kCtlBytes * rank);
    // Before a verdict on the peer, its flag once more: a peer that raised it and then failed or
    // exited while this rank slept (a loaded host deschedules for tens of ms) did its part.
    if (hdr->failed.load(std::memory_order_acquire)) {
      if (reached(gen_of(a, std::memory_order_seq_cst), gen)) return;
      const char* err = base_ + kCtlBytes * rank + kErrOffset;
      throw std::runtime_error("fastar shm: " + who(rank) + " failed while " + who(local_rank_) + " waited for it (" +
                               what + "); its error: " + (err[0] ? std::string(err) : std::string("(none given)")));
    }
    if (op && op->failure && op->failure->failed()) {
      if (reached(gen_of(a, std::memory_order_seq_cst), gen)) return;
      const std::exception_ptr cause = op->failure->cause();
      throw std::runtime_error("fastar shm: " + who(local_rank_) + " stopped waiting for " + who(rank) + " (" + what +
                               "): " + (cause ? what_of(cause) : std::string("the communicator failed")));
    }
    if (small && reached(flag(rank, ShmFlag::In)->load(std::memory_order_seq_cst), gen)) {
      // A peer on the latency path raises In after all its blocks: then this block is in too.
      if (reached(gen_of(a, std::memory_order_seq_cst), gen)) return;
      // Otherwise it runs the staged path for this call: its descriptor on the control page says why.
      uint64_t mine[kDescWords];
      for (int i = 0; i < kDescWords; ++i) mine[i] = small_desc(local_rank_, gen & 1)[i].load(std::memory_order_relaxed);
      throw_mismatch(rank, mine, desc_slot(rank, gen), what);
    }
    if (now - last_check > std::chrono::milliseconds(100)) {
      last_check = now;
      const int pid = hdr->pid.load();
      if (!peer_alive(pid, hdr->start_ticks.load(), hdr->pid_ns.load())) {
        if (reached(gen_of(a, std::memory_order_seq_cst), gen)) return;
        throw std::runtime_error("fastar shm: " + who(rank) + " (pid " + std::to_string(pid) + ") exited while " +
                                 who(local_rank_) + " waited for it (" + what + ")");
      }
      const double waited = op ? op->elapsed(now, start) : std::chrono::duration<double>(now - start).count();
      if (waited > timeout_s()) {
        if (reached(gen_of(a, std::memory_order_seq_cst), gen)) return;
        throw std::runtime_error("fastar shm: timed out after " + std::to_string((int)timeout_s()) + " s: " +
                                 who(local_rank_) + " waited for " + who(rank) + " (" + what +
                                 "); that rank is stuck, dead, or called a different collective");
      }
    }
  }
}

void ShmArena::wait_all(ShmFlag f, uint32_t gen, const char* what) {
  for (int r = 0; r < local_size_; ++r)
    if (r != local_rank_) wait_rank(f, r, gen, what);
}

void ShmArena::mark_failed(const std::string& why) {
  auto* hdr = reinterpret_cast<Header*>(base_ + kCtlBytes * local_rank_);
  if (!hdr->failed.load()) {  // the first error is the cause; later ones are its echoes
    char* err = base_ + kCtlBytes * local_rank_ + kErrOffset;
    const size_t n = std::min(why.size(), kCtlBytes - kErrOffset - 1);
    std::memcpy(err, why.data(), n);
    err[n] = '\0';
  }
  hdr->failed.store(1, std::memory_order_release);
  for (int f = 0; f < (int)ShmFlag::Count; ++f) futex_wake(flag(local_rank_, (ShmFlag)f));
  if (small_base_)
    for (int buf = 0; buf < 2; ++buf)
      for (int b = 0; b < kSmallBlocks; ++b)
        if (small_sleepers(local_rank_, b, buf)->load() != 0) futex_wake(small_flag(local_rank_, b, buf));
}

std::atomic<uint64_t>* ShmArena::small_flag(int rank, int block, int buf) const {
  return reinterpret_cast<std::atomic<uint64_t>*>(small_region(rank, buf) + (size_t)(1 + block) * kLine);
}

std::atomic<uint32_t>* ShmArena::small_sleepers(int rank, int block, int buf) const {
  return reinterpret_cast<std::atomic<uint32_t>*>(small_region(rank, buf) + (size_t)(1 + block) * kLine +
                                                  kSmallSleepersOffset);
}

void ShmArena::small_signal(int block, int buf, uint32_t gen, uint32_t check) {
  // After the block's bytes; block 0: generation and check in one store, one transfer of the line
  // its peers poll.
  small_flag(local_rank_, block, buf)->store((block == 0 ? (uint64_t)check << 32 : 0) | gen, std::memory_order_release);
  if (block == 0) last_small_gen_ = gen;
}

void ShmArena::raise_in(uint32_t gen) { flag(local_rank_, ShmFlag::In)->store(gen, std::memory_order_release); }

void ShmArena::small_wake(int nblocks, int buf) {
  // The flags' stores before the sleepers' loads (a waiter counts itself in, seq_cst, then re-checks
  // its flag): it sees the flag or is woken here.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  for (int b = 0; b < nblocks; ++b) {
    if (small_sleepers(local_rank_, b, buf)->load(std::memory_order_relaxed) != 0)
      futex_wake(small_flag(local_rank_, b, buf));
  }
  if (sleepers(local_rank_, ShmFlag::In)->load(std::memory_order_relaxed) != 0) futex_wake(flag(local_rank_, ShmFlag::In));
}

void ShmArena::small_wait(int rank, int block, int buf, uint32_t gen, const char* what) {
  auto* a = small_flag(rank, block, buf);
  if (reached(gen_of(a, std::memory_order_acquire), gen)) return;
  wait_word(a, small_sleepers(rank, block, buf), rank, gen, what, true);
}

void ShmArena::begin_call(uint32_t first_gen) {
  if (first_gen - refreshed_at_ < kRefreshEvery) return;
  const uint32_t old = first_gen - 1;  // every wait on this rank's flags is for old + 1 or later
  for (ShmFlag f : {ShmFlag::In, ShmFlag::Reduced, ShmFlag::Done}) {
    auto* a = flag(local_rank_, f);
    if (!reached(a->load(std::memory_order_relaxed), old)) a->store(old, std::memory_order_release);
  }
  bool all = true;
  if (small_base_)
    for (int buf = 0; buf < 2; ++buf) {
      // The last call's blocks may still be read by a peer one call behind: leave them this time.
      if (last_small_gen_ == old && (int)(old & 1) == buf) {
        all = false;
        continue;
      }
      for (int b = 0; b < kSmallBlocks; ++b) small_flag(local_rank_, b, buf)->store(old, std::memory_order_release);
    }
  if (all) refreshed_at_ = first_gen;
}

// ---- the single-copy protocol ------------------------------------------------------------------

namespace {

// The word a peer's probe reads from this process.
const uint64_t probe_word = kMagic;

// process_vm_readv until every byte is in; 0 or the errno of the failure.
int read_process(int pid, void* dst, uint64_t src, size_t bytes) {
  char* d = static_cast<char*>(dst);
  while (bytes > 0) {
    struct iovec local{d, bytes}, remote{reinterpret_cast<void*>(src), bytes};
    const ssize_t n = ::process_vm_readv(pid, &local, 1, &remote, 1, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno;
    if (n == 0) return EFAULT;
    d += n;
    src += (uint64_t)n;
    bytes -= (size_t)n;
  }
  return 0;
}

Addresses* addresses(char* page) { return reinterpret_cast<Addresses*>(page + kAddressLine * kLine); }

}  // namespace

bool ShmArena::probe_single_copy(bool want) {
  char* mine = base_ + kCtlBytes * local_rank_;
  auto* state = reinterpret_cast<std::atomic<uint32_t>*>(mine + kProbeLine * kLine);
  auto signal_state = [&](uint32_t v) {
    state->store(v, std::memory_order_seq_cst);
    if (state[1].load(std::memory_order_seq_cst) != 0) futex_wake(state);
  };
  // 1: this rank's probe word is published; 2: it could read every peer's and wants the protocol;
  // 3: it could not or does not want it. A peer at 1 has published, at 2 or 3 has decided.
  addresses(mine)->probe.store(reinterpret_cast<uint64_t>(&probe_word), std::memory_order_relaxed);
  signal_state(1);
  bool ok = want;
  for (int r = 0; r < local_size_; ++r) {
    if (r == local_rank_) continue;
    char* page = base_ + kCtlBytes * r;
    auto* theirs = reinterpret_cast<std::atomic<uint32_t>*>(page + kProbeLine * kLine);
    if (!reached(theirs->load(std::memory_order_acquire), 1))
      wait_word(theirs, theirs + 1, r, 1, "the single-copy probe", false);
    uint64_t got = 0;
    const int pid = reinterpret_cast<Header*>(page)->pid.load();
    if (ok && (read_process(pid, &got, addresses(page)->probe.load(), sizeof got) != 0 || got != kMagic)) ok = false;
  }
  signal_state(ok ? 2 : 3);
  bool all = ok;
  for (int r = 0; r < local_size_; ++r) {
    if (r == local_rank_) continue;
    auto* theirs = reinterpret_cast<std::atomic<uint32_t>*>(base_ + kCtlBytes * r + kProbeLine * kLine);
    if (!reached(theirs->load(std::memory_order_acquire), 2))
      wait_word(theirs, theirs + 1, r, 2, "the single-copy probe", false);
    if (theirs->load(std::memory_order_acquire) != 2) all = false;
  }
  single_copy_ = all;
  return all;
}

void ShmArena::publish_address(const void* p) {
  addresses(base_ + kCtlBytes * local_rank_)->call.store(reinterpret_cast<uint64_t>(p), std::memory_order_relaxed);
}

void ShmArena::read_peer(int rank, void* dst, int64_t offset, size_t bytes, const char* what) {
  if (bytes == 0) return;
  char* page = base_ + kCtlBytes * rank;
  auto* hdr = reinterpret_cast<Header*>(page);
  const int pid = hdr->pid.load();
  const int err = read_process(pid, dst, addresses(page)->call.load(std::memory_order_relaxed) + (uint64_t)offset, bytes);
  if (err == 0) return;
  std::string why;
  if (!peer_alive(pid, hdr->start_ticks.load(), hdr->pid_ns.load()) || err == ESRCH)
    why = "it exited";
  else if (hdr->failed.load(std::memory_order_acquire))
    why = std::string("it failed: ") + (page[kErrOffset] ? std::string(page + kErrOffset) : std::string("(no reason given)"));
  else
    why = std::string("process_vm_readv: ") + std::strerror(err);
  throw std::runtime_error("fastar shm: " + who(local_rank_) + " could not read the buffer of " + who(rank) + " (pid " +
                           std::to_string(pid) + ", " + what + "): " + why);
}

}  // namespace fastar
