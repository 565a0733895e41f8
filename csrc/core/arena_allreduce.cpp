#include "arena_allreduce.h"

#include <cstring>
#include <stdexcept>
#include <vector>

#include "reduce.h"

namespace fastar {

namespace {

// In place in the bucket regions. reduce: every local rank's bucket is complete in its region;
// each sums its 1/L slice from all regions, in place in its own region ("rail": nobody else reads
// my slice of my region; between nodes this rank carries that slice) or into the leader's region
// ("leader": local rank 0 carries the whole bucket). distribute: the finished slices (or the
// leader's bucket) are written into every region.
class ArenaPhase final : public LocalPhase {
 public:
  ArenaPhase(ArenaAllreduce& ar, ShmArena& a, uint32_t& gen, const Plan& plan, int64_t offset, int64_t count,
             DType t, uint64_t seq, bool multi)
      : ar_(ar), a_(a), gen_(gen), offset_(offset), count_(count), t_(t), es_(dtype_size(t)),
        L_(a.local_size()), lr_(a.local_rank()), multi_(multi), leader_(multi && plan.hierarchy != Hierarchy::Rail) {
    if (plan.protocol != Protocol::InPlace || plan.hierarchy == Hierarchy::Flat)
      throw std::invalid_argument("fastar: the bucket arena runs in-place leader or rail plans, not " + plan_label(plan));
    encode_desc(plan, seq, count, (uint64_t)t, desc_);
    desc_[kChunk] = (uint64_t)offset;  // where the bucket lies in every rank's region
  }
  int64_t chunks() const override { return 1; }
  void failed(const std::string& why) override { a_.mark_failed(why); }

  Part reduce(int64_t) override {
    g_ = ++gen_;
    a_.begin_call(g_);
    a_.publish_desc(desc_, g_);
    a_.signal(ShmFlag::In, g_);  // my bucket is complete in my region
    a_.wait_all(ShmFlag::In, g_, "bucket ready on every local rank");
    a_.check_peers(desc_, g_, "a bucket allreduce");
    const int64_t s0 = part_begin(count_, L_, lr_), s1 = part_begin(count_, L_, lr_ + 1);
    sb_ = offset_ + s0 * (int64_t)es_;
    sn_ = s1 - s0;
    std::vector<const void*> srcs(L_);
    for (int r = 0; r < L_; ++r) srcs[r] = ar_.region(r) + sb_;
    dst_ = (leader_ ? ar_.region(0) : ar_.region(lr_)) + sb_;
    reduce_sum_many(t_, dst_, srcs.data(), L_, sn_);
    if (leader_) {
      a_.signal(ShmFlag::Reduced, g_);
      return lr_ == 0 ? Part{ar_.region(0) + offset_, count_} : Part{};
    }
    return multi_ ? Part{dst_, sn_} : Part{};
  }

  void before_inter(int64_t) override {
    if (leader_) a_.wait_all(ShmFlag::Reduced, g_, "local reduce into the leader's bucket");
  }
  void after_inter(int64_t) override {
    if (leader_) a_.signal(ShmFlag::Done, g_);
  }

  void distribute(int64_t) override {
    if (leader_) {
      if (lr_ != 0) {
        a_.wait_rank(ShmFlag::Done, 0, g_, "the leader's inter-node allreduce");
        std::memcpy(ar_.region(lr_) + offset_, ar_.region(0) + offset_, count_ * es_);
      }
      // The leader must not refill its bucket (next iteration) while a peer still copies from it.
      const uint32_t g2 = ++gen_;
      a_.signal(ShmFlag::In, g2);
      a_.wait_all(ShmFlag::In, g2, "copies from the leader's bucket");
      return;
    }
    for (int r = 0; r < L_; ++r)
      if (r != lr_) std::memcpy(ar_.region(r) + sb_, dst_, sn_ * es_);
    a_.signal(ShmFlag::Done, g_);
    a_.wait_all(ShmFlag::Done, g_, "finished slices written back");
  }

 private:
  ArenaAllreduce& ar_;
  ShmArena& a_;
  uint32_t& gen_;
  int64_t offset_, count_;
  DType t_;
  size_t es_;
  int L_, lr_;
  bool multi_, leader_;
  uint64_t desc_[kDescWords];
  uint32_t g_ = 0;
  int64_t sb_ = 0, sn_ = 0;
  char* dst_ = nullptr;
};

}  // namespace

void ArenaAllreduce::allreduce(const Plan& plan, int64_t offset, int64_t count, DType t, uint64_t seq) {
  if (offset < 0 || offset + count * (int64_t)dtype_size(t) > region_bytes())
    throw std::logic_error("fastar: bucket outside the shared-memory region");
  ArenaPhase ph(*this, *arena_, gen_, plan, offset, count, t, seq, num_nodes_ > 1 && inter_ != nullptr);
  codec_.set_dtype(t);
  driver_.run(ph, plan.algorithm, codec_);
}

}  // namespace fastar
