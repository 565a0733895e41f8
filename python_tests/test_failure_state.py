"""Failure is a state of the communicator (issue 12): the first error fails every queued and later
operation at once, so a stalled peer costs one timeout, not one per bucket; fastar.set_timeout
reaches wrap's buckets; shutdown() + init() recover; operations are serialised, never run two at
a time on one transport; a late message cannot corrupt a later collective.
"""
from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
from torch import nn

from mp_utils import mark_done, run_workers, stay_until_done

TIMEOUT_S = 3
MARGIN_S = 15  # a fail-fast bound: timeout + 15 s, never a tight wall-clock figure
QUEUED = 10


def _many_buckets_model():
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(32, 32) for _ in range(24)])  # 48 tensors, ~4 KiB each


def _stall_worker(rank, n, local_size, staller, lower_after_wrap, folder):
    import fastar

    # a long init timeout, lowered after wrap: set_timeout must reach the buckets
    fastar.init(local_size=local_size, timeout=timedelta(seconds=60 if lower_after_wrap else TIMEOUT_S))
    model = fastar.wrap(_many_buckets_model(), bucket_cap_mb=0.004, first_bucket_mb=0.004)
    nb = model._engine.num_buckets()
    if lower_after_wrap:
        fastar.set_timeout(timedelta(seconds=TIMEOUT_S))
    model(torch.randn(2, 32)).sum().backward()  # one good step
    if rank == staller:
        # alive but not progressing (a stuck data loader, a debugger): the others must not wait
        # one timeout per bucket. It stays until they have raised (at most the time they are allowed).
        stay_until_done(folder, [r for r in range(n) if r != staller], TIMEOUT_S + MARGIN_S + 5)
        return "stalled", 0.0, nb
    t0 = time.monotonic()
    try:
        model(torch.randn(2, 32)).sum().backward()
        out = "no error", time.monotonic() - t0, nb
    except RuntimeError as e:
        out = str(e), time.monotonic() - t0, nb
    mark_done(folder, rank)
    return out


@pytest.mark.parametrize("n,local_size,lower_after_wrap", [(2, 2, False), (2, 2, True), (4, 2, True), (2, 1, True)],
                         ids=["1x2", "1x2-set_timeout", "2x2-set_timeout", "2x1-set_timeout"])
def test_stalled_peer_costs_one_timeout_not_one_per_bucket(n, local_size, lower_after_wrap, tmp_path):
    staller = n - 1
    res = run_workers(_stall_worker, n, local_size, staller, lower_after_wrap, str(tmp_path), timeout=150)
    for rank, (msg, took, nb) in enumerate(res):
        if rank == staller:
            continue
        assert nb >= 20
        assert msg != "no error"
        assert "timed out" in msg or "failed" in msg, msg
        assert took < TIMEOUT_S + MARGIN_S, f"rank {rank} took {took:.1f} s for {nb} buckets"


def _queued_worker(rank, n):
    import fastar

    fastar.init(local_size=n, timeout=timedelta(seconds=TIMEOUT_S))
    if rank == 1:
        time.sleep(TIMEOUT_S + 4)  # rank 0's first call times out meanwhile
    # 1 + QUEUED works: if each queued one waited a timeout of its own they would take QUEUED x 3 s = 30 s,
    # well past the fail-fast bound of timeout + 15 s that the test holds them to
    works = [fastar.all_reduce(torch.ones(1000), async_op=True) for _ in range(1 + QUEUED)]
    errors, times = [], []
    t0 = time.monotonic()
    for w in works:
        try:
            w.wait()
            errors.append("")
        except RuntimeError as e:
            errors.append(str(e))
        times.append(time.monotonic() - t0)
    try:
        fastar.all_reduce(torch.ones(3))
        later = ""
    except RuntimeError as e:
        later = str(e)
    fastar.shutdown()
    fastar.init(local_size=n, timeout=timedelta(seconds=30))
    t = torch.full((1000,), float(rank + 1))
    fastar.all_reduce(t)  # a new communicator works
    return errors, times, later, t[0].item()


def test_after_a_failure_queued_work_fails_at_once_and_shutdown_init_recovers():
    res = run_workers(_queued_worker, 2, timeout=120)
    errors, times, later, value = res[0]
    assert errors[0], "the first call should have timed out"
    assert all(errors), errors
    assert all("earlier collective failed" in e for e in errors[1:]), errors
    assert len(errors) == 1 + QUEUED and QUEUED * TIMEOUT_S > TIMEOUT_S + MARGIN_S
    assert times[-1] - times[0] < TIMEOUT_S + MARGIN_S, times  # the queued ones did not each wait a timeout
    assert "earlier collective failed" in later and "fastar.shutdown()" in later, later
    for _, _, _, v in res:
        assert v == 3.0


def _threads_worker(rank, n, local_size):
    import fastar

    fastar.init(local_size=local_size, timeout=timedelta(seconds=20))
    outcomes = {"ok": 0, "wrong": 0, "errors": []}
    lock = threading.Lock()

    def loop(size, calls):
        for _ in range(calls):
            t = torch.full((size,), float(rank + 1))
            try:
                fastar.all_reduce(t)
            except RuntimeError as e:
                with lock:
                    outcomes["errors"].append(str(e).splitlines()[0])
                return
            with lock:
                outcomes["ok" if bool((t == n * (n + 1) / 2).all()) else "wrong"] += 1
    threads = [threading.Thread(target=loop, args=(size, 30)) for size in (100, 5000)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    return outcomes


@pytest.mark.parametrize("local_size", [1, 2])
def test_two_threads_calling_all_reduce_never_give_a_wrong_sum(local_size):
    """Calls from two threads are serialised on each rank in the order they arrive; the ranks may
    order them differently, and then the per-call header (count, dtype) catches the mismatch:
    every call either sums right or raises, never a wrong sum."""
    for out in run_workers(_threads_worker, 2, local_size, timeout=150):
        assert out["wrong"] == 0, out
        assert out["ok"] > 0 or out["errors"], out
        for e in out["errors"]:
            assert "disagree" in e or "earlier collective failed" in e or "timed out" in e or "failed" in e, e


def _late_worker(rank, n):
    import fastar

    fastar.init(local_size=1, timeout=timedelta(seconds=TIMEOUT_S))
    mine = torch.full((4096,), float(rank + 1))
    if rank == 1:
        time.sleep(TIMEOUT_S + 2)  # sends after rank 0 has given up on this collective
    try:
        fastar.all_reduce(mine)
        first = ""
    except RuntimeError as e:
        first = str(e).splitlines()[0]
    fastar.shutdown()
    fastar.init(local_size=1, timeout=timedelta(seconds=30))
    sums = []
    for k in range(3):
        t = torch.full((4096,), float(10 * (k + 1) + rank))
        fastar.all_reduce(t)
        sums.append(bool((t == 20 * (k + 1) + 1).all()))
    return first, sums


def test_a_late_message_does_not_corrupt_the_next_collective():
    res = run_workers(_late_worker, 2, timeout=120)
    assert res[0][0], "rank 0's collective should have timed out"
    for first, sums in res:
        assert sums == [True, True, True], (first, sums)
