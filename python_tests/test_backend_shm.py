"""The "fastar" torch.distributed backend's shared-memory segment (issue 23, item 7): the same
fallback as fastar.init (smaller staged chunks with fastar.init's warning; ShmSpaceError when even
the smallest does not fit), decided alike on every rank of the job, and a rank that cannot create
or open the segment makes every rank raise at once, naming it, instead of leaving its peers to the
timeout. docs/reliability.md (section 8) and docs/backend.md point here.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import warnings
from datetime import timedelta

import pytest
import torch

from mp_utils import run_workers
from test_hierarchical import fastar_segments, leaked
from test_user_environments import REPO, _can_unshare

TIMEOUT_S = 60  # the group's timeout: every failure below must come well before it
PROMPT_S = 25   # "promptly": after the last rank has entered init_process_group


def _init_fastar(rank, n, timeout_s=TIMEOUT_S):
    """init_process_group("fastar") with warnings recorded: (error or None, warnings, start, end)."""
    import torch.distributed as dist

    import fastar  # noqa: F401 - registers the backend
    t0 = time.time()
    err = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dist.init_process_group("fastar", rank=rank, world_size=n, timeout=timedelta(seconds=timeout_s))
        except Exception as e:  # noqa: BLE001 - reported to the test
            err = e
    return err, [str(w.message) for w in caught], t0, time.time()


# --- (a) 8 local ranks, DDP, in a 64 MiB /dev/shm ------------------------------------------------

def _int_batch(rank, step):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(-4, 5, (4, 6), generator=g).float()


def _ddp_small_shm_worker(rank, n, steps=2):
    """Unmodified DDP on the "fastar" default group. The loss is the sum of a Linear's outputs on
    integer-valued inputs: every rank's gradient is a small integer and their mean a multiple of
    1/n (n = 8), so the averaged gradients and the SGD steps are exact and compared with equality
    against the mean computed here from every rank's batch."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastar
    err, msgs, _, _ = _init_fastar(rank, n)
    if err is not None:
        raise err

    def model():
        torch.manual_seed(0)
        return nn.Linear(6, 3)
    ddp = DDP(model())
    ref = model()
    opts = [torch.optim.SGD(m.parameters(), lr=0.25) for m in (ddp, ref)]
    exact = True
    for step in range(steps):
        ddp(_int_batch(rank, step)).sum().backward()
        want = [torch.zeros_like(p) for p in ref.parameters()]
        for r in range(n):  # the mean, independently of any collective
            ref.zero_grad()
            ref(_int_batch(r, step)).sum().backward()
            for w, p in zip(want, ref.parameters()):
                w += p.grad
        for w, p in zip(want, ref.parameters()):
            p.grad = w / n
        exact &= all(torch.equal(a.grad, b.grad) for a, b in zip(ddp.parameters(), ref.parameters()))
        for o in opts:
            o.step()
            o.zero_grad()
    exact &= all(torch.equal(a, b) for a, b in zip(ddp.parameters(), ref.parameters()))
    be = fastar.backend.get_backend()
    native = len(be.records())
    chunk = getattr(be, "shm_chunk_bytes", None)
    has_shm = be.communicator.has_shm()
    dist.destroy_process_group()
    warned = any("/dev/shm is too small" in m and "Falling back to the staged shared-memory path" in m for m in msgs)
    return exact, native, chunk, has_shm, warned


CONTAINER_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    os.environ.pop("FASTAR_SHM_CHUNK_MB", None)  # the default 4 MiB chunks: 73 MiB for 8 local ranks
    os.environ.pop("FASTAR_LOCAL_SIZE", None)  # the node found as a user's would be (host names)
    from mp_utils import run_workers
    from test_backend_shm import _ddp_small_shm_worker
    for exact, native, chunk, has_shm, warned in run_workers(_ddp_small_shm_worker, 8, init_dist=False,
                                                             timeout=400):
        print("RESULT", exact, native, chunk, has_shm, warned)
    print("LEFT", sorted(n for n in os.listdir("/dev/shm") if n.startswith("fastar_")))
""")


@pytest.mark.skipif(_can_unshare() is not None, reason=str(_can_unshare()))
@pytest.mark.timeout(500)
def test_ddp_on_8_local_ranks_in_a_64_mib_dev_shm():
    """Docker's default /dev/shm (a real 64 MiB tmpfs in a private mount namespace): 8 local ranks
    on init_process_group("fastar") cannot have the default arena (73 MiB); every rank falls back
    to smaller chunks with fastar.init's warning, and unmodified DDP averages exactly."""
    script = CONTAINER_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} -c \"$0\"", script]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=480, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr[-6000:]
    results = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 8, p.stdout + p.stderr[-6000:]
    chunks = {r[2] for r in results}
    assert len(chunks) == 1 and int(chunks.pop()) < 4 << 20, p.stdout  # one, smaller chunk on every rank
    for exact, native, _, has_shm, warned in results:
        assert exact == "True" and int(native) > 0 and has_shm == "True" and warned == "True", p.stdout
    assert "LEFT []" in p.stdout, p.stdout


# --- (b) a rank that cannot open the segment ------------------------------------------------------

