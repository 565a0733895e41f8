"""The GPU path (issues 6 and 17): CUDA tensors through fastar.all_reduce and fastar.wrap over NCCL
groups, on fastar's own stream. Each test is named for what it checks, and each check is shown to
fail on a deliberately broken build (fastar._C._set_fault, test-only: csrc/torch/kernels.h).

- World size 1 (one GPU): fastar skips the collective itself (TensorAllreduce::p2p returns before
  any send, compression or rounding), so these tests check what does run: the pack of gradients
  into buckets and their return into .grad, the stream order (producer stream -> fastar's stream ->
  consumer stream, with kernels on the current stream), and the error cases.
- The collective (NCCL send/recv of the schedules, leader/rail with NCCL's reduce-scatter and
  allgather, compression on the wire) needs two GPUs: those tests skip on a one-GPU machine
  (NCCL refuses two ranks on one GPU). The same TensorAllreduce code runs over Gloo, with several
  processes, in test_compression.py on every machine.
- CPU mirrors: the skipped-wait fault is also shown over Gloo (the compressed CPU path is the same
  TensorAllreduce code), so its detection is demonstrated without a GPU; the pack-offset and
  default-stream faults have their kernel-level checks in test_kernels.py.
"""
from __future__ import annotations

import time

import pytest
import torch

from mp_utils import run_workers

try:
    import fastar._C as _C
    CUDA_BUILT = bool(_C.cuda_built())
except ImportError:  # pragma: no cover
    CUDA_BUILT = False

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and CUDA_BUILT),
    reason="needs a CUDA GPU and fastar built with CUDA (this host has none; see docs/results.md for GPU runs)")
multi_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and CUDA_BUILT and torch.cuda.device_count() >= 2),
    reason="needs 2 CUDA GPUs (and fastar built with CUDA): NCCL does not put two ranks on one GPU, and at "
           "world size 1 fastar runs no collective")

# ~0.1 s of GPU time on an H100/H200 (torch.cuda._sleep spins for this many clock cycles)
SLEEP_CYCLES = 200_000_000


def _set_device(rank):
    torch.cuda.set_device(rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def _conv_net(dev, channels_last=False):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.AvgPool2d(12),
                            torch.nn.Flatten(), torch.nn.Linear(32, 10)).to(dev)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def _max_diff(model, ref):
    """Largest |difference| of the two models' gradients; NaN if any is NaN (torch's max propagates
    it, Python's max would not)."""
    return torch.stack([(a.grad - b.grad).abs().max() for a, b in zip(model.parameters(), ref.parameters())]
                       ).max().item()


# ------------------------------------------------------------------ world size 1: pack/unpack into .grad

def _wrap_grad_worker(rank, size, channels_last, set_to_none, fault):
    """Trains a wrapped net and an identical plain one side by side; returns the largest gradient
    difference per iteration, and whether every .grad ended as a view of one of fastar's buckets."""
    import fastar
    dev = _set_device(rank)
    # bitwise comparisons need deterministic kernels (cuDNN's weight gradients may use atomics)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    model, ref = _conv_net(dev, channels_last), _conv_net(dev, channels_last)
    wrapped = fastar.wrap(model, bucket_cap_mb=0.01, first_bucket_mb=0.002)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    if fault:
        _C._set_fault(fault)
    diffs = []
    for it in range(4):
        g = torch.Generator(device="cpu").manual_seed(it * 10 + rank)
        x = torch.randn(8, 3, 12, 12, generator=g).to(dev)
        y = torch.randint(0, 10, (8,), generator=g).to(dev)
        for m, o in ((wrapped, opt), (ref, opt_ref)):
            o.zero_grad(set_to_none=set_to_none)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        diffs.append(_max_diff(model, ref))
    stats = wrapped.comm_stats()
    # .grad of every parameter of a bucket is a view of that bucket: one storage per bucket, of its size
    params = dict(model.named_parameters())
    storages = []
    for b, names in zip(stats["buckets"], stats["bucket_params"]):
        ptrs = {params[n].grad.untyped_storage().data_ptr() for n in names}
        nbytes = {params[n].grad.untyped_storage().nbytes() for n in names}
        storages.append((len(ptrs), nbytes, b["bytes"]))
    return diffs, storages


def check_wrap_grads(diffs, storages):
    assert len(storages) > 1, "the test needs several buckets"
    for nptrs, nbytes, bucket_bytes in storages:
        assert nptrs == 1 and nbytes == {bucket_bytes}, (
            "the gradients did not come back as views of fastar's buckets (so the bucket path was not used): "
            f"{storages}")
    # world size 1: the average is the local gradient, bit for bit (packed with scale 1)
    assert diffs == [0.0] * len(diffs), f"gradients differ from local training: {diffs}"


