#include "shm.h"

#include <dirent.h>
#include <pthread.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace fastar {
namespace {

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

struct Header {
  std::atomic<uint64_t> magic;
  std::atomic<int32_t> pid;
  std::atomic<int32_t> failed;
  std::atomic<uint64_t> start_ticks;  // the process's start time (/proc/<pid>/stat), against pid reuse
  std::atomic<uint64_t> pid_ns;       // inode of its pid namespace: pids of another one cannot be checked
};
static_assert(sizeof(Header) <= kLine, "header fits a line");

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

std::string errno_str() { return std::strerror(errno); }

int64_t reserve_limit = -1;  // test hook (ShmArena::set_reserve_limit): fail larger reservations

// The process's start time in clock ticks since boot, or 0 when it does not exist or has exited
// (a zombie has exited: it will never set another flag).
uint64_t start_ticks_of(int pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto close = text.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream rest(text.substr(close + 1));
  std::string state;
  rest >> state;
  if (state == "Z" || state == "X" || state == "x") return 0;
  std::string field;
  for (int i = 0; i < 19 && rest >> field; ++i) {}  // fields 4..22: starttime is the 22nd
  try {
    return std::stoull(field);
  } catch (...) {
    return 0;
  }
}

uint64_t own_pid_ns() {
  struct stat st;
  return ::stat("/proc/self/ns/pid", &st) == 0 ? (uint64_t)st.st_ino : 0;
}

// Alive unless this host's /proc says that the process the header describes is gone. A pid from
// another pid namespace (containers sharing /dev/shm) cannot be looked up: it counts as alive and
// the timeout and failure flags stand in.
bool peer_alive(int pid, uint64_t start, uint64_t ns) {
  if (pid <= 0) return true;
  if (ns != 0 && ns != own_pid_ns()) return true;
  const uint64_t now = start_ticks_of(pid);
  if (now == 0) return false;
  return start == 0 || now == start;
}

// Creator-side check of a segment name's creator (names end in _p<pid>; ns in _ns<inode>).
bool creator_alive(int pid, uint64_t ns) { return peer_alive(pid, 0, ns); }

std::string mib(uint64_t b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", b / 1048576.0);
  return buf;
}

// The futex word of a flag: the flag itself, or the low half of a 64-bit one.
void futex_wait(const void* addr, uint32_t val, long usec) {
  struct timespec ts{usec / 1000000, (usec % 1000000) * 1000};
  syscall(SYS_futex, addr, FUTEX_WAIT, val, &ts, nullptr, 0);
}

void futex_wake(const void* addr) { syscall(SYS_futex, addr, FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0); }

// A flag's generation, read at the flag's own width.
inline uint32_t gen_of(const std::atomic<uint32_t>* a, std::memory_order o) { return a->load(o); }
inline uint32_t gen_of(const std::atomic<uint64_t>* a, std::memory_order o) { return (uint32_t)a->load(o); }

inline bool reached(uint32_t v, uint32_t gen) { return (int32_t)(v - gen) >= 0; }

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

ShmArena::ShmArena(const std::string& name, bool create, int local_rank, int local_size, int64_t chunk_bytes,
                   double timeout_s, bool regions_only)
    : name_(name), local_rank_(local_rank), local_size_(local_size), chunk_bytes_(chunk_bytes),
      timeout_(std::make_shared<Timeout>(timeout_s)), spin_ns_(default_spin_ns(local_size)), creator_(create) {
  if (local_size <= 0 || local_rank < 0 || local_rank >= local_size)
    throw std::invalid_argument("fastar shm: bad local rank/size");
  if (chunk_bytes <= 0 || chunk_bytes > (int64_t(1) << 40))
    throw std::invalid_argument("fastar shm: chunk size must be positive (got " + std::to_string(chunk_bytes) +
                                " bytes): check FASTAR_SHM_CHUNK_MB");
  chunk_bytes_ = (int64_t)align_up((size_t)chunk_bytes, 4096);
  const size_t slots_end =
      kCtlBytes * local_size + (regions_only ? (size_t)local_size : 2 * (size_t)(local_size + 1)) * chunk_bytes_;
  total_bytes_ = slots_end + (regions_only ? 0 : 2 * (size_t)local_size * kSmallRegion);
  int fd = -1;
  if (create) {
    fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("fastar shm: cannot create " + name + ": " + errno_str());
    // ftruncate reserves nothing on tmpfs: a segment larger than what /dev/shm has free maps fine
    // and then kills the process with SIGBUS at the first touch of a missing page. Reserve every
    // page now, so that a small /dev/shm (a container's 64 MiB default) is an error here instead.
    int err = 0;
    if (::ftruncate(fd, (off_t)total_bytes_) != 0) err = errno;
    if (!err && reserve_limit >= 0 && (int64_t)total_bytes_ > reserve_limit) err = ENOSPC;
    if (!err) {
      do err = ::posix_fallocate(fd, 0, (off_t)total_bytes_);
      while (err == EINTR);  // a signal during a large reservation: try again
    }
    if (err) {
      ::close(fd);
      ::shm_unlink(name.c_str());
      struct statvfs vfs;
      const uint64_t free_b = ::statvfs("/dev/shm", &vfs) == 0 ? (uint64_t)vfs.f_bavail * vfs.f_frsize : 0;
      throw std::runtime_error(
          std::string(err == ENOSPC || err == ENOMEM ? "fastar shm: /dev/shm is too small: " : "fastar shm: ") +
          "cannot reserve " + mib(total_bytes_) + " for " + name + " (" + std::strerror(err) + "); " +
          mib(free_b) + " of /dev/shm is free. In a container, give it more shared memory (docker run "
          "--shm-size=1g, or a larger /dev/shm volume in Kubernetes), or need less: a smaller bucket_cap_mb "
          "for fastar.wrap, FASTAR_SHM_CHUNK_MB for the staged path, fewer ranks per node");
    }
  } else {
    fd = ::shm_open(name.c_str(), O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("fastar shm: cannot open " + name + ": " + errno_str());
    struct stat st;
    if (::fstat(fd, &st) != 0 || st.st_uid != ::geteuid() || (st.st_mode & 0777) != 0600) {
      ::close(fd);
      throw std::runtime_error("fastar shm: segment " + name + " is not owned by this user with mode 0600: "
                               "not fastar's segment, refusing to use it");
    }
    if ((size_t)st.st_size != total_bytes_) {
      ::close(fd);
      throw std::runtime_error("fastar shm: segment " + name + " has the wrong size: local ranks disagree on "
                               "local_size or FASTAR_SHM_CHUNK_MB");
    }
  }
  void* p = ::mmap(nullptr, total_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) {
    if (create) ::shm_unlink(name.c_str());
    throw std::runtime_error("fastar shm: cannot map " + name + ": " + errno_str());
  }
  base_ = static_cast<char*>(p);
  if (!regions_only) small_base_ = base_ + slots_end;
  if (!create && reinterpret_cast<Header*>(base_)->magic.load() != kMagic) {
    ::munmap(base_, total_bytes_);
    base_ = nullptr;
    throw std::runtime_error("fastar shm: segment " + name + " does not carry fastar's magic word from local "
                             "rank 0: not fastar's segment (or local rank 0 failed to create it)");
  }
  auto* hdr = reinterpret_cast<Header*>(base_ + kCtlBytes * local_rank_);
  hdr->pid.store((int32_t)::getpid());
  hdr->start_ticks.store(start_ticks_of(::getpid()));
  hdr->pid_ns.store(own_pid_ns());
  hdr->magic.store(kMagic);
}

void ShmArena::set_reserve_limit(int64_t bytes) { reserve_limit = bytes; }

bool ShmArena::peer_alive_for_test(int pid, uint64_t start_ticks, uint64_t pid_ns) {
  return peer_alive(pid, start_ticks, pid_ns);
}

uint64_t ShmArena::start_ticks(int pid) { return start_ticks_of(pid); }

uint64_t ShmArena::pid_namespace() { return own_pid_ns(); }

double ShmArena::core_round_trip_ns(int cpu_a, int cpu_b, int iters) {
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
      while ((v = ping.load(std::memory_order_acquire)) != i && v >= 0) cpu_relax();
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
        cpu_relax();
      }
    }
    ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / iters;
  });
  self.join();
  other.join();
  return ok ? ns : -1;
}

