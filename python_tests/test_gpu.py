"""The GPU path (issue 6): CUDA tensors through fastar.all_reduce and fastar.wrap over NCCL groups,
on fastar's own stream. Every test here needs a CUDA GPU and skips without one (this machine and
CI have none; docs/results.md records the last run on a GPU machine). Tests of several processes
need one GPU per process (NCCL refuses two ranks on one GPU) and skip on a one-GPU machine.
The same TensorAllreduce code runs over Gloo in test_compression.py, on every machine.
"""
from __future__ import annotations

import pytest
import torch

from mp_utils import run_workers

try:
    import fastar._C as _C
    CUDA_BUILT = bool(_C.cuda_built())
except ImportError:  # pragma: no cover
    CUDA_BUILT = False

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and CUDA_BUILT),
    reason="needs a CUDA GPU and fastar built with CUDA (this host has no GPU; see docs/results.md for GPU runs)")
multi_gpu = pytest.mark.skipif(torch.cuda.device_count() < 2,
                               reason="needs 2 CUDA GPUs: NCCL does not put two ranks on one GPU")


def _set_device(rank):
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def _allreduce_one_worker(rank, size):
    import fastar
    dev = _set_device(rank)
    out = {}
    for h in ("flat", "leader", "rail"):
        for a in ("halving_doubling", "ring"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                t = torch.randn(1001, device=dev).to(dtype)
                ref = t.clone()
                fastar.all_reduce(t, hierarchy=h, algorithm=a)
                out[(h, a, str(dtype))] = bool(torch.equal(t, ref))
    t = torch.arange(10.0, device=dev)
    w = fastar.all_reduce(t, op="avg", async_op=True, compression="fp16")
    w.wait()
    out["async"] = bool(torch.equal(t, torch.arange(10.0, device=dev)))
    out["explain"] = fastar.explain()
    return out


def test_cuda_all_reduce_world_size_one():
    res = run_workers(_allreduce_one_worker, 1, timeout=300)[0]
    assert all(v for k, v in res.items() if k not in ("explain",)), res
    assert "cuda tensor path: nccl groups" in res["explain"]
    assert "cuda tensor" in res["explain"]


def _stream_worker(rank, size):
    """The allreduce is ordered on the GPU, not by the CPU: a slow kernel on a side stream writes
    the tensor and the allreduce is queued behind it; wait() returns while the GPU is still busy (no
    device-wide synchronisation) and the side stream, made to wait for fastar's, reads the result."""
    import fastar
    dev = _set_device(rank)
    side = torch.cuda.Stream(device=dev)
    t = torch.zeros(1 << 20, device=dev)
    fastar.all_reduce(t)  # the first CUDA call sets up the NCCL groups (and synchronises once)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time before the write
        t.fill_(rank + 1.0)
        work = fastar.all_reduce(t, async_op=True)
        work.wait()
        mark = torch.cuda.Event()
        mark.record(side)
        busy_after_wait = not mark.query()
        got = t.clone()
    torch.cuda.synchronize()
    return got.unique().tolist(), busy_after_wait


def test_cuda_all_reduce_is_ordered_by_streams_not_by_the_cpu():
    values, busy = run_workers(_stream_worker, 1, timeout=300)[0]
    assert values == [1.0]
    assert busy, "wait() blocked the CPU until the GPU finished (a device-wide synchronisation)"


def _wrap_worker(rank, size, compression, channels_last):
    import fastar
    dev = _set_device(rank)
    # bitwise comparisons need deterministic kernels (cuDNN's weight gradients may use atomics)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.AvgPool2d(12),
                                torch.nn.Flatten(), torch.nn.Linear(32, 10)).to(dev)
        return m.to(memory_format=torch.channels_last) if channels_last else m

    model, ref = make(), make()
    wrapped = fastar.wrap(model, compression=compression, bucket_cap_mb=0.01, first_bucket_mb=0.002)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    diffs = []
    for it in range(4):
        g = torch.Generator(device="cpu").manual_seed(it * 10 + rank)
        x = torch.randn(8, 3, 12, 12, generator=g).to(dev)
        y = torch.randint(0, 10, (8,), generator=g).to(dev)
        for m, o in ((wrapped, opt), (ref, opt_ref)):
            o.zero_grad(set_to_none=False)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        diffs.append(max((a.grad - b.grad).abs().max().item() for a, b in zip(model.parameters(), ref.parameters())))
    stats = wrapped.comm_stats()
    return diffs, len(stats["buckets"]), [b["algorithm"] for b in stats["buckets"]]


