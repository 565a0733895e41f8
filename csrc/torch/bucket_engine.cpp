#include "torch/bucket_engine.h"

#include <stdexcept>

#include "torch/dtype_map.h"
#include "torch/kernels.h"

namespace fastar {

BucketEngine::BucketEngine(std::shared_ptr<Communicator> comm, std::vector<at::Tensor> params,
                           std::vector<int64_t> order, int64_t cap_bytes, int64_t first_cap_bytes, bool as_view)
    : comm_(std::move(comm)), params_(std::move(params)), cap_bytes_(cap_bytes), first_cap_bytes_(first_cap_bytes),
      as_view_(as_view) {
  scale_ = 1.0 / comm_->topology().size;
  layout(order);
}

void BucketEngine::layout(const std::vector<int64_t>& order) {
  TORCH_CHECK(order.size() == params_.size(), "fastar: bucket order names ", order.size(), " parameters, expected ",
              params_.size());
  buckets_.clear();
  where_.assign(params_.size(), {-1, -1});
  std::vector<int64_t> sizes;
  Bucket cur;
  int64_t cur_bytes = 0;
  int64_t region_off = 0;
  auto close = [&]() {
    if (cur.params.empty()) return;
    const auto& p0 = params_[cur.params[0]];
    if (arena_) {  // a typed view of this rank's shared region, 64-byte aligned
      cur.region_offset = region_off;
      cur.flat = region_.narrow(0, region_off, cur_bytes).view(p0.scalar_type());
      cur.flat.zero_();
      region_off += (cur_bytes + 63) / 64 * 64;
    } else {
      cur.flat = at::zeros({cur_bytes / (int64_t)p0.element_size()}, p0.options().requires_grad(false));
    }
    buckets_.push_back(std::move(cur));
    cur = Bucket();
    cur_bytes = 0;
  };
  for (int64_t idx : order) {
    TORCH_CHECK(idx >= 0 && idx < (int64_t)params_.size() && where_[idx].first == -1,
                "fastar: bad or repeated parameter index ", idx, " in bucket order");
    const at::Tensor& p = params_[idx];
    const int64_t bytes = p.numel() * (int64_t)p.element_size();
    const int64_t cap = buckets_.empty() ? first_cap_bytes_ : cap_bytes_;
    if (!cur.params.empty()) {
      const auto& p0 = params_[cur.params[0]];
      if (p0.scalar_type() != p.scalar_type() || p0.device() != p.device() || cur_bytes + bytes > cap) close();
    }
    where_[idx] = {(int64_t)buckets_.size(), cur_bytes / (int64_t)p.element_size()};
    cur.params.push_back(idx);
    cur.offsets.push_back(cur_bytes / (int64_t)p.element_size());
    cur_bytes += bytes;
  }
  close();
  marked_.assign(params_.size(), 0);
  for (auto& b : buckets_) b.pending = (int64_t)b.params.size();
  next_launch_ = 0;
  started_ = false;
}

void BucketEngine::relayout(const std::vector<int64_t>& order) {
  // Gradients that are views of the old layout would alias other parameters' new places.
  for (auto& p : params_) {
    at::Tensor& grad = p.mutable_grad();
    if (as_view_ && grad.defined()) grad = grad.clone();
  }
  layout(order);
}

void BucketEngine::rebuild(const std::vector<int64_t>& order) {
  std::lock_guard<std::mutex> g(mu_);
  TORCH_CHECK(!started_, "fastar: cannot rebuild buckets during an iteration");
  relayout(order);
}

int64_t BucketEngine::arena_bytes_needed() const {
  int64_t total = 64;
  for (const auto& p : params_) total += p.numel() * (int64_t)p.element_size() + 64;  // + padding per bucket
  return total;
}

void BucketEngine::attach_arena(const std::string& name, bool create) {
  std::lock_guard<std::mutex> g(mu_);
  TORCH_CHECK(!started_, "fastar: cannot move buckets during an iteration");
  const Topology& t = comm_->topology();
  const int64_t bytes = (arena_bytes_needed() + 4095) / 4096 * 4096;
  arena_ = std::make_shared<ShmArena>(name, create, t.local_rank, t.local_size, bytes, comm_->timeout_s(),
                                      /*regions_only=*/true);
  arena_->share_timeout(comm_->timeout());  // fastar.set_timeout reaches wrap's buckets at once
  arena_->set_first_global_rank(t.node * t.local_size);
  comm_->failure_state()->watch(arena_);  // a first failure marks this arena too: peers raise at once
  arena_ar_ = std::make_shared<ArenaAllreduce>(arena_.get(), comm_->inter_transport(), t.num_nodes);
  // The mapping lives as long as any tensor over it: gradients that are bucket views may outlive
  // the wrapper (and this engine).
  std::shared_ptr<ShmArena> keep = arena_;
  region_ = at::from_blob(arena_ar_->region(t.local_rank), {bytes}, [keep](void*) mutable { keep.reset(); },
                          at::TensorOptions().dtype(at::kByte));
  std::vector<int64_t> order;
  for (const auto& b : buckets_) order.insert(order.end(), b.params.begin(), b.params.end());
  relayout(order);
}

void BucketEngine::detach_arena() {
  std::lock_guard<std::mutex> g(mu_);
  TORCH_CHECK(!started_, "fastar: cannot move buckets during an iteration");
  if (!arena_) return;
  std::vector<int64_t> order;
  for (const auto& b : buckets_) order.insert(order.end(), b.params.begin(), b.params.end());
  std::shared_ptr<ShmArena> keep = std::move(arena_);  // mapped until the buckets left it
  relayout(order);
  arena_ar_.reset();
  region_ = at::Tensor();
}

void BucketEngine::unlink_arena() {
  if (arena_) arena_->unlink();
}

int64_t BucketEngine::bucket_bytes(int64_t b) const {
  const auto& bk = buckets_.at(b);
  return bk.flat.numel() * (int64_t)bk.flat.element_size();
}

void BucketEngine::set_plan(int64_t b, const Plan& plan) {
  if (plan.protocol == Protocol::InPlace && !arena_)
    throw std::invalid_argument("fastar: an in-place bucket plan needs the bucket arena (attach_arena)");
  buckets_.at(b).plan = plan;
}

void BucketEngine::launch_ready_locked() {
  // Strictly in bucket order, so that every rank issues the same sequence of collectives.
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    Bucket& b = buckets_[next_launch_++];
    if (b.plan.protocol == Protocol::InPlace && arena_) {
      const Plan plan = b.plan;
      const int64_t off = b.region_offset, n = b.flat.numel();
      const DType dt = to_dtype(b.flat.scalar_type());
      const uint64_t seq = ++seq_;
      // The task owns what it uses: the engine may be gone before it runs (a dropped wrapper).
      std::shared_ptr<ArenaAllreduce> ar = arena_ar_;
      std::shared_ptr<ShmArena> arena = arena_;
      b.work = comm_->submit([ar, arena, plan, off, n, dt, seq] { ar->allreduce(plan, off, n, dt, seq); },
                             route_label(plan.hierarchy, plan.algorithm));
    } else {
      b.work = comm_->allreduce(b.flat, b.plan, /*avg=*/false, /*validate=*/false, /*async_op=*/true);
    }
  }
}

