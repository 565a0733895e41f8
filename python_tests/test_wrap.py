"""fastar.wrap against torch DDP on the same data and seed, with real processes on Gloo."""
import copy
import time

import pytest
import torch
from torch import nn

from mp_utils import run_workers


class Net(nn.Module):
    """BN, a layer used twice, a weight tied between two layers, a frozen layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.shared = nn.Linear(16, 16)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.tie_a = nn.Linear(16, 16, bias=False)
        self.tie_b = nn.Linear(16, 16, bias=False)
        self.tie_b.weight = self.tie_a.weight
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        x = self.tie_b(torch.relu(self.tie_a(self.frozen(x))))
        return self.head(x)


def _batches(rank, steps, n=6):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (n,), generator=g)) for _ in range(steps)]


def _train(model, batches, accumulate=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    for i in range(0, len(batches), accumulate):
        # with accumulation, keep the gradient tensors (fastar's are then views of its buckets)
        opt.zero_grad(set_to_none=accumulate == 1)
        chunk = batches[i:i + accumulate]
        for j, (x, y) in enumerate(chunk):
            ctx = model.no_sync() if j < len(chunk) - 1 else _null()
            with ctx:
                nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _compare_worker(rank, n, local_size, hierarchies, accumulate, bucket_cap_mb, broadcast=True):
    import fastar
    fastar.init(local_size=local_size)
    torch.manual_seed(0)
    base = Net().double()
    batches = _batches(rank, 6)
    # broadcast=True: both at their defaults (DDP broadcasts rank 0's buffers before each forward)
    ref = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base), **({} if broadcast else {"broadcast_buffers": False}))
    _train(ref, batches, accumulate)
    out = {}
    for hier in hierarchies:
        kw = {} if broadcast else {"broadcast_buffers": False}
        model = fastar.wrap(copy.deepcopy(base), hierarchy=hier, bucket_cap_mb=bucket_cap_mb, first_bucket_mb=0.001,
                            **kw)
        _train(model, batches, accumulate)
        worst = 0.0
        for (name, a), b in zip(model.module.state_dict().items(), ref.module.state_dict().values()):
            if a.is_floating_point():
                worst = max(worst, (a - b).abs().max().item())
        out[hier] = worst
        assert model.module.tie_a.weight is model.module.tie_b.weight
    return out


@pytest.mark.parametrize("n,local_size", [(2, 1), (2, 2), (3, 1)])
def test_wrap_matches_ddp(n, local_size):
    hiers = ["flat", "leader", "rail"] if local_size > 1 else ["flat"]
    out = run_workers(_compare_worker, n, local_size, hiers, 1, 0.002, timeout=240)
    for rank_out in out:
        for hier, worst in rank_out.items():
            assert worst < 1e-9, f"{hier}: parameters differ from DDP by {worst}"


def test_no_sync_accumulates_then_syncs():
    out = run_workers(_compare_worker, 2, 1, ["auto"], 3, 25, False, timeout=180)  # per-worker buffers
    assert all(o["auto"] < 1e-9 for o in out)


def _stats_worker(rank, n):
    import fastar
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 32, 3, padding=1), nn.ReLU()]
    for _ in range(6):
        layers += [nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    model = fastar.wrap(net, bucket_cap_mb=0.02, first_bucket_mb=0.01)  # 37 KB per conv: a bucket each
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    began, seen = [0.0], []

    def hold(grad):
        """The backward's last gradients (the first conv's) wait here until a bucket of this iteration
        has started on the communicator's thread: they can only if buckets launch during backward,
        not at its end. Order, not speed: however slow the host, the start comes before the end."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            starts = [start for _, _, start, _, _ in model._engine.stats()]
            if max(starts) >= began[0]:  # steady clock = CLOCK_MONOTONIC
                seen.append(True)
                return grad
            time.sleep(0.001)
        seen.append(False)
        return grad
    net[0].weight.register_hook(hold)
    for _ in range(3):
        out = model(x)
        began[0] = time.monotonic()
        nn.functional.cross_entropy(out, y).backward()
    return model.comm_stats(), seen


def test_comm_stats_shows_overlap():
    for st, seen in run_workers(_stats_worker, 2, timeout=180):
        assert len(st["buckets"]) > 2
        assert st["iteration"] == 3
        # a bucket's allreduce started while backward was still running (its last gradients waited
        # for it), in every iteration; comm_stats shows it
        assert seen == [True] * 3, seen
        assert min(b["start_s"] for b in st["buckets"]) < st["backward_s"]
        assert all(b["end_s"] >= b["start_s"] >= b["ready_s"] - 1e-6 for b in st["buckets"])
        assert 0.0 <= st["overlap"] <= 1.0
        assert sum(b["bytes"] for b in st["buckets"]) > 0


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def _unused_worker(rank, n, find_unused):
    import fastar
    torch.manual_seed(0)
    model = fastar.wrap(Unused(), find_unused_parameters=find_unused)
    model(torch.ones(2, 4) * (rank + 1)).sum().backward()
    # plain lists: tensors sent through a queue would live in shared memory the worker takes down
    return model.module.used.weight.grad.tolist(), model.module.unused.weight.grad.tolist()


def test_unused_parameters_error_names_them():
    got, failures = run_workers(_unused_worker, 2, False, timeout=120, allow_failures=True)
    assert len(failures) == 2
    for tb in failures.values():
        assert "unused.weight" in tb and "find_unused_parameters=True" in tb


