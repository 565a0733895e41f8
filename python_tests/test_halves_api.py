"""fastar.reduce_scatter_single and fastar.all_gather_single: the two halves of fastar's allreduce
as public calls of their own (issue 24's halves, measured against Open MPI by bench/halves_bw.py).

Checked here: exact results for every dtype, op and size class on one node (the arena's slots and
the single-copy protocol), across nodes (the network schedule) and on both at once; the protocol each
call ran; async calls and a user's subgroup; every mistake a clear ValueError/TypeError before
anything runs, with the communicator still healthy after it; ops, dtypes and devices fastar does not
run taken by torch.distributed with a warning; ranks that make different calls raise on every rank
within one timeout.
"""
from __future__ import annotations

import time
import warnings
from datetime import timedelta

import pytest
import torch

from mp_utils import run_workers

TIMEOUT_S = 6
MARGIN_S = 15  # a fail-fast bound: timeout + 15 s

# layout -> (world size, local size)
LAYOUTS = {"1x2": (2, 2), "1x3": (3, 3), "2x1": (2, 1), "2x2": (4, 2)}
# elements per rank: one, a small call, one past the halves' single-copy floor at two ranks (16 KiB
# whole), and a call of several pipeline chunks
SHARDS = (1, 1000, 70000, 300000)