void BucketEngine::mark_ready(int64_t param, const at::Tensor& grad) {
  std::lock_guard<std::mutex> g(mu_);
  TORCH_CHECK(param >= 0 && param < (int64_t)params_.size(), "fastar: bad parameter index");
  if (!started_) {
    started_ = true;
    ready_order_.clear();
  }
  TORCH_CHECK(!marked_[param], "fastar: a gradient for parameter ", param,
              " arrived twice in one backward pass; call backward once per iteration, or use no_sync()");
  marked_[param] = 1;
  ready_order_.push_back(param);
  auto [bi, off] = where_[param];
  Bucket& b = buckets_[bi];
  if (b.flat.is_cuda() && grad.is_contiguous() && grad.scalar_type() == b.flat.scalar_type() &&
      grad.device() == b.flat.device()) {
    b.staged.push_back(grad);  // packed with the rest of the bucket by one kernel
    b.staged_offsets.push_back(off);
  } else {
    at::Tensor dst = b.flat.narrow(0, off, grad.numel());
    at::Tensor src = grad.reshape({-1});
    if (scale_ == 1.0)
      dst.copy_(src);
    else
      at::mul_out(dst, src, scale_);  // the average's division fused into the copy
  }
  if (--b.pending == 0) {
    complete_locked(b);
    launch_ready_locked();
  }
}

