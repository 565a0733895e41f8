#include "arena_allreduce.h"

#include <cstring>
#include <stdexcept>
#include <vector>

#include "reduce.h"

namespace fastar {

void ArenaAllreduce::allreduce(Hierarchy mode, Algorithm algo, int64_t offset, int64_t count, DType t,
                               uint64_t seq) {
  const int L = arena_->local_size();
  const int lr = arena_->local_rank();
  const size_t esize = dtype_size(t);
  if (offset < 0 || offset + count * (int64_t)esize > region_bytes())
    throw std::logic_error("fastar: bucket outside the shared-memory region");
  const bool multi = num_nodes_ > 1 && inter_ != nullptr;
  const bool leader = multi && mode != Hierarchy::Rail;
  const uint32_t g = ++gen_;
  const uint64_t desc[4] = {seq, (uint64_t)count, (uint64_t)t, (uint64_t)mode * 16 + (uint64_t)algo};
  try {
    arena_->publish_desc(desc, g);
    arena_->signal(ShmFlag::In, g);  // my bucket is complete in my region
    arena_->wait_all(ShmFlag::In, g, "bucket ready on every local rank");
    for (int r = 0; r < L; ++r)
      if (r != lr) arena_->check_desc(r, desc, g, "a bucket allreduce");
    const int64_t s0 = part_begin(count, L, lr), s1 = part_begin(count, L, lr + 1);
    const int64_t sb = offset + s0 * (int64_t)esize, sn = s1 - s0;
    std::vector<const void*> srcs(L);
    for (int r = 0; r < L; ++r) srcs[r] = region(r) + sb;
    // In place in my own region for "rail" (nobody else reads my slice of my region), into the
    // leader's region for "leader".
    char* dst = (leader ? region(0) : region(lr)) + sb;
    reduce_sum_many(t, dst, srcs.data(), L, sn);
    if (leader) {
      arena_->signal(ShmFlag::Reduced, g);
      if (lr == 0) {
        arena_->wait_all(ShmFlag::Reduced, g, "local reduce into the leader's bucket");
        exec_.run(make_schedule(algo, inter_->rank(), inter_->size(), count), *inter_, region(0) + offset, count, t);
        arena_->signal(ShmFlag::Done, g);
      } else {
        arena_->wait_rank(ShmFlag::Done, 0, g, "the leader's inter-node allreduce");
        std::memcpy(region(lr) + offset, region(0) + offset, count * esize);
      }
      // The leader must not refill its bucket (next iteration) while a peer still copies from it.
      const uint32_t g2 = ++gen_;
      arena_->signal(ShmFlag::In, g2);
      arena_->wait_all(ShmFlag::In, g2, "copies from the leader's bucket");
      return;
    }
    if (multi) exec_.run(make_schedule(algo, inter_->rank(), inter_->size(), sn), *inter_, dst, sn, t);
    for (int r = 0; r < L; ++r)
      if (r != lr) std::memcpy(region(r) + sb, dst, sn * esize);
    arena_->signal(ShmFlag::Done, g);
    arena_->wait_all(ShmFlag::Done, g, "finished slices written back");
  } catch (const std::exception& e) {
    arena_->mark_failed(e.what());  // local peers fail at once, with this reason
    throw;
  }
}

}  // namespace fastar
