// The intra-node shared-memory arena: one POSIX segment per node per job (mode 0600, a name that
// carries the job's identity and a random nonce), mapped by every local rank and unlinked as soon
// as all have mapped it, so that a crash leaves nothing under /dev/shm.
//
// Creation reserves every page (posix_fallocate), so that a /dev/shm too small for the segment is an
// error at creation, not a SIGBUS at first touch. Openers check owner, mode 0600, size and the
// creator's magic word. A peer is dead when its (pid, start time) no longer names a live process.
//
// Layout: a control page per local rank (its pid and monotonically increasing flags, each on its
// own cache line), then for each of two pipeline buffers: one input slot per local rank and one
// result area, each chunk_bytes long; then the latency path's small regions (one per local rank and
// buffer: a flag line per block, then kSmallBytes of data), apart from the slots so that no data
// ever lands on a flag.
//
// One class, three files: shm.cpp (the segment: creation, checks, layout, liveness), shm_flags.cpp
// (flags, waits, failure marking, the generation refresh, the single-copy probe and reads),
// shm_desc.cpp (the call descriptors).
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "call_check.h"
#include "failure.h"

namespace fastar {

enum class ShmFlag : int { In = 0, Reduced = 1, Done = 2, Count = 3 };

class ShmArena {
 public:
  // create: local rank 0 creates the segment (O_EXCL), the others open the name it sent them.
  // regions_only: one region of chunk_bytes per local rank (slot(r, 0)), no second buffer and no
  // result area: the layout of fastar.wrap's buckets.
  ShmArena(const std::string& name, bool create, int local_rank, int local_size, int64_t chunk_bytes,
           double timeout_s, bool regions_only = false);
  ~ShmArena();
  ShmArena(const ShmArena&) = delete;
  ShmArena& operator=(const ShmArena&) = delete;

  void unlink();  // idempotent
  const std::string& name() const { return name_; }
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  int64_t chunk_bytes() const { return chunk_bytes_; }
  double timeout_s() const { return timeout_->seconds(); }
  // How long a wait spins before it yields the core: long with a core per local rank, short when
  // the ranks outnumber the cores.
  static int64_t default_spin_ns(int local_size);
  void set_timeout(double s) { timeout_->set(s); }
  // Every wait reads this timeout at each check (a communicator's, shared by all its arenas).
  void share_timeout(SharedTimeout t) { timeout_ = std::move(t); }

  char* slot(int rank, int buf) const;
  char* result(int buf) const;

  // The latency path (one node, at most kSmallBytes per rank): a rank copies its data into its small
  // region block by block and raises each block's flag as soon as that block is in, so that its
  // peers read (and sum) the first blocks while it still writes the last ones. Block 0's flag word
  // carries a 32-bit check of the call's descriptor next to the generation, written in one store:
  // the peers poll that line, and every further store to it would cost them (and us) another
  // transfer of the line. The check (latency_check_word) is exact in count, dtype and route; the
  // descriptor itself sits on a line of its own, read only on a mismatch. Each block's flag is one
  // 64-bit atomic (generation in the low word, where the futex sleeps; block 0's check above it).
  static constexpr int64_t kSmallBytes = 64 << 10;
  static constexpr int kSmallBlocks = 16;
  bool has_small() const { return small_base_ != nullptr; }
  char* small_data(int rank, int buf) const;
  void small_publish_desc(int buf, const uint64_t desc[kDescWords]);
  // A block is in: a plain release store, no fence (a seq_cst store waits until the line is taken
  // from the peer polling it: on a host whose cores share no cache, a cross-die round trip per
  // block). small_wake then fences once and wakes the peers that sleep on any of the blocks or on
  // the In flag (raise_in: the staged-path twin of signal(In), for ranks that disagree).
  void small_signal(int block, int buf, uint32_t gen, uint32_t check);
  void raise_in(uint32_t gen);
  void small_wake(int nblocks, int buf);
  // Waits for local rank `rank`'s block. A peer whose In flag reaches gen instead runs the staged
  // path for the same call (the ranks disagree on the call): that fails at once, with the reason.
  // Block 0: its descriptor check must equal ours (else the error names what differs).
  void small_wait(int rank, int block, int buf, uint32_t gen, const char* what);
  void small_check_desc(int rank, int buf, const uint64_t desc[kDescWords], uint32_t check, const char* what);

  // Generations are 32-bit counters compared by signed difference, so a flag may lag the current
  // generation by less than 2^31. Flags that are not advanced every generation (Reduced, Done, the
  // small blocks) are raised to first_gen - 1 when this rank starts the call at first_gen, once
  // every 2^28 generations: nothing waits on an old generation of this rank by then (a peer is at
  // most one call behind, and the last call's latency blocks are left alone), so raising them
  // changes no wait's outcome and keeps every flag within 2^29 of the present.
  void begin_call(uint32_t first_gen);
  static constexpr uint32_t kRefreshEvery = 1u << 28;