@needs_cuda
@pytest.mark.parametrize("channels_last,set_to_none", [(False, False), (False, True), (True, False)],
                         ids=["grads-in-place", "fresh-grads-packed", "channels-last"])
def test_wrap_world_size_one_packs_gradients_into_buckets_and_back_bit_for_bit(channels_last, set_to_none):
    """What wrap does at world size 1: gradients packed into buckets (one kernel for the contiguous
    ones, a copy for channels_last ones), the bucket views handed back as .grad."""
    diffs, storages = run_workers(_wrap_grad_worker, 1, channels_last, set_to_none, None, timeout=300)[0]
    check_wrap_grads(diffs, storages)


@needs_cuda
def test_wrap_pack_writing_to_the_wrong_offset_fails_the_grad_check():
    diffs, storages = run_workers(_wrap_grad_worker, 1, False, True, "pack_offset", timeout=300)[0]
    with pytest.raises(AssertionError, match="differ from local training"):
        check_wrap_grads(diffs, storages)


# ------------------------------------------------------------------ world size 1: stream order

def _wrap_stream_worker(rank, size, fault):
    """Everything on a side stream (the model, its forward and backward); before each backward the
    side stream sleeps ~0.1 s, so the gradients exist only in that stream's order when autograd's
    hooks hand them to fastar on the CPU. A pack that does not follow the current stream packs them
    before they are computed."""
    import fastar
    dev = _set_device(rank)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    side = torch.cuda.Stream(device=dev)
    diffs = []
    with torch.cuda.stream(side):
        model, ref = _conv_net(dev), _conv_net(dev)
        wrapped = fastar.wrap(model, bucket_cap_mb=0.01, first_bucket_mb=0.002)
        if fault:
            _C._set_fault(fault)
        for it in range(3):
            g = torch.Generator(device="cpu").manual_seed(100 + it)
            x = torch.randn(8, 3, 12, 12, generator=g).to(dev)
            y = torch.randint(0, 10, (8,), generator=g).to(dev)
            for m in (wrapped, ref):
                m.zero_grad(set_to_none=True)  # fresh gradients each time: pack copies them
                loss = torch.nn.functional.cross_entropy(m(x), y)
                torch.cuda._sleep(SLEEP_CYCLES)
                loss.backward()
            torch.cuda.synchronize()
            diffs.append(_max_diff(model, ref))
    return diffs


def check_stream_diffs(diffs):
    assert all(d <= 1e-6 for d in diffs), f"gradients packed out of stream order: differences {diffs}"  # NaN fails


@needs_cuda
def test_wrap_packs_gradients_in_the_order_of_the_backward_stream():
    check_stream_diffs(run_workers(_wrap_stream_worker, 1, None, timeout=300)[0])


@needs_cuda
def test_wrap_pack_on_the_default_stream_fails_the_stream_check():
    diffs = run_workers(_wrap_stream_worker, 1, "default_stream", timeout=300)[0]
    with pytest.raises(AssertionError, match="out of stream order"):
        check_stream_diffs(diffs)


def _all_reduce_stream_worker(rank, size):
    """A producer stream writes the tensor behind a ~0.2 s sleep and queues the allreduce; a third
    stream, the consumer, calls wait() and reads the tensor. Only fastar's events (producer ->
    fastar's stream -> consumer) order the read after the write: without them it reads the zeros."""
    import fastar
    dev = _set_device(rank)
    producer, consumer = torch.cuda.Stream(device=dev), torch.cuda.Stream(device=dev)
    t = torch.zeros(1 << 20, device=dev)
    fastar.all_reduce(t)  # the first CUDA call sets up the NCCL groups (and synchronises once)
    torch.cuda.synchronize()
    with torch.cuda.stream(producer):
        torch.cuda._sleep(2 * SLEEP_CYCLES)
        t.fill_(7.0)
        work = fastar.all_reduce(t, async_op=True)
    with torch.cuda.stream(consumer):
        work.wait()
        mark = torch.cuda.Event()
        mark.record(producer)
        producer_busy_after_wait = not mark.query()
        got = t.clone()
    torch.cuda.synchronize()
    return got.unique().tolist(), producer_busy_after_wait


@needs_cuda
def test_cuda_all_reduce_orders_the_consumer_stream_after_the_producer_without_blocking_the_cpu():
    values, busy = run_workers(_all_reduce_stream_worker, 1, timeout=300)[0]
    assert busy, "wait() blocked the CPU until the GPU finished (a device-wide synchronisation)"
    assert values == [7.0], f"the consumer stream read the tensor before the producer wrote it: {values}"


