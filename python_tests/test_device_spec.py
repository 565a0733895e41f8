"""init_process_group("cpu:fastar"): a device string that names fastar for CPU tensors only, at world
size 2 (at world size 1 every collective is the identity, so a call handed to another backend, or
not run at all, would pass). Every rank sends different data; the results are exact sums, and the
backend's op record shows that fastar ran each native call. ("cpu:fastar,cuda:nccl" needs a GPU:
test_backend.py.)"""
from __future__ import annotations

from datetime import timedelta

import torch

from mp_utils import run_workers


def _device_spec_worker(rank, n, spec):
    import torch.distributed as dist

    import fastar
    dist.init_process_group(spec, rank=rank, world_size=n, timeout=timedelta(seconds=30))
    be = fastar.backend.get_backend()  # raises unless the group's CPU backend is fastar's
    out = {"backend": dist.get_backend(), "records": []}
    ranks_sum = n * (n - 1) // 2

    def native(what, fn):
        """fn() once; the names of the op records it added (fastar's native collectives only)."""
        before = len(be.records())
        got = fn()
        out["records"].append((what, [r["name"].split()[0] for r in be.records()[before:]]))
        return got

    for numel in (7, 300_001):  # the latency path, and a call queued to the communicator
        base = torch.arange(numel, dtype=torch.float32) % 13
        t = base + rank
        native(f"all_reduce sum {numel}", lambda: dist.all_reduce(t))
        assert torch.equal(t, base * n + ranks_sum), f"rank {rank}: all_reduce of {numel} is not the sum"
        t = base * n + 2 * rank
        native(f"all_reduce avg {numel}", lambda: dist.all_reduce(t, op=dist.ReduceOp.AVG))
        assert torch.equal(t, base * n + 2 * ranks_sum / n), f"rank {rank}: all_reduce AVG of {numel}"
    for numel in (6, 1 << 19):  # inline halves, and queued ones (> 1 MiB)
        per = numel // n
        inp = torch.arange(numel, dtype=torch.float32) % 11 + 10 * rank
        shard = torch.empty(per)
        native(f"reduce_scatter {numel}", lambda: dist.reduce_scatter_tensor(shard, inp))
        want = (torch.arange(numel, dtype=torch.float32) % 11)[rank * per:(rank + 1) * per] * n + 10 * ranks_sum
        assert torch.equal(shard, want), f"rank {rank}: reduce_scatter of {numel} is not the sum"
        mine = torch.full((per,), float(rank + 1))
        whole = torch.empty(numel)
        native(f"all_gather {numel}", lambda: dist.all_gather_into_tensor(whole, mine))
        assert torch.equal(whole, torch.arange(1, n + 1, dtype=torch.float32).repeat_interleave(per)), \
            f"rank {rank}: all_gather of {numel}"
    b = torch.full((5,), float(rank))
    dist.broadcast(b, src=1)  # delegated to Gloo inside the backend: right, and no record
    assert torch.equal(b, torch.ones(5)), f"rank {rank}: broadcast from rank 1 gave {b}"
    dist.destroy_process_group()
    return out


def test_cpu_fastar_at_world_size_2_sums_natively():
    for rank, out in enumerate(run_workers(_device_spec_worker, 2, "cpu:fastar", init_dist=False, timeout=120)):
        assert out["backend"] == "cpu:fastar", out["backend"]
        want = {"all_reduce": "fastar::allreduce", "reduce_scatter": "fastar::reduce_scatter",
                "all_gather": "fastar::allgather"}
        assert len(out["records"]) == 8, out["records"]
        for what, names in out["records"]:
            assert names == [want[what.split()[0]]], f"rank {rank}: {what} ran {names}, not one fastar call"
