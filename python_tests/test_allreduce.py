"""The allreduce core (issue 2) on real processes over Gloo, flat hierarchy.

One spawn per world size; each worker loops over every (algorithm, dtype, count) case and reports
mismatches and a hash of its result bytes, so that the parent can check that every rank ended with
bitwise identical bytes. Data is integer-valued and small enough that every partial sum is exact
in the dtype, so the result must equal torch.distributed.all_reduce exactly.
"""
from __future__ import annotations

import hashlib
import time
import warnings
from datetime import timedelta

import pytest
import torch

from mp_utils import run_workers

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ALGOS = ("halving_doubling", "ring")
SMALL_COUNTS = (0, 1, 2, 7, 1000)
BIG = 2**20 + 3
WORLD_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 12)


def fill(count: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer values whose sums stay exact in `dtype` for up to 12 ranks (bf16: 8 mantissa bits,
    fp16: 11)."""
    i = torch.arange(count, dtype=torch.int64)
    if dtype == torch.bfloat16:
        v = (i % 3) + rank % 2                  # <= 3 per rank, <= 36 in all
    elif dtype == torch.float16:
        v = (i % 7) + rank % 5                  # <= 10 per rank, <= 120 in all
    else:
        v = (i % 13) * (rank + 1)               # <= 12 * 78 = 936 in all
    return v.to(dtype)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def big_dtypes(n: int):
    # The 4 MiB+ case is the slow one on a shared 2-core host: every dtype up to 4 ranks, then the
    # two extremes of element size.
    return DTYPES if n <= 4 else (torch.float32, torch.bfloat16)


def _cases_worker(rank, n):
    import torch.distributed as dist

    import fastar
    fastar.init(local_size=1, timeout=timedelta(seconds=60))
    errors, hashes = [], {}
    for algo in ALGOS:
        for dtype in DTYPES:
            counts = SMALL_COUNTS + ((BIG,) if dtype in big_dtypes(n) else ())
            for count in counts:
                key = f"{algo}/{dtype}/{count}"
                t = fill(count, rank, dtype)
                ref = t.clone()
                dist.all_reduce(ref)
                fastar.all_reduce(t, algorithm=algo, hierarchy="flat")
                if not torch.equal(t, ref):
                    bad = (t != ref).nonzero()
                    errors.append(f"rank {rank} {key}: {bad.numel()} elements differ from torch, first at "
                                  f"{bad[0].item()}: {t[bad[0]].item()} != {ref[bad[0]].item()}")
                last = fastar.explain()
                if count and f"flat:{algo}" not in last:
                    errors.append(f"rank {rank} {key}: explain() does not show flat:{algo}: {last}")
                hashes[key] = digest(t)
    # op="avg": every rank gets the same bytes, close to sum / n.
    for algo in ALGOS:
        for dtype in (torch.float32, torch.float64):
            t = fill(1000, rank, dtype)
            ref = t.clone()
            dist.all_reduce(ref)
            fastar.all_reduce(t, op="avg", algorithm=algo, hierarchy="flat")
            if not torch.allclose(t, ref / n, rtol=1e-6, atol=0):
                errors.append(f"rank {rank} avg {algo}/{dtype}: max error {(t - ref / n).abs().max().item()}")
            hashes[f"avg/{algo}/{dtype}"] = digest(t)
    # async_op: a handle whose wait() completes the collective.
    for algo in ALGOS:
        t = fill(1000, rank, torch.float32)
        ref = t.clone()
        dist.all_reduce(ref)
        work = fastar.all_reduce(t, algorithm=algo, hierarchy="flat", async_op=True)
        if work is None:
            errors.append(f"rank {rank}: async_op=True returned None")
            continue
        work.wait()
        if not work.is_completed():
            errors.append(f"rank {rank}: is_completed() is False after wait()")
        if not torch.equal(t, ref):
            errors.append(f"rank {rank} async {algo}: result differs from torch")
        hashes[f"async/{algo}"] = digest(t)
    # Several asyncs in flight at once finish in order with the right results.
    ts = [fill(c, rank, torch.float32) for c in (5, 1000, 3)]
    refs = [t.clone() for t in ts]
    for r in refs:
        dist.all_reduce(r)
    works = [fastar.all_reduce(t, algorithm="ring", hierarchy="flat", async_op=True) for t in ts]
    for w in works:
        w.wait()
    if not all(torch.equal(a, b) for a, b in zip(ts, refs)):
        errors.append(f"rank {rank}: concurrent async allreduces gave wrong results")
    dist.barrier()
    return errors, hashes


@pytest.mark.parametrize("n", WORLD_SIZES)
def test_allreduce_matches_torch_and_is_bitwise_identical(n):
    out = run_workers(_cases_worker, n, timeout=240)
    errors = [e for errs, _ in out for e in errs]
    assert not errors, "\n".join(errors[:20])
    hashes = [h for _, h in out]
    for key in hashes[0]:
        differing = {r: h[key] for r, h in enumerate(hashes) if h[key] != hashes[0][key]}
        assert not differing, f"{key}: ranks {sorted(differing)} differ from rank 0"
    # every world size ran every dtype and algorithm at every small count
    for algo in ALGOS:
        for dtype in DTYPES:
            for count in SMALL_COUNTS:
                assert f"{algo}/{dtype}/{count}" in hashes[0]


def _bad_input_worker(rank, n):
    import torch.distributed as dist

    import fastar
    fastar.init(local_size=1, timeout=timedelta(seconds=20))
    # non-contiguous
    with pytest.raises(ValueError, match="not contiguous"):
        fastar.all_reduce(torch.zeros(4, 6).t())
    # sparse
    with pytest.raises(ValueError, match="sparse"):
        fastar.all_reduce(torch.zeros(8).to_sparse())
    # not a tensor
    with pytest.raises(TypeError, match="torch.Tensor"):
        fastar.all_reduce([1.0, 2.0])
    # bad names
    with pytest.raises(ValueError, match="algorithm"):
        fastar.all_reduce(torch.zeros(4), algorithm="tree")
    with pytest.raises(ValueError, match="hierarchy"):
        fastar.all_reduce(torch.zeros(4), hierarchy="mesh")
    with pytest.raises(ValueError, match="op="):
        fastar.all_reduce(torch.zeros(4), op="max")
    # a device the group cannot carry (no GPU needed: the meta device has no data at all)
    with pytest.raises(ValueError, match="meta"):
        fastar.all_reduce(torch.zeros(4, device="meta"))
    # an unsupported dtype falls back to torch.distributed, says so, and is right
    t = torch.arange(10, dtype=torch.int64) * (rank + 1)
    with pytest.warns(UserWarning, match="torch.distributed"):
        fastar.all_reduce(t)
    assert torch.equal(t, torch.arange(10, dtype=torch.int64) * (n * (n + 1) // 2))
    # ... also asynchronously and with avg
    t = torch.full((3,), 2 * (rank + 1), dtype=torch.int32)
    w = fastar.all_reduce(t, op="avg", async_op=True)
    w.wait()
    assert t.tolist() == [(n * (n + 1)) // n] * 3
    # the communicator still works after all those rejections
    t = torch.ones(5)
    fastar.all_reduce(t)
    assert t.tolist() == [float(n)] * 5
    dist.barrier()
    return True


def test_bad_input_errors():
    assert run_workers(_bad_input_worker, 2, timeout=120) == [True, True]


def test_before_dist_initialised():
    import torch.distributed as dist

    import fastar
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialised.*init_process_group"):
        fastar.all_reduce(torch.zeros(3))
    with pytest.raises(RuntimeError, match="not initialised"):
        fastar.init()
    assert "not initialised" in fastar.explain()


def _mismatch_worker(rank, n, what, timeout_s):
    import torch.distributed as dist

    import fastar
    fastar.init(local_size=1, timeout=timedelta(seconds=timeout_s))
    count, dtype = 1000, torch.float32
    if rank == n - 1:
        if what == "count":
            count = 1001
        elif what == "zero":
            count = 0
        else:
            dtype = torch.float64
    t = torch.ones(count, dtype=dtype)
    t0 = time.monotonic()
    try:
        fastar.all_reduce(t, hierarchy="flat", algorithm="halving_doubling")
        err = None
    except Exception as e:  # noqa: BLE001 - reported to the parent
        err = str(e)
    return err, time.monotonic() - t0


@pytest.mark.parametrize("what", ["count", "dtype", "zero"])
def test_mismatched_ranks_error_everywhere(what):
    timeout_s = 6
    n = 4  # rank 0 is not a peer of rank 3 in halving/doubling: it must still fail, not hang
    got, failures = run_workers(_mismatch_worker, n, what, timeout_s, timeout=120, allow_failures=True)
    assert not failures, failures
    for rank in range(n):
        err, elapsed = got[rank]
        assert err is not None, f"rank {rank} did not get an error for a {what} mismatch"
        assert elapsed < timeout_s + 15, f"rank {rank} took {elapsed:.1f} s to fail"
        assert "rank" in err
    word = {"count": "element count", "dtype": "dtype", "zero": "element count"}[what]
    # the ranks that exchange headers with the odd rank say exactly what differs
    assert any(word in got[r][0] for r in range(n)), [got[r][0] for r in range(n)]