# ------------------------------------------------------------------ world size 1: error cases

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


@needs_cuda
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


@needs_cuda
def test_wrap_of_a_model_on_two_devices_is_a_clear_error():
    msg = run_workers(_mixed_devices_worker, 1, timeout=120)[0]
    assert msg is not None and "several devices" in msg


# ------------------------------------------------------------------ two GPUs: the collective itself

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
                for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                    t = (torch.arange(4099, device=dev) % 7 + rank).to(dtype)
                    fastar.all_reduce(t, hierarchy=h, algorithm=a, compression=comp)
                    out[(h, a, comp, str(dtype))] = t.cpu()
    return out


@multi_gpu
@pytest.mark.parametrize("local_size", [1, 2])
def test_two_gpus_every_hierarchy_algorithm_and_dtype_sums_exactly(local_size):
    res = run_workers(_two_gpu_allreduce_worker, 2, local_size, timeout=300)
    expect = sum((torch.arange(4099) % 7 + r).double() for r in range(2))  # small integers: exact in every dtype
    for r in range(2):
        for k, v in res[r].items():
            assert torch.equal(v.double(), expect), (r, k)


# ------------------------------------------------------------------ a skipped wait (NCCL; Gloo mirror)

def _delayed_allreduce_worker(rank, size, device, compression):
    """Allreduces that rank 1 enters a while after rank 0 (both leave a Gloo barrier, then rank 1
    sleeps), so that rank 0's receives cannot have arrived when it goes on: the first sets up the
    groups, the second runs on the real build, the next ones with the skip_wait fault. Each call's
    values differ from the previous call's (k * (rank + 1) in call k), so that a buffer left over
    from an earlier call cannot pass for this one's data. A loaded host may deschedule rank 0 for
    as long as the delay: the faulted call is retried with 1, 2, 4 and 8 s until some rank sees a
    wrong sum (the ranks agree on that over Gloo). Returns (result, exact sum) of the real call and
    of the last faulted one."""
    import torch.distributed as dist

    import fastar
    fastar.init(local_size=1)  # two "nodes": the flat schedule's send/recv steps, nothing intra-node
    dev = _set_device(rank) if device == "cuda" else torch.device("cpu")
    n = 4099
    kw = dict(hierarchy="flat", algorithm="halving_doubling", compression=compression, validate=False)
    fastar.all_reduce(torch.ones(n, device=dev), **kw)

    def delayed(k, fault, delay_s):
        t = torch.full((n,), k * (rank + 1.0), device=dev)
        if device == "cuda":
            torch.cuda.synchronize()
        _C._set_fault(fault)
        dist.barrier()  # rank 0 goes on at once, rank 1 only after the delay
        if rank == 1:
            time.sleep(delay_s)
        fastar.all_reduce(t, **kw)
        got = (t.cpu(), float(k * sum(r + 1 for r in range(size))))  # .cpu() is ordered after fastar
        _C._set_fault("")
        return got

    out = [delayed(2, "", 1.0)]
    for k, delay_s in ((3, 1.0), (4, 2.0), (5, 4.0), (6, 8.0)):
        got = delayed(k, "skip_wait", delay_s)
        wrong = torch.tensor([float(not torch.equal(got[0], torch.full_like(got[0], got[1])))])
        dist.all_reduce(wrong)
        if wrong.item() > 0:
            break
    out.append(got)
    return out


def check_sums(results):
    """results: (tensor, exact sum) per rank; every element must be the exact sum."""
    wrong = {r: t.unique().tolist()[:8] for r, (t, expect) in enumerate(results)
             if not torch.equal(t, torch.full_like(t, expect))}
    assert not wrong, f"ranks did not get the sum {results[0][1]}: values {wrong}"


def test_cpu_mirror_skipped_gloo_wait_fails_the_sum_check():
    """The CPU mirror of a skipped NCCL wait: the compressed CPU path is the same TensorAllreduce
    code over Gloo; with its waits skipped, rank 0 sums a receive buffer before the data arrived."""
    res = run_workers(_delayed_allreduce_worker, 2, "cpu", "bf16", timeout=240)
    check_sums([res[r][0] for r in range(2)])  # the real build: right, with the same delay
    with pytest.raises(AssertionError, match="did not get the sum"):
        check_sums([res[r][1] for r in range(2)])


@multi_gpu
def test_two_gpus_skipped_nccl_wait_fails_the_sum_check():
    res = run_workers(_delayed_allreduce_worker, 2, "cuda", None, timeout=300)
    check_sums([res[r][0] for r in range(2)])
    with pytest.raises(AssertionError, match="did not get the sum"):
        check_sums([res[r][1] for r in range(2)])
