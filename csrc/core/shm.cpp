// The segment: creation (reserved in full), the opener's checks, the layout, liveness of peers.
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

#include "shm_detail.h"

namespace fastar {

using namespace shm_detail;

namespace {

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

}  // namespace

// Alive unless this host's /proc says that the process the header describes is gone. A pid from
// another pid namespace (containers sharing /dev/shm) cannot be looked up: it counts as alive and
// the timeout and failure flags stand in.
bool shm_detail::peer_alive(int pid, uint64_t start, uint64_t ns) {
  if (pid <= 0) return true;
  if (ns != 0 && ns != own_pid_ns()) return true;
  const uint64_t now = start_ticks_of(pid);
  if (now == 0) return false;
  return start == 0 || now == start;
}

namespace {

// Creator-side check of a segment name's creator (names end in _p<pid>; ns in _ns<inode>).
bool creator_alive(int pid, uint64_t ns) { return peer_alive(pid, 0, ns); }

std::string mib(uint64_t b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", b / 1048576.0);
  return buf;
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

std::string ShmArena::who(int local_rank) const {
  std::string s = "local rank " + std::to_string(local_rank);
  if (first_global_rank_ >= 0) s += " (rank " + std::to_string(first_global_rank_ + local_rank) + ")";
  return s;
}

char* ShmArena::small_region(int rank, int buf) const {
  return small_base_ + ((size_t)buf * local_size_ + rank) * kSmallRegion;
}

char* ShmArena::small_data(int rank, int buf) const { return small_region(rank, buf) + (1 + kSmallBlocks) * kLine; }

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