ShmArena::~ShmArena() {
  if (creator_ && !unlinked_) ::shm_unlink(name_.c_str());
  if (base_) ::munmap(base_, total_bytes_);
}

void ShmArena::unlink() {
  if (!unlinked_) {
    if (creator_) ::shm_unlink(name_.c_str());
    unlinked_ = true;
  }
}

char* ShmArena::slot(int rank, int buf) const {
  return base_ + kCtlBytes * local_size_ + ((size_t)buf * (local_size_ + 1) + rank) * chunk_bytes_;
}

char* ShmArena::result(int buf) const { return slot(local_size_, buf); }

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
    if (hdr->failed.load(std::memory_order_acquire)) {
      const char* err = base_ + kCtlBytes * rank + kErrOffset;
      throw std::runtime_error("fastar shm: " + who(rank) + " failed while " + who(local_rank_) + " waited for it (" +
                               what + "); its error: " + (err[0] ? std::string(err) : std::string("(none given)")));
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
      if (!peer_alive(pid, hdr->start_ticks.load(), hdr->pid_ns.load()))
        throw std::runtime_error("fastar shm: " + who(rank) + " (pid " + std::to_string(pid) + ") exited while " +
                                 who(local_rank_) + " waited for it (" + what + ")");
      if (std::chrono::duration<double>(now - start).count() > timeout_s())
        throw std::runtime_error("fastar shm: timed out after " + std::to_string((int)timeout_s()) + " s: " +
                                 who(local_rank_) + " waited for " + who(rank) + " (" + what +
                                 "); that rank is stuck, dead, or called a different collective");
    }
  }
}