def _values(rank: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Small integers: every sum is exact in every dtype, so results must match bit for bit."""
    return (torch.arange(numel, dtype=torch.float64) % 5 + rank).to(dtype)


def _exact_worker(rank, world, local_size):
    import torch.distributed as dist

    import fastar
    from fastar import state

    fastar.init(local_size=local_size, timeout=timedelta(seconds=60))
    comm = state.current().comm
    protocols = set()
    for shard in SHARDS:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            if dtype in (torch.bfloat16, torch.float16) and shard > 1000:
                continue  # the 16-bit sums are the same code at every size (test_single_copy, core tests)
            inp = _values(rank, world * shard, dtype)
            want = sum(_values(r, world * shard, torch.float64) for r in range(world))[rank * shard:(rank + 1) * shard]
            out = torch.empty(shard, dtype=dtype)
            fastar.reduce_scatter_single(out, inp)
            assert torch.equal(out.double(), want), (shard, dtype, "sum")
            protocols.add(("reduce_scatter", shard, comm.last_op()["protocol"]))
            fastar.reduce_scatter_single(out, inp, op="avg")
            assert torch.allclose(out.double(), want / world, rtol=1e-2 if dtype.itemsize == 2 else 1e-6), \
                (shard, dtype, "avg")
            assert torch.equal(inp, _values(rank, world * shard, dtype)), "the input is left as it was"
        for dtype in (torch.float32, torch.int64, torch.uint8):  # an allgather moves bytes, of any dtype
            mine = _values(rank, shard, torch.float64).to(dtype)
            out = torch.empty(world * shard, dtype=dtype)
            fastar.all_gather_single(out, mine)
            want = torch.cat([_values(r, shard, torch.float64).to(dtype) for r in range(world)])
            assert torch.equal(out, want), (shard, dtype, "allgather")
            protocols.add(("allgather", shard, comm.last_op()["protocol"]))
    # async: queued, complete after wait(); the result names the output
    inp = _values(rank, world * 1000, torch.float32)
    out = torch.empty(1000)
    work = fastar.reduce_scatter_single(out, inp, async_op=True)
    work.wait()
    assert work.is_completed() and work.result()[0] is out
    assert torch.equal(out.double(), sum(_values(r, world * 1000, torch.float64) for r in range(world))[
        rank * 1000:(rank + 1) * 1000])
    gathered = torch.empty(world * 1000)
    fastar.all_gather_single(gathered, out, async_op=True).wait()
    assert torch.equal(gathered.view(world, 1000)[rank], out)
    # a user's subgroup of ranks 0 and 1 (a flat communicator over that group)
    sub = dist.new_group([0, 1])
    if rank in (0, 1):
        o = torch.empty(500)
        fastar.reduce_scatter_single(o, _values(rank, 1000, torch.float32), group=sub)
        assert torch.equal(o, (_values(0, 1000, torch.float32) + _values(1, 1000, torch.float32))[rank * 500:(rank + 1) * 500])
    dist.barrier()
    return {"protocols": sorted(protocols), "single_copy": state.current().node.single_copy}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_exact_on_every_layout(layout):
    world, local = LAYOUTS[layout]
    res = run_workers(_exact_worker, world, local, timeout=300, env={"FASTAR_LOCAL_SIZE": str(local)})
    ran = {(c, s): p for c, s, p in res[0]["protocols"]}
    for coll in ("reduce_scatter", "allgather"):
        for shard in SHARDS:
            nbytes = world * shard * 4
            if local == 1:
                want = "network"  # one rank a node: the schedule's half over every rank
            elif world != local:
                want = "halves"  # several nodes: the slots in each node (single copy is for one node)
            elif res[0]["single_copy"] and local == 2 and nbytes >= 16 << 10:
                want = "single_copy"  # two ranks on one node: from 16 KiB
            else:
                want = "halves"
            assert ran[(coll, shard)] == want, (layout, coll, shard, ran)


def _mistakes_worker(rank, world):
    import torch.distributed as dist

    import fastar

    fastar.init(local_size=world, timeout=timedelta(seconds=60))
    errors = {}

    def expect(exc, key, fn):
        with pytest.raises(exc) as e:
            fn()
        errors[key] = str(e.value)

    expect(ValueError, "size", lambda: fastar.reduce_scatter_single(torch.empty(3), torch.empty(3 * world + 1)))
    expect(ValueError, "ag_size", lambda: fastar.all_gather_single(torch.empty(5), torch.empty(3)))
    expect(ValueError, "strided", lambda: fastar.reduce_scatter_single(torch.empty(4), torch.empty(4 * world, 2)[:, 0]))
    expect(ValueError, "sparse", lambda: fastar.all_gather_single(torch.empty(2 * world, 2),
                                                                   torch.eye(2).to_sparse()))
    expect(ValueError, "dtypes", lambda: fastar.reduce_scatter_single(torch.empty(4, dtype=torch.float64),
                                                                      torch.empty(4 * world)))
    expect(TypeError, "type", lambda: fastar.all_gather_single([0.0] * world, torch.empty(1)))
    expect(ValueError, "op", lambda: fastar.reduce_scatter_single(torch.empty(4), torch.empty(4 * world), op="median"))
    # what fastar does not run goes to torch.distributed (said once), with the same answer
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        oi = torch.empty(3, dtype=torch.int64)
        fastar.reduce_scatter_single(oi, torch.arange(3 * world, dtype=torch.int64) + rank)
        om = torch.empty(3)
        fastar.reduce_scatter_single(om, torch.arange(3.0 * world) * (rank + 1), op=dist.ReduceOp.MAX)
    full = torch.arange(3 * world, dtype=torch.int64)
    assert torch.equal(oi, (full * world + sum(range(world)))[rank * 3:(rank + 1) * 3]), oi
    assert torch.equal(om, (full.float() * world)[rank * 3:(rank + 1) * 3]), om
    said = [str(w.message) for w in seen]
    assert any("dtype torch.int64" in m and "torch.distributed.reduce_scatter_single" in m for m in said), said
    assert any("op" in m and "MAX" in m.upper() for m in said), said
    # after every mistake the communicator is healthy
    out = torch.empty(4)
    fastar.reduce_scatter_single(out, torch.ones(4 * world))
    assert torch.equal(out, torch.full((4,), float(world)))
    return errors


def test_mistakes_raise_clearly_and_fallbacks_are_exact():
    res = run_workers(_mistakes_worker, 2, timeout=120, env={"FASTAR_LOCAL_SIZE": "2"})
    e = res[0]
    assert "input must hold world size (2) x the output's 3 elements = 6, not 7" in e["size"], e
    assert "output must hold world size (2) x the input's 3 elements = 6, not 5" in e["ag_size"], e
    assert "not contiguous" in e["strided"] and "sparse" in e["sparse"], e
    assert "torch.float32" in e["dtypes"] and "torch.float64" in e["dtypes"], e
    assert "expected a torch.Tensor, got list" in e["type"], e
    assert "op='median' is not supported" in e["op"], e


def _refused_worker(rank, world):
    import fastar
    from fastar import groups, policy, state

    fastar.init(local_size=world, timeout=timedelta(seconds=60))
    st = state.current()
    native = groups.native_plan(policy.plan(4 * world * 4, 4, st.node, collective="reduce_scatter"))
    refused = []
    # The communicator's own checks (what the backend and the fast entries rely on): a tensor it
    # does not run is refused before anything runs, and the communicator stays healthy.
    for out, inp in ((torch.empty(4), torch.empty(4 * world + 1)),  # a size that does not match
                     (torch.empty(4), torch.empty(4 * world, dtype=torch.float64)),  # two dtypes
                     (torch.empty(4, dtype=torch.int32), torch.empty(4 * world, dtype=torch.int32)),  # not summed
                     (torch.empty(4), torch.empty(4 * world, 2)[:, 0])):  # strided
        with pytest.raises(ValueError) as e:
            st.comm.reduce_scatter(out, inp, native, False, True, False)
        refused.append(str(e.value))
    out = torch.empty(4)
    st.comm.reduce_scatter(out, torch.ones(4 * world), native, False, True, False)
    assert torch.equal(out, torch.full((4,), float(world)))
    return refused


def test_a_refused_tensor_leaves_the_communicator_healthy():
    """Before the fix the communicator checked the tensors inside the call, so a wrong size failed it
    for good (every later call raised that error)."""
    res = run_workers(_refused_worker, 2, timeout=120, env={"FASTAR_LOCAL_SIZE": "2"})
    assert "must hold world size (2) x 4 elements" in res[0][0], res[0]
    assert "does not sum this dtype" in res[0][2], res[0]


def _disagree_worker(rank, world, how):
    import fastar

    fastar.init(local_size=2 if how != "2x1" else 1, timeout=timedelta(seconds=TIMEOUT_S))
    n = 1000 + (rank if how != "kind" else 0)
    t0 = time.monotonic()
    try:
        if how == "kind" and rank == 1:
            fastar.all_gather_single(torch.empty(2 * n), torch.ones(n))
        else:
            fastar.reduce_scatter_single(torch.empty(n), torch.ones(2 * n))
    except RuntimeError as e:
        return time.monotonic() - t0, str(e)
    return time.monotonic() - t0, None


@pytest.mark.parametrize("how", ["size", "kind", "2x1"])
def test_ranks_that_disagree_raise_on_every_rank(how):
    res = run_workers(_disagree_worker, 2, how, timeout=120, env={"FASTAR_LOCAL_SIZE": "1" if how == "2x1" else "2"})
    for rank, (took, err) in enumerate(res):
        assert err is not None, f"rank {rank} returned a result from calls that differ ({how})"
        assert took < TIMEOUT_S + MARGIN_S, (rank, took, err)