@pytest.mark.parametrize("compression,channels_last", [(None, False), (None, True), ("bf16", False)])
def test_wrap_cuda_world_size_one_equals_local_training(compression, channels_last):
    diffs, nbuckets, algos = run_workers(_wrap_worker, 1, compression, channels_last, timeout=300)[0]
    # world size 1: the average is the local gradient, bit for bit (packed with scale 1)
    assert diffs == [0.0] * 4, diffs
    assert nbuckets > 1


def _wrap_two_gpus_worker(rank, size, compression):
    import fastar
    from torch.nn.parallel import DistributedDataParallel as DDP
    import torch.distributed as dist
    dev = _set_device(rank)
    nccl = dist.new_group(backend="nccl")

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).to(dev)

    wrapped = fastar.wrap(make(), compression=compression, bucket_cap_mb=0.05, first_bucket_mb=0.01)
    ddp = DDP(make(), device_ids=[dev.index], process_group=nccl)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(16, 32, generator=g).to(dev), torch.randint(0, 10, (16,), generator=g).to(dev)
    for m in (wrapped, ddp):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    return [(a.grad.cpu(), b.grad.cpu()) for a, b in zip(wrapped.parameters(), ddp.parameters())]


@multi_gpu
@pytest.mark.parametrize("compression", [None, "fp16"])
def test_wrap_two_gpus_matches_ddp(compression):
    res = run_workers(_wrap_two_gpus_worker, 2, compression, timeout=300)
    tol = 1e-6 if compression is None else 2e-3
    for r in range(2):
        for a, b in res[r]:
            assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()
        for (a, _), (a0, _) in zip(res[r], res[0]):
            assert torch.equal(a, a0)


def _two_gpu_allreduce_worker(rank, size, local_size):
    import fastar
    fastar.init(local_size=local_size)
    dev = _set_device(rank)
    out = {}
    for h in ("flat", "leader", "rail"):
        for a in ("halving_doubling", "ring"):
            for comp in (None, "bf16"):
                t = (torch.arange(4099, device=dev) % 7 + rank).float()
                fastar.all_reduce(t, hierarchy=h, algorithm=a, compression=comp)
                out[(h, a, comp)] = t.cpu()
    return out


@multi_gpu
@pytest.mark.parametrize("local_size", [1, 2])
def test_two_gpus_every_hierarchy(local_size):
    res = run_workers(_two_gpu_allreduce_worker, 2, local_size, timeout=300)
    expect = sum((torch.arange(4099) % 7 + r).float() for r in range(2))
    for r in range(2):
        for k, v in res[r].items():
            assert torch.equal(v, expect), (r, k)


def _gloo_group_worker(rank, size):
    import fastar
    import torch.distributed as dist
    dev = _set_device(rank)
    gloo = dist.new_group(backend="gloo")
    try:
        fastar.all_reduce(torch.ones(4, device=dev), group=gloo)
    except ValueError as e:
        return str(e)
    return None


def test_cuda_tensor_with_a_cpu_only_group_is_a_clear_error():
    msg = run_workers(_gloo_group_worker, 1, timeout=120)[0]
    assert msg is not None and "CPU-only (gloo) group" in msg and "nccl" in msg


def _mixed_devices_worker(rank, size):
    import fastar
    dev = _set_device(rank)
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).to(dev))
    try:
        fastar.wrap(m)
    except ValueError as e:
        return str(e)
    return None


def test_wrap_of_a_model_on_two_devices_is_a_clear_error():
    msg = run_workers(_mixed_devices_worker, 1, timeout=120)[0]
    assert msg is not None and "several devices" in msg