  // Flags are generation counters: signal sets this rank's flag to gen; waits return once the
  // flag reached gen. Waits spin briefly, then yield the core, then sleep on a futex, and throw a
  // std::runtime_error naming the missing local rank on timeout or when its process died.
  void signal(ShmFlag f, uint32_t gen);
  void wait_rank(ShmFlag f, int rank, uint32_t gen, const char* what);
  void wait_all(ShmFlag f, uint32_t gen, const char* what);

  // Marks this rank failed, so that local peers waiting on it fail at once instead of timing out;
  // `why` (this rank's error, truncated) is shown in their errors, so that they name the real cause.
  void mark_failed(const std::string& why = "");
  // Global rank of local rank 0 (ranks are laid out node by node), so errors name global ranks too.
  void set_first_global_rank(int r) { first_global_rank_ = r; }
  // The descriptor of this rank's current collective (call_check.h), checked by peers. Published
  // before signalling In for generation gen, checked after waiting for it.
  void publish_desc(const uint64_t desc[kDescWords], uint32_t gen);
  void check_desc(int rank, const uint64_t desc[kDescWords], uint32_t gen, const char* what);
  // check_desc against every other local rank.
  void check_peers(const uint64_t desc[kDescWords], uint32_t gen, const char* what);

  // The single-copy protocol (Protocol::SingleCopy): local ranks read each other's buffers with
  // process_vm_readv. probe_single_copy: every local rank calls it once, together, after all have
  // mapped the segment (a wait like the flags', within the timeout); each reads a known word from
  // every peer's memory. The node may use the protocol only when every local rank could, and
  // wanted to (`want`: FASTAR_SINGLE_COPY): the same answer on every local rank.
  bool probe_single_copy(bool want);
  bool single_copy() const { return single_copy_; }
  // This rank's buffer for its current call: published before In, read by the peers after it.
  void publish_address(const void* p);
  // Reads `bytes` at `offset` past local rank `rank`'s published buffer into dst; throws a
  // std::runtime_error naming that rank and the reason (it exited, failed, or left the call).
  void read_peer(int rank, void* dst, int64_t offset, size_t bytes, const char* what);

  // Removes fastar segments of this user whose creating process is gone (crash during init).
  // Names end in _ns<pid namespace inode>_p<pid>; segments of another pid namespace are left alone.
  static int remove_stale(const std::string& prefix);
  // Test hook: creating a segment larger than this many bytes fails as a full /dev/shm would
  // (ENOSPC); negative: no limit (the default).
  static void set_reserve_limit(int64_t bytes);
  // Inode of this process's pid namespace (0 if unknown): part of segment names.
  static uint64_t pid_namespace();
  // Test hook: is the process a header would describe alive, as the waits judge it?
  static bool peer_alive_for_test(int pid, uint64_t start_ticks, uint64_t pid_ns);
  static uint64_t start_ticks(int pid);

 private:
  struct Control;
  std::atomic<uint32_t>* flag(int rank, ShmFlag f) const;
  std::atomic<uint32_t>* sleepers(int rank, ShmFlag f) const;
  std::atomic<uint64_t>* desc_slot(int rank, uint32_t gen) const;
  char* small_region(int rank, int buf) const;  // its descriptor line, then its flag lines, then its data
  std::atomic<uint64_t>* small_flag(int rank, int block, int buf) const;
  std::atomic<uint32_t>* small_sleepers(int rank, int block, int buf) const;
  // The one wait: until *a reaches gen (spin, yield, futex on the sleepers word next to it), failing
  // when local rank `rank` failed, died or timed out; `small`: a wait of the latency path, which
  // also fails when that rank's In flag reaches gen (it runs the staged path for this call).
  template <class Word>
  void wait_word(Word* a, std::atomic<uint32_t>* sleepers, int rank, uint32_t gen, const char* what, bool small);
  std::atomic<uint64_t>* small_desc(int rank, int buf) const;
  [[noreturn]] void throw_mismatch(int rank, const uint64_t mine[kDescWords], const std::atomic<uint64_t>* theirs,
                                   const char* what) const;
  char* small_base_ = nullptr;
  bool single_copy_ = false;
  std::string who(int local_rank) const;  // "local rank 1 (rank 3)"
  int first_global_rank_ = -1;
  std::string name_;
  int local_rank_, local_size_;
  int64_t chunk_bytes_;
  SharedTimeout timeout_;
  uint32_t refreshed_at_ = 0;  // begin_call: the first generation of the last refresh
  uint32_t last_small_gen_ = 0;  // the generation of this rank's last latency-path call
  int64_t spin_ns_;
  size_t total_bytes_ = 0;
  char* base_ = nullptr;
  bool unlinked_ = false;
  bool creator_ = false;
};

}  // namespace fastar