void BucketEngine::complete_locked(Bucket& b) {
  if (!b.staged.empty()) {
    pack(b.staged, b.flat, b.staged_offsets, scale_);  // scaled copies of the whole bucket, one launch
    b.staged.clear();
    b.staged_offsets.clear();
  }
  b.ready_s = now_s();
}

std::vector<int64_t> BucketEngine::missing() const {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<int64_t> out;
  for (size_t i = 0; i < params_.size(); ++i)
    if (!marked_[i]) out.push_back((int64_t)i);
  return out;
}

void BucketEngine::finalize(bool fill_unused) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (fill_unused) {
      for (size_t i = 0; i < params_.size(); ++i) {
        if (marked_[i]) continue;
        marked_[i] = 1;
        auto [bi, off] = where_[i];
        Bucket& b = buckets_[bi];
        b.flat.narrow(0, off, params_[i].numel()).zero_();
        if (--b.pending == 0) complete_locked(b);
      }
      launch_ready_locked();
    }
    TORCH_CHECK(next_launch_ == buckets_.size(), "fastar: finalize with gradients missing");
  }
  std::exception_ptr err = wait_launched();
  reset_iteration();
  if (err) std::rethrow_exception(err);
  // .grad becomes a view of the bucket (DDP's gradient_as_bucket_view): no copy back, and when the
  // optimizer keeps gradients (zero_grad(set_to_none=False)) autograd accumulates straight into it.
  for (auto& b : buckets_) {
    for (size_t k = 0; k < b.params.size(); ++k) {
      at::Tensor& p = params_[b.params[k]];
      at::Tensor view = b.flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
      at::Tensor& grad = p.mutable_grad();
      if (!as_view_) {
        if (!grad.defined() || grad.sizes() != p.sizes())
          grad = view.clone();
        else
          grad.copy_(view);
      } else if (!grad.defined() || !grad.is_alias_of(view) || grad.data_ptr() != view.data_ptr()) {
        grad = view;
      }
    }
  }
}

std::exception_ptr BucketEngine::wait_launched() {
  // The first error is the cause; once the communicator failed, the buckets queued behind it fail
  // at once, so this takes one timeout in all, not one per bucket.
  std::exception_ptr err;
  size_t launched;
  {
    std::lock_guard<std::mutex> g(mu_);
    launched = next_launch_;
  }
  for (size_t i = 0; i < launched; ++i) {
    try {
      buckets_[i].work->wait(comm_->timeout_s() + 30);
    } catch (...) {
      if (!err) err = std::current_exception();
    }
  }
  return err;
}

void BucketEngine::reset_iteration() {
  std::lock_guard<std::mutex> g(mu_);
  for (auto& b : buckets_) {
    b.pending = (int64_t)b.params.size();
    b.staged.clear();
    b.staged_offsets.clear();
  }
  std::fill(marked_.begin(), marked_.end(), 0);
  next_launch_ = 0;
  started_ = false;
}

void BucketEngine::abandon() {
  wait_launched();  // the buckets' memory must not change under a collective still running
  reset_iteration();
  // Ranks may have launched different buckets before giving up: later calls must not match a
  // call of this iteration that a peer still runs.
  seq_ = (seq_ | ((uint64_t(1) << 20) - 1)) + 1;
  comm_->skip_sequence();
}

BucketEngine::~BucketEngine() {
  // Buckets still in flight (a wrapper dropped after a backward that raised, or after a wait that
  // timed out): their tasks own the arena allreduce and the mapping. Receives of a failed
  // collective may still be posted into the buckets: keep their memory.
  bool in_flight = false;
  for (const auto& b : buckets_)
    if (b.work && !b.work->is_completed()) in_flight = true;
  if (in_flight || (comm_ && comm_->failure())) {
    keep_forever(std::make_shared<std::vector<Bucket>>(std::move(buckets_)));
    keep_forever(std::make_shared<at::Tensor>(std::move(region_)));
  }
}

std::vector<std::tuple<int64_t, double, double, double, std::string>> BucketEngine::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<std::tuple<int64_t, double, double, double, std::string>> out;
  for (const auto& b : buckets_) {
    out.emplace_back(b.flat.numel() * (int64_t)b.flat.element_size(), b.ready_s, b.work ? b.work->start_s : 0.0,
                     b.work ? b.work->end_s : 0.0, route_label(b.plan.hierarchy, b.plan.algorithm, b.plan.wire));
  }
  return out;
}

}  // namespace fastar