def test_find_unused_parameters():
    out = run_workers(_unused_worker, 2, True, timeout=120)
    for used_grad, unused_grad in out:
        used_grad, unused_grad = torch.tensor(used_grad), torch.tensor(unused_grad)
        assert torch.allclose(used_grad, torch.full((4, 4), 3.0))  # mean over ranks of 2*(rank+1)
        assert torch.equal(unused_grad, torch.zeros(4, 4))


def _mismatch_worker(rank, n):
    import fastar
    model = nn.Sequential(nn.Linear(4, 4 if rank == 0 else 5))
    fastar.wrap(model)


def test_mismatched_models_error_names_parameter_and_rank():
    got, failures = run_workers(_mismatch_worker, 2, timeout=120, allow_failures=True)
    assert failures
    for tb in failures.values():
        assert "0.weight" in tb and "rank 1" in tb


def _hook_worker(rank, n, compression=None):
    import fastar
    if compression:
        fastar.init(local_size=1)  # two "nodes": compression applies between nodes
    torch.manual_seed(0)
    base = Net().double()
    batches = _batches(rank, 4)
    ref = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base), broadcast_buffers=False)
    _train(ref, batches)
    hooked = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base), broadcast_buffers=False)
    hooked.register_comm_hook(fastar.hook_state(compression=compression), fastar.comm_hook)
    _train(hooked, batches)
    return max((a - b).abs().max().item() for a, b in zip(hooked.parameters(), ref.parameters()))


def test_ddp_comm_hook_matches_ddp():
    assert all(d < 1e-9 for d in run_workers(_hook_worker, 2, timeout=120))


def test_ddp_comm_hook_with_compression_is_close_to_ddp():
    # float64 gradients cross the wire as bf16: close to DDP, and not equal (the option did something)
    diffs = run_workers(_hook_worker, 2, "bf16", timeout=120)
    assert all(0 < d < 5e-2 for d in diffs), diffs


def _spare_worker(rank, n):
    import weakref

    import fastar
    fastar.init(local_size=1)
    torch.manual_seed(0)
    model = fastar.wrap(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 64), torch.randint(0, 4, (8,))
    made = []  # the gradients autograd allocated in the last backward
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda q: made.append(weakref.ref(q.grad)))
    out = []
    for _ in range(3):
        made.clear()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        views = all(p.grad.untyped_storage().data_ptr() != r().untyped_storage().data_ptr()
                    for p, r in zip(reversed(list(model.parameters())), made))
        opt.step()
        opt.zero_grad(set_to_none=True)
        alive_after_step = sum(r() is not None for r in made)
        model(x)
        out.append((len(made), views, alive_after_step, sum(r() is not None for r in made)))
    return out


def test_fresh_gradients_live_until_the_next_forward():
    """After zero_grad(set_to_none=True) autograd allocates every gradient anew; the wrapper points
    .grad at its bucket and keeps those tensors until the next forward (as DDP keeps its gradients
    until zero_grad), so that their memory serves that forward instead of going back to the system
    at the end of backward: freeing ~100 MB there cost ResNet-50 10-15k page faults a step."""
    for steps in run_workers(_spare_worker, 2, timeout=120):
        for made, views, alive_after_step, alive_after_forward in steps:
            assert made == 4
            assert views, ".grad should be the bucket's view, not autograd's tensor"
            assert alive_after_step == 4, "autograd's gradients were freed before the next forward"
            assert alive_after_forward == 0, "autograd's gradients outlived the next forward"


def _profiler_worker(rank, n):
    """One step without the profiler (no range is made), then one under torch.profiler: one
    `fastar::bucket` range per bucket, with the bucket's bytes, plan and peers."""
    import torch.autograd.profiler as autograd_profiler

    import fastar
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    model = fastar.wrap(net, bucket_cap_mb=0.002, first_bucket_mb=0.001)  # ~2 KB per bucket
    made = []
    real = autograd_profiler.record_function

    def counting(name, *a, **kw):
        if name.startswith("fastar::"):
            made.append(name)
        return real(name, *a, **kw)
    autograd_profiler.record_function = counting  # what fastar.wrap calls to open a range
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    try:
        nn.functional.cross_entropy(model(x), y).backward()  # first step: buckets are re-laid after it
        nn.functional.cross_entropy(model(x), y).backward()
        unprofiled = list(made)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            nn.functional.cross_entropy(model(x), y).backward()
        nn.functional.cross_entropy(model(x), y).backward()  # after the profiler: none again
        after = made[len(unprofiled):]
    finally:
        autograd_profiler.record_function = real
    st = model.comm_stats()
    events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
              if e.name.startswith("fastar::bucket")]
    return {"unprofiled": unprofiled, "made": after, "events": events, "ranges_left": model._ranges,
            "buckets": [(b["bytes"], b["algorithm"]) for b in st["buckets"]]}


def test_profiler_range_per_bucket():
    for out in run_workers(_profiler_worker, 2, timeout=120):
        buckets = out["buckets"]
        assert len(buckets) >= 3, buckets
        assert out["unprofiled"] == [], "ranges were made without the profiler"
        expect = [f"fastar::bucket {i} {nbytes}B {plan} peers=2" for i, (nbytes, plan) in enumerate(buckets)]
        assert out["made"] == expect, (out["made"], expect)  # one per bucket, in launch order; none after
        names = sorted(name for name, _, _ in out["events"])
        assert names == sorted(expect), (names, expect)
        assert sum(int(name.split()[2][:-1]) for name in names) == sum(b for b, _ in buckets)
        assert all(end >= start for _, start, end in out["events"])
        assert out["ranges_left"] is None
