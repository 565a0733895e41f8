"""The latency path (issue 16; since issue 24 the latency protocol of the one plan, run inline by
Communicator.allreduce, the one entry): fastar.all_reduce of a small CPU tensor on one node runs
with no header exchange. These tests check that it gives the general
path's answers, that it still catches ranks that disagree and dead ranks (the arena's descriptor
check and liveness checks stand in for the header), that it steps aside for what it does not take,
and that the one-node pipeline (in-place slice, partial copy-in/out, streaming stores) is exact.
"""
from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch

from mp_utils import run_workers
from test_hierarchical import fastar_segments, leaked

TIMEOUT_S = 6


def _values(rank, n, numel, dtype):
    return (torch.arange(numel, dtype=torch.float64) % 7 + rank).to(dtype)


def _fast_worker(rank, n):
    import fastar
    from fastar import state
    fastar.init()
    st = state.get_state()
    out = []
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        es = torch.empty((), dtype=dtype).element_size()
        # the block edges of the small region: one block up to 4 KiB, 4 KiB blocks up to 64 KiB
        # (32 KiB + one element: 9 blocks, the last short; 64 KiB: all 16 blocks)
        for numel in (0, 1, 5, 1000, 4096, (32 << 10) // es + 1, (64 << 10) // es):
            for op in ("sum", "avg", torch.distributed.ReduceOp.SUM, torch.distributed.ReduceOp.AVG):
                t = _values(rank, n, numel, dtype)
                want = sum(_values(r, n, numel, torch.float64) for r in range(n))
                if op in ("avg", torch.distributed.ReduceOp.AVG):
                    want = want / n
                fastar.all_reduce(t, op=op)
                assert st.choice_record is state.LATENCY_PATH, (dtype, numel, op)
                tol = 0 if dtype in (torch.float32, torch.float64) else 1e-2
                assert torch.allclose(t.double(), want, atol=tol, rtol=tol), (dtype, numel, op)
    out.append(st.last_choice["hierarchy"])
    out.append(fastar.explain())
    # what the latency path does not take goes the general way, with the same answers
    big = torch.ones(1 << 20)  # 4 MiB: above the one-phase size
    fastar.all_reduce(big)
    assert st.choice_record is not state.LATENCY_PATH and big[0].item() == n
    strided = torch.ones(64, 2)[:, 0]
    with pytest.raises(ValueError, match="not contiguous"):
        fastar.all_reduce(strided)
    ints = torch.ones(16, dtype=torch.int32)
    with pytest.warns(UserWarning, match="torch.distributed.all_reduce instead"):
        fastar.all_reduce(ints)
    assert ints[0].item() == n
    w = fastar.all_reduce(torch.ones(8), async_op=True)  # async: the queue, not the latency path
    w.wait()
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_latency_path_matches_general_path(n):
    res = run_workers(_fast_worker, n, timeout=240, env={"FASTAR_LOCAL_SIZE": str(n)})
    for hier, explained in res:
        assert hier == "leader"
        assert "latency path" in explained


def _disagree_worker(rank, n, what):
    import fastar
    fastar.init(timeout=timedelta(seconds=TIMEOUT_S))
    fastar.all_reduce(torch.ones(4))  # a good call first
    if what == "count":
        t = torch.ones(10 + rank)
    elif what == "path":  # rank 0 on the latency path, rank 1 on the staged one (4 MiB)
        t = torch.ones(10 if rank == 0 else 1 << 20)
    else:
        t = torch.ones(10, dtype=torch.float32 if rank == 0 else torch.float64)
    t0 = time.monotonic()
    try:
        fastar.all_reduce(t)
    except RuntimeError as e:
        return str(e), time.monotonic() - t0
    return None, time.monotonic() - t0


@pytest.mark.parametrize("what", ["count", "dtype", "path"])
def test_latency_path_disagreeing_ranks_error(what):
    res = run_workers(_disagree_worker, 2, what, timeout=120, env={"FASTAR_LOCAL_SIZE": "2"})
    for rank, (err, secs) in enumerate(res):
        assert err is not None, f"rank {rank} got no error"
        assert "disagree" in err and ("element count" in err or "dtype" in err), err
        assert secs < TIMEOUT_S + 15


def _dead_peer_worker(rank, n):
    import fastar
    fastar.init(timeout=timedelta(seconds=TIMEOUT_S))
    pid = os.getpid()
    fastar.all_reduce(torch.ones(4))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        fastar.all_reduce(torch.ones(4))
    except RuntimeError as e:
        msg = str(e)
        # later calls fail at once with the first error
        t1 = time.monotonic()
        with pytest.raises(RuntimeError, match="earlier collective failed"):
            fastar.all_reduce(torch.ones(4))
        return msg, t1 - t0, time.monotonic() - t1, pid
    return None, time.monotonic() - t0, 0, pid


def test_latency_path_dead_peer():
    before = fastar_segments()
    res, failures = run_workers(_dead_peer_worker, 2, timeout=120, env={"FASTAR_LOCAL_SIZE": "2"},
                                allow_failures=True)
    assert 1 in failures and 0 in res, (res, failures)
    err, secs, again, pid = res[0]
    assert err is not None and "exited" in err and "rank 1" in err, err
    assert secs < TIMEOUT_S + 15
    assert again < TIMEOUT_S  # the sticky first error at once (the match above), not a new call timing out
    assert not leaked(before, {pid})


def _pipeline_worker(rank, n, numel):
    import fastar
    from fastar import state
    fastar.init()
    wrong = []
    for stream_above in (1 << 62, 0):  # cached stores (the default), then streaming stores at every size
        fastar.policy.set_tuning(stream_above_bytes=stream_above)
        t = _values(rank, n, numel, torch.float32)
        fastar.all_reduce(t, hierarchy="leader", algorithm="halving_doubling")
        want = sum(_values(r, n, numel, torch.float64) for r in range(n)).float()
        wrong.append(int((t != want).sum()))
    return wrong


@pytest.mark.parametrize("n,numel", [(2, (5 << 20) + 3), (3, (512 << 10) * 3 + 1)])
def test_one_node_pipeline_exact(n, numel):
    """Several 512 KiB chunks, uneven slices, with and without the streaming copy-out: every
    element equals the exact sum on every rank."""
    res = run_workers(_pipeline_worker, n, numel, timeout=240,
                      env={"FASTAR_LOCAL_SIZE": str(n), "FASTAR_SINGLE_COPY": "0"})  # the slots' pipeline
    assert all(v == [0, 0] for v in res), res


def test_core_round_trip():
    """The bench's host figure: a positive round trip between two cores, -1 for a core that does
    not exist (no hang)."""
    from fastar import _C
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one core: no round trip between two cores to measure")
    assert 0 < _C.core_round_trip_ns(cpus[0], cpus[1], 2000) < 1e6
    assert _C.core_round_trip_ns(cpus[0], 4096, 10) == -1