void ShmArena::wait_all(ShmFlag f, uint32_t gen, const char* what) {
  for (int r = 0; r < local_size_; ++r)
    if (r != local_rank_) wait_rank(f, r, gen, what);
}

std::string ShmArena::who(int local_rank) const {
  std::string s = "local rank " + std::to_string(local_rank);
  if (first_global_rank_ >= 0) s += " (rank " + std::to_string(first_global_rank_ + local_rank) + ")";
  return s;
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
                           "threshold (Communicator.set_small_bytes)");
}

char* ShmArena::small_region(int rank, int buf) const {
  return small_base_ + ((size_t)buf * local_size_ + rank) * kSmallRegion;
}

std::atomic<uint64_t>* ShmArena::small_flag(int rank, int block, int buf) const {
  return reinterpret_cast<std::atomic<uint64_t>*>(small_region(rank, buf) + (size_t)(1 + block) * kLine);
}

std::atomic<uint32_t>* ShmArena::small_sleepers(int rank, int block, int buf) const {
  return reinterpret_cast<std::atomic<uint32_t>*>(small_region(rank, buf) + (size_t)(1 + block) * kLine +
                                                  kSmallSleepersOffset);
}

std::atomic<uint64_t>* ShmArena::small_desc(int rank, int buf) const {
  return reinterpret_cast<std::atomic<uint64_t>*>(small_region(rank, buf));
}

char* ShmArena::small_data(int rank, int buf) const { return small_region(rank, buf) + (1 + kSmallBlocks) * kLine; }

void ShmArena::small_publish_desc(int buf, const uint64_t desc[kDescWords]) {
  auto* d = small_desc(local_rank_, buf);
  for (int i = 0; i < kDescWords; ++i) d[i].store(desc[i], std::memory_order_relaxed);
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

void ShmArena::small_check_desc(int rank, int buf, const uint64_t desc[kDescWords], uint32_t check,
                                const char* what) {
  const uint64_t w = small_flag(rank, 0, buf)->load(std::memory_order_acquire);
  if ((uint32_t)(w >> 32) == check) return;
  throw_mismatch(rank, desc, small_desc(rank, buf), what);  // the descriptor was stored before the flag
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

void ShmArena::check_peers(const uint64_t desc[kDescWords], uint32_t gen, const char* what) {
  for (int r = 0; r < local_size_; ++r)
    if (r != local_rank_) check_desc(r, desc, gen, what);
}

int ShmArena::remove_stale(const std::string& prefix) {
  // Names are <prefix>..._p<creator pid>; a segment whose creator is gone was never unlinked.
  int removed = 0;
  DIR* d = ::opendir("/dev/shm");
  if (!d) return 0;
  const uid_t uid = ::getuid();
  while (struct dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n.compare(0, prefix.size(), prefix) != 0) continue;
    auto pos = n.rfind("_p");
    if (pos == std::string::npos) continue;
    const int pid = std::atoi(n.c_str() + pos + 2);
    const auto ns_pos = n.rfind("_ns");
    const uint64_t ns = ns_pos == std::string::npos ? 0 : std::strtoull(n.c_str() + ns_pos + 3, nullptr, 10);
    struct stat st;
    std::string path = "/dev/shm/" + n;
    if (::stat(path.c_str(), &st) != 0 || st.st_uid != uid) continue;
    if (pid > 0 && !creator_alive(pid, ns)) {
      if (::shm_unlink(("/" + n).c_str()) == 0) ++removed;
    }
  }
  ::closedir(d);
  return removed;
}

}  // namespace fastar
