#include "shm.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>

namespace fastar {
namespace {

constexpr size_t kCtlBytes = 4096;  // per local rank
constexpr size_t kLine = 64;
constexpr size_t kErrOffset = 1024;  // in a rank's control page: its error text, NUL-terminated
constexpr uint64_t kMagic = 0x66617374617231ull;  // "fastar1"

struct Header {
  std::atomic<uint64_t> magic;
  std::atomic<int32_t> pid;
  std::atomic<int32_t> failed;
};
static_assert(sizeof(Header) <= kLine, "header fits a line");

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

std::string errno_str() { return std::strerror(errno); }

bool process_alive(int pid) { return pid <= 0 || ::kill(pid, 0) == 0 || errno == EPERM; }

void futex_wait(std::atomic<uint32_t>* addr, uint32_t val, long usec) {
  struct timespec ts{usec / 1000000, (usec % 1000000) * 1000};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT, val, &ts, nullptr, 0);
}

void futex_wake(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

inline bool reached(uint32_t v, uint32_t gen) { return (int32_t)(v - gen) >= 0; }

}  // namespace

ShmArena::ShmArena(const std::string& name, bool create, int local_rank, int local_size, int64_t chunk_bytes,
                   double timeout_s)
    : name_(name), local_rank_(local_rank), local_size_(local_size), chunk_bytes_(chunk_bytes),
      timeout_s_(timeout_s), creator_(create) {
  if (local_size <= 0 || local_rank < 0 || local_rank >= local_size)
    throw std::invalid_argument("fastar shm: bad local rank/size");
  chunk_bytes_ = (int64_t)align_up((size_t)chunk_bytes, 4096);
  total_bytes_ = kCtlBytes * local_size + 2 * (size_t)(local_size + 1) * chunk_bytes_;
  int fd = -1;
  if (create) {
    fd = ::shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("fastar shm: cannot create " + name + ": " + errno_str());
    if (::ftruncate(fd, (off_t)total_bytes_) != 0) {
      std::string e = errno_str();
      ::close(fd);
      ::shm_unlink(name.c_str());
      throw std::runtime_error("fastar shm: cannot size " + name + " to " + std::to_string(total_bytes_) +
                               " bytes: " + e + " (is /dev/shm large enough? lower FASTAR_SHM_CHUNK_MB)");
    }
  } else {
    fd = ::shm_open(name.c_str(), O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("fastar shm: cannot open " + name + ": " + errno_str());
    struct stat st;
    if (::fstat(fd, &st) != 0 || (size_t)st.st_size != total_bytes_) {
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
  auto* hdr = reinterpret_cast<Header*>(base_ + kCtlBytes * local_rank_);
  hdr->pid.store((int32_t)::getpid());
  hdr->magic.store(kMagic);
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

void ShmArena::signal(ShmFlag f, uint32_t gen) {
  auto* a = flag(local_rank_, f);
  a->store(gen, std::memory_order_release);
  futex_wake(a);
}

void ShmArena::wait_rank(ShmFlag f, int rank, uint32_t gen, const char* what) {
  auto* a = flag(rank, f);
  uint32_t v = a->load(std::memory_order_acquire);
  if (reached(v, gen)) return;
  for (int i = 0; i < 256; ++i) {  // brief spin: the peer is usually microseconds away
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
    if (reached(a->load(std::memory_order_acquire), gen)) return;
  }
  const auto start = std::chrono::steady_clock::now();
  auto last_check = start;
  int yields = 0;
  while (true) {
    v = a->load(std::memory_order_acquire);
    if (reached(v, gen)) return;
    if (yields < 64) {  // give the core to the rank we wait for (ranks may outnumber cores)
      ++yields;
      sched_yield();
    } else {
      futex_wait(a, v, 2000);
    }
    const auto now = std::chrono::steady_clock::now();
    auto* hdr = reinterpret_cast<Header*>(base_ + kCtlBytes * rank);
    if (hdr->failed.load(std::memory_order_acquire)) {
      const char* err = base_ + kCtlBytes * rank + kErrOffset;
      throw std::runtime_error("fastar shm: " + who(rank) + " failed while " + who(local_rank_) + " waited for it (" +
                               what + "); its error: " + (err[0] ? std::string(err) : std::string("(none given)")));
    }
    if (now - last_check > std::chrono::milliseconds(100)) {
      last_check = now;
      const int pid = hdr->pid.load();
      if (!process_alive(pid))
        throw std::runtime_error("fastar shm: " + who(rank) + " (pid " + std::to_string(pid) + ") exited while " +
                                 who(local_rank_) + " waited for it (" + what + ")");
      if (std::chrono::duration<double>(now - start).count() > timeout_s_)
        throw std::runtime_error("fastar shm: timed out after " + std::to_string((int)timeout_s_) + " s: " +
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
}

// Two descriptor slots by parity of the collective's first generation: a peer can be at most one
// collective ahead (it cannot pass the next copy-in barrier without us), so it never overwrites
// the slot we are about to check.
std::atomic<uint64_t>* ShmArena::desc_slot(int rank, uint32_t gen) const {
  return reinterpret_cast<std::atomic<uint64_t>*>(base_ + kCtlBytes * rank + kLine * (8 + (gen & 1)));
}

void ShmArena::publish_desc(const uint64_t desc[4], uint32_t gen) {
  auto* d = desc_slot(local_rank_, gen);
  for (int i = 0; i < 4; ++i) d[i].store(desc[i], std::memory_order_relaxed);
}

void ShmArena::check_desc(int rank, const uint64_t desc[4], uint32_t gen, const char* what) {
  auto* d = desc_slot(rank, gen);
  static const char* names[4] = {"call number", "element count", "dtype", "hierarchy/algorithm"};
  for (int i = 0; i < 4; ++i) {
    const uint64_t theirs = d[i].load(std::memory_order_relaxed);
    if (theirs != desc[i])
      throw std::runtime_error("fastar: ranks disagree on the " + std::string(names[i]) + " of " + what + ": " +
                               who(local_rank_) + " has " + std::to_string(desc[i]) + ", " + who(rank) + " has " +
                               std::to_string(theirs) +
                               ". Every rank must call the same collectives with tensors of the same shape and dtype.");
  }
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
    struct stat st;
    std::string path = "/dev/shm/" + n;
    if (::stat(path.c_str(), &st) != 0 || st.st_uid != uid) continue;
    if (pid > 0 && !process_alive(pid)) {
      if (::shm_unlink(("/" + n).c_str()) == 0) ++removed;
    }
  }
  ::closedir(d);
  return removed;
}

}  // namespace fastar