def _open_fails_worker(rank, n, bad_rank):
    """Rank `bad_rank` (not a creator) fails to open its node's segment: a test-only stand-in for
    fastar._C.Communicator that raises as ShmArena does when shm_open fails."""
    from fastar import _C
    real = _C.Communicator

    def communicator(**kw):
        if kw["shm_name"] and not kw["shm_create"] and rank == bad_rank:
            raise RuntimeError(f"fastar shm: cannot open {kw['shm_name']}: Permission denied (injected by the test)")
        return real(**kw)
    _C.Communicator = communicator
    try:
        err, _, t0, t1 = _init_fastar(rank, n)
    finally:
        _C.Communicator = real
    return type(err).__name__ if err else None, str(err or ""), t0, t1


@pytest.mark.timeout(240)
def test_a_rank_that_cannot_open_the_segment_fails_every_rank_promptly():
    """2 nodes x 2 ranks: rank 3 (node 1's second rank) cannot open the segment. Every rank of the
    job, node 0's included, raises with rank 3's reason soon after the last rank arrived, not after
    the group's 60 s timeout; no segment is left behind."""
    before = fastar_segments()
    res = run_workers(_open_fails_worker, 4, 3, init_dist=False, env={"FASTAR_LOCAL_SIZE": "2"}, timeout=200)
    last_start = max(r[2] for r in res)
    for rank, (kind, msg, _, t1) in enumerate(res):
        assert kind == "RuntimeError", (rank, kind, msg)
        assert "rank 3" in msg and "cannot open" in msg and "injected by the test" in msg, (rank, msg)
        assert t1 - last_start < PROMPT_S, (rank, t1 - last_start, msg)
    assert not leaked(before, set()), leaked(before, set())


# --- one node's /dev/shm smaller than the others' -----------------------------------------------

def _one_node_small_worker(rank, n, limit):
    """Node 1's creator (rank 2) has a smaller /dev/shm (fault injection: reservations above
    `limit` fail). Returns the init outcome, the chunk, and an allreduce of integers."""
    import torch.distributed as dist

    import fastar
    from fastar import _C
    if rank == 2:
        _C._set_shm_reserve_limit(limit)
    err, msgs, t0, t1 = _init_fastar(rank, n)
    if err is not None:
        return type(err).__name__, str(err), t0, t1, None, None, msgs
    be = fastar.backend.get_backend()
    total = 0
    for numel in (7, 3000, 300_000):  # the latency, staged and chunked sizes
        t = torch.full((numel,), float(rank + 1))
        dist.all_reduce(t)
        total += int((t != n * (n + 1) / 2).sum())
    dist.destroy_process_group()
    return None, "", t0, t1, getattr(be, "shm_chunk_bytes", None), total, msgs


def _segment_bytes(local_size: int, chunk: int) -> int:
    """The staged arena's size for this node size and chunk, read from the error of a reservation
    refused by the test hook."""
    from fastar import _C
    import re
    _C._set_shm_reserve_limit(0)
    try:
        _C._open_segment(f"/fastar_probe_{os.getpid()}", True, 0, local_size, chunk)
    except RuntimeError as e:
        m = re.search(r"cannot reserve ([0-9.]+) MiB", str(e))
        return int(float(m.group(1)) * (1 << 20))
    finally:
        _C._set_shm_reserve_limit(-1)
    raise AssertionError("the reservation was not refused")


@pytest.mark.timeout(240)
def test_one_node_with_less_shared_memory_sets_the_chunk_for_every_node():
    """Node 1 cannot hold the default 4 MiB-chunk arena but can hold the 1 MiB one: both nodes run
    1 MiB chunks (mismatched chunks would be mismatched schedules), every allreduce is exact, and
    every rank warns as fastar.init does."""
    limit = (_segment_bytes(2, 1 << 20) + _segment_bytes(2, 4 << 20)) // 2
    res = run_workers(_one_node_small_worker, 4, limit, init_dist=False, env={"FASTAR_LOCAL_SIZE": "2"},
                      timeout=200)
    for rank, (kind, msg, _, _, chunk, wrong, msgs) in enumerate(res):
        assert kind is None, (rank, msg)
        assert chunk == 1 << 20 and wrong == 0, (rank, chunk, wrong)
        assert any("rank 2" in m and "/dev/shm is too small" in m and "1024 KiB chunks" in m for m in msgs), msgs


@pytest.mark.timeout(240)
def test_no_node_fits_any_arena_raises_shm_space_error_on_every_rank():
    """Node 1's /dev/shm cannot hold even the 256 KiB-chunk arena: as fastar.init, every rank of
    the job (node 0's too) raises ShmSpaceError naming rank 2, what it needs and what to do, promptly."""
    before = fastar_segments()
    res = run_workers(_one_node_small_worker, 4, 64 << 10, init_dist=False, env={"FASTAR_LOCAL_SIZE": "2"},
                      timeout=200)
    last_start = max(r[2] for r in res)
    for rank, (kind, msg, _, t1, *_rest) in enumerate(res):
        assert kind == "ShmSpaceError", (rank, kind, msg)
        assert "rank 2" in msg and "/dev/shm is too small" in msg and "--shm-size" in msg, (rank, msg)
        assert t1 - last_start < PROMPT_S, (rank, t1 - last_start)
    assert not leaked(before, set()), leaked(before, set())
