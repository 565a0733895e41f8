"""fastar as a torch.distributed backend (issue 14): every collective on a "fastar" process group
against the same call on a Gloo group of the same ranks, exact on integer-valued data; DDP on
"fastar" against DDP on Gloo; errors. One spawn per world: each worker runs many checks.
"""
from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta

import pytest
import torch

from mp_utils import run_workers
from test_hierarchical import fastar_segments, leaked

TIMEOUT_S = 20


def _init(rank, n, timeout_s=TIMEOUT_S, spec="fastar"):
    import torch.distributed as dist

    import fastar
    assert os.path.dirname(os.path.dirname(fastar.__file__)) == os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), f"testing the wrong fastar: {fastar.__file__}"
    kw = {}
    if spec.startswith("tcp://"):  # an explicit init_method instead of env://
        spec, kw["init_method"] = "fastar", f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}"
    dist.init_process_group(spec, rank=rank, world_size=n, timeout=timedelta(seconds=timeout_s), **kw)
    return dist, fastar


def _ints(shape, rank, seed, dtype=torch.float32):
    """Integer values in -8..8, different on every rank: sums are exact in every float dtype."""
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randint(-8, 9, shape, generator=g).to(dtype)


def _same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    assert torch.equal(a, b), f"{what}: differs from Gloo at {(a != b).nonzero()[:5].tolist()}: {a.flatten()[:8]} vs {b.flatten()[:8]}"


def _same_avg(a, sums, n, what):
    """fastar's AVG is the exact sum times 1/n: exact when n is a power of two, else within rounding."""
    if n & (n - 1) == 0:
        _same(a, sums / n, what)
    else:
        torch.testing.assert_close(a, sums / n, msg=lambda m: f"{what}: {m}")


# -- which path each call took (FastarBackend.path_counts) ------------------------------------------

def _ran(be, call):
    """The (method, path) counts that call() added to the backend's path_counts."""
    before = be.path_counts()
    out = call()
    after = be.path_counts()
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}, out


def _path_forms(dist, rank, n, fast: bool):
    """Every collective form the backend takes: (label, {(method, path): calls} expected on this
    rank, fn(group) -> result tensors, ref(gloo group) -> the reference, or None: fn(gloo)).
    fast: the latency path is there (one node with shared memory): small float allreduces take it."""
    small, large = 1024, 1 << 16  # 4 KiB (latency path: up to 64 KiB) and 256 KiB of fp32
    lat = "latency" if fast else "native"
    R = dist.ReduceOp
    forms = []

    def add(label, expect, fn, ref=None):
        forms.append((label, expect if isinstance(expect, dict) else {expect: 1}, fn, ref))

    def allreduce(numel, dtype, op, seed):
        def fn(g):
            t = _ints((numel,), rank, seed, dtype)
            if op == R.PRODUCT:
                t = t.clamp(1, 2)
            dist.all_reduce(t, op=op, group=g)
            return [t]
        return fn

    def avg_ref(numel, dtype, seed):  # Gloo has no AVG: its exact sum, divided
        def ref(g):
            t = _ints((numel,), rank, seed, dtype)
            dist.all_reduce(t, group=g)
            return [t]  # compared as an average of these sums
        return ref

    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16, torch.float64)):
        add(f"all_reduce sum small {dtype}", ("allreduce", lat), allreduce(small, dtype, R.SUM, 300 + i))
        add(f"all_reduce avg small {dtype}", ("allreduce", lat), allreduce(small, dtype, R.AVG, 310 + i),
            avg_ref(small, dtype, 310 + i))
    for i, dtype in enumerate((torch.float32, torch.float16)):
        add(f"all_reduce sum large {dtype}", ("allreduce", "native"), allreduce(large, dtype, R.SUM, 320 + i))
        add(f"all_reduce avg large {dtype}", ("allreduce", "native"), allreduce(large, dtype, R.AVG, 330 + i),
            avg_ref(large, dtype, 330 + i))
    for i, op in enumerate((R.MIN, R.MAX, R.PRODUCT)):
        add(f"all_reduce {op} (fallback)", ("allreduce", "delegated"), allreduce(small, torch.float32, op, 340 + i))
    add("all_reduce sum int64 (fallback)", ("allreduce", "delegated"), allreduce(33, torch.int64, R.SUM, 350))

    def int_avg(g):  # AVG on the Gloo fallback: Gloo's sum, divided; the sum is a multiple of n here
        t = _ints((33,), 0, 351, torch.int64) + (rank if rank < n - 1 else -(n - 1) * (n - 2) // 2)
        dist.all_reduce(t, op=R.AVG, group=g)
        return [t]

    def int_avg_ref(g):
        t = _ints((33,), 0, 351, torch.int64) + (rank if rank < n - 1 else -(n - 1) * (n - 2) // 2)
        dist.all_reduce(t, group=g)
        assert torch.equal(t % n, torch.zeros_like(t)), t
        return [t // n]
    add("all_reduce avg int64 (Gloo fallback: sum, then divided)", ("allreduce", "delegated"), int_avg, int_avg_ref)

    def coalesced(numel, op, dtype, seed):
        def fn(g):
            ts = [_ints((numel, 3), rank, seed, dtype), _ints((numel + 5,), rank, seed + 1, dtype)]
            dist.all_reduce_coalesced(ts, op=op, group=g)
            return ts
        return fn
    add("all_reduce_coalesced small", ("allreduce_coalesced", lat), coalesced(100, R.SUM, torch.float32, 360))
    add("all_reduce_coalesced large", ("allreduce_coalesced", "native"), coalesced(large, R.SUM, torch.float32, 362))
    add("all_reduce_coalesced max (fallback)", ("allreduce_coalesced", "delegated"),
        coalesced(100, R.MAX, torch.float32, 364))

    def coalesced_int_avg(g):
        ts = [_ints((7,), 0, 366, torch.int32) * n, _ints((9,), 0, 367, torch.int32) * n]
        if g is None:
            dist.all_reduce_coalesced(ts, op=R.AVG, group=g)
        else:  # Gloo: sum, divided
            dist.all_reduce_coalesced(ts, group=g)
            ts = [t // n for t in ts]
        return ts
    add("all_reduce_coalesced avg int32 (Gloo fallback)", ("allreduce_coalesced", "delegated"), coalesced_int_avg)

    # reduce-scatter: tensor and list forms, the coalesced tensor form
    def rs_tensor(numel, dtype, op, seed):
        def fn(g):
            out = torch.zeros(numel, dtype=dtype)
            dist.reduce_scatter_tensor(out, _ints((n * numel,), rank, seed, dtype), op=op, group=g)
            return [out]
        return fn

    def rs_avg_ref(numel, dtype, seed):
        def ref(g):
            out = torch.zeros(numel, dtype=dtype)
            dist.reduce_scatter_tensor(out, _ints((n * numel,), rank, seed, dtype), group=g)
            return [out]  # compared as an average of these sums
        return ref

    def rs_list(numel, dtype, op, seed):
        def fn(g):
            out = torch.zeros(numel, dtype=dtype)
            dist.reduce_scatter(out, list(_ints((n * numel,), rank, seed, dtype).chunk(n)), op=op, group=g)
            return [out]
        return fn
    for i, (numel, dtype) in enumerate(((small, torch.float32), (small, torch.float16), ((1 << 20) // 4 + 1, torch.float32))):
        size = "large (queued)" if numel > small else "small (inline)"
        add(f"reduce_scatter_tensor sum {size} {dtype}", ("reduce_scatter_single", "native"),
            rs_tensor(numel, dtype, R.SUM, 400 + i))
        add(f"reduce_scatter_tensor avg {size} {dtype}", ("reduce_scatter_single", "native"),
            rs_tensor(numel, dtype, R.AVG, 410 + i), rs_avg_ref(numel, dtype, 410 + i))
        add(f"reduce_scatter list sum {size} {dtype}", ("reduce_scatter", "native"), rs_list(numel, dtype, R.SUM, 420 + i))
    add("reduce_scatter_tensor max (fallback)", ("reduce_scatter_single", "delegated"),
        rs_tensor(small, torch.float32, R.MAX, 430))
    add("reduce_scatter_tensor int64 (fallback)", ("reduce_scatter_single", "delegated"),
        rs_tensor(33, torch.int64, R.SUM, 431))
    add("reduce_scatter list max (fallback)", ("reduce_scatter", "delegated"), rs_list(small, torch.float32, R.MAX, 432))

    def rs_coalesced(g):
        outs = [torch.zeros(5), torch.zeros(9)]
        with dist._coalescing_manager(group=g):
            for j, o in enumerate(outs):
                dist.reduce_scatter_tensor(o, _ints((n * o.numel(),), rank, 440 + j), group=g)
        return outs
    add("reduce_scatter_tensor_coalesced", ("reduce_scatter_single_coalesced", "delegated"), rs_coalesced)

    # allgather: list and into-tensor forms (any dtype), the coalesced into-tensor form
    def ag_list(numel, dtype, seed):
        def fn(g):
            outs = [torch.zeros(numel, dtype=dtype) for _ in range(n)]
            dist.all_gather(outs, _ints((numel,), rank, seed, dtype), group=g)
            return outs
        return fn

    def ag_tensor(numel, dtype, seed):
        def fn(g):
            out = torch.zeros(n * numel, dtype=dtype)
            dist.all_gather_into_tensor(out, _ints((numel,), rank, seed, dtype), group=g)
            return [out]
        return fn
    for i, (numel, dtype) in enumerate(((small, torch.float32), (small, torch.float16), (33, torch.int64),
                                        ((1 << 20) // 4 + 1, torch.float32))):
        add(f"all_gather list {numel} {dtype}", ("allgather", "native"), ag_list(numel, dtype, 450 + i))
        add(f"all_gather_into_tensor {numel} {dtype}", ("all_gather_single", "native"), ag_tensor(numel, dtype, 460 + i))

    def ag_coalesced(g):
        outs = [torch.zeros(n * 5), torch.zeros(n * 9, dtype=torch.int64)]
        with dist._coalescing_manager(group=g):
            for j, o in enumerate(outs):
                dist.all_gather_into_tensor(o, _ints((o.numel() // n,), rank, 470 + j, o.dtype), group=g)
        return outs
    add("allgather_into_tensor_coalesced", ("all_gather_single_coalesced", "delegated"), ag_coalesced)

    # the delegated ones
    for src in sorted({0, n - 1}):
        def bcast(g, src=src):
            t = _ints((9,), rank, 480)
            dist.broadcast(t, src=src, group=g)
            return [t]
        add(f"broadcast from {src}", ("broadcast", "delegated"), bcast)

    def reduce(g):
        t = _ints((9,), rank, 481)
        dist.reduce(t, dst=n - 1, group=g)
        return [t] if rank == n - 1 else []
    add("reduce", ("reduce", "delegated"), reduce)

    def gather(g):
        outs = [torch.zeros(4) for _ in range(n)] if rank == 0 else None
        dist.gather(_ints((4,), rank, 482), outs, dst=0, group=g)
        return outs or []
    add("gather", ("gather", "delegated"), gather)

    def scatter(g):
        out = torch.zeros(4)
        dist.scatter(out, [_ints((4,), r, 483) for r in range(n)] if rank == 0 else None, src=0, group=g)
        return [out]
    add("scatter", ("scatter", "delegated"), scatter)

    def alltoall(g):
        outs = [torch.zeros(3) for _ in range(n)]
        dist.all_to_all(outs, list(_ints((3 * n,), rank, 484).chunk(n)), group=g)
        return outs
    add("all_to_all", ("alltoall", "delegated"), alltoall)

    def alltoall_single(g):
        out = torch.zeros(2 * n)
        dist.all_to_all_single(out, _ints((2 * n,), rank, 485), group=g)
        return [out]
    add("all_to_all_single", ("all_to_all_single", "delegated"), alltoall_single)
    add("barrier", ("barrier", "delegated"), lambda g: dist.barrier(group=g) or [])
    add("monitored_barrier", ("monitored_barrier", "delegated"),
        lambda g: dist.monitored_barrier(group=g, timeout=timedelta(seconds=TIMEOUT_S)) or [])
    if n > 1:
        def ring(g):  # send/recv around the ring
            x, y = _ints((6,), rank, 486), torch.zeros(6)
            reqs = [dist.isend(x, (rank + 1) % n, group=g), dist.irecv(y, (rank - 1) % n, group=g)]
            for r in reqs:
                r.wait()
            return [y]
        add("send/recv", {("send", "delegated"): 1, ("recv", "delegated"): 1}, ring)

        def anysource(g):  # rank 0 receives from every other rank, from any source
            if rank != 0:
                dist.send(torch.full((4,), float(rank)), 0, group=g)
                return []
            got = [torch.zeros(4) for _ in range(n - 1)]
            for w in [dist.irecv(t, group=g) for t in got]:
                w.wait()
            return sorted(got, key=lambda t: t[0].item())  # who sent which: the values say it
        add("recv_anysource", {("recv_anysource", "delegated"): n - 1} if rank == 0 else {("send", "delegated"): 1},
            anysource)
    # the latency path first: it declines (correctly) while the communicator's thread still
    # finishes a queued collective, which would make its assertion depend on timing
    forms.sort(key=lambda f: ("allreduce", "latency") not in f[1] and ("allreduce_coalesced", "latency") not in f[1])
    return forms


def _check_paths(dist, be, group, gloo, rank, n):
    """Each form on `group` (the "fastar" backend `be`) takes the path it should, and gives Gloo's result."""
    topo = be.topology
    fast = topo.num_nodes == 1 and be.communicator.has_shm()
    seen = []
    for label, expect, fn, ref in _path_forms(dist, rank, n, fast):
        got, out = _ran(be, lambda: fn(group))
        assert got == expect, f"{label}: ran {got}, expected {expect} (rank {rank}, {topo})"
        assert be.last_path in expect, (label, be.last_path)
        want = (ref or fn)(gloo)
        assert len(out) == len(want), (label, out, want)
        for a, b in zip(out, want):
            if "avg" in label and a.is_floating_point():  # fastar's average of Gloo's sums
                _same_avg(a, b, n, label)
            else:
                _same(a, b, label)
        seen.append(expect)
    return seen


def _profiled_paths(dist, fastar, rank, n, gloo):
    """The same forms under torch.profiler, on a fresh "fastar" group (its own communicator: nothing
    queued on it before the latency forms): the paths are the same, and every call is one range."""
    from collections import Counter
    grp = dist.new_group(backend="fastar")
    be = fastar.backend.get_backend(grp)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        seen = _check_paths(dist, be, grp, gloo, rank, n)
    ranges = Counter()
    for e in prof.events():
        if e.name.startswith("fastar::"):
            head = e.name.split()[0]
            ranges[head + (" delegated" if " (delegated to gloo) " in e.name else "")] += 1
    what = {"allreduce": "allreduce", "allreduce_coalesced": "allreduce_coalesced", "reduce_scatter": "reduce_scatter",
            "reduce_scatter_single": "reduce_scatter", "allgather": "allgather", "all_gather_single": "allgather"}
    expect = Counter()
    for calls in seen:
        for (method, path), k in calls.items():
            expect[f"fastar::{method} delegated" if path == "delegated" else f"fastar::{what[method]}"] += k
    assert ranges == expect, f"profiler ranges {dict(ranges)} != one per call {dict(expect)}"
    dist.destroy_process_group(grp)
    return sum(expect.values())


def _check_collectives(rank, n, big: bool = False, spec: str = "fastar"):
    """Every collective on the default "fastar" group against the same call on a Gloo group."""
    dist, fastar = _init(rank, n, spec=spec)
    be = fastar.backend.get_backend()
    gloo = dist.new_group(backend="gloo")
    assert dist.get_backend() == ("fastar" if spec.startswith("tcp://") else spec)
    checks = len(_check_paths(dist, be, None, gloo, rank, n))  # first: nothing queued before the latency forms
    if n == 2:
        checks += _profiled_paths(dist, fastar, rank, n, gloo)
    sizes = [1, 7, 4097] + ([(9 << 20) // 4 + 3] if big else [])  # > 8 MiB: "rail" on 2 nodes x 2
    if os.environ.get("FASTAR_SHM_CHUNK_MB"):  # a small chunk: the halves go through the slots in pieces
        sizes.append(20011)
    plans = set()

    def both(fn, make, what):
        """fn(tensors, group) on copies of make(); the fastar group's result must equal Gloo's."""
        nonlocal checks
        a, b = make(), make()
        fn(a, None)
        fn(b, gloo)
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            _same(x, y, what)
        checks += 1

    for i, numel in enumerate(sizes):
        for dtype in (torch.float32, torch.bfloat16, torch.float64) if numel == 7 else (torch.float32,):
            mk = lambda: _ints((numel,), rank, i, dtype)  # noqa: E731
            both(lambda t, g: dist.all_reduce(t, group=g), mk, f"all_reduce sum {numel} {dtype}")
            plans.add(be.records()[-1]["plan"])
            # AVG: Gloo has none; the reference is Gloo's exact sum divided by n
            t = mk()
            dist.all_reduce(t, op=dist.ReduceOp.AVG)
            ref = mk()
            dist.all_reduce(ref, group=gloo)
            _same_avg(t, ref, n, f"all_reduce avg {numel} {dtype}")
            checks += 1
        # reduce_scatter: tensor and list forms, sum; avg against sum / n (native: fastar's halves)
        for dtype in (torch.float32, torch.bfloat16) if numel == 7 else (torch.float32,):
            mk_in = lambda: _ints((n * numel,), rank, 100 + i, dtype)  # noqa: E731
            out_f, out_g = torch.zeros(numel, dtype=dtype), torch.zeros(numel, dtype=dtype)
            dist.reduce_scatter_tensor(out_f, mk_in())
            assert be.records()[-1]["name"].startswith(f"fastar::reduce_scatter {n * numel * out_f.element_size()}B"), \
                be.records()[-1]
            dist.reduce_scatter_tensor(out_g, mk_in(), group=gloo)
            _same(out_f, out_g, f"reduce_scatter_tensor {numel} {dtype}")
            inp = mk_in()
            kept = inp.clone()
            out_a = torch.zeros(numel, dtype=dtype)
            dist.reduce_scatter_tensor(out_a, inp, op=dist.ReduceOp.AVG)
            _same(inp, kept, "reduce_scatter leaves its input as it was")
            _same_avg(out_a, out_g, n, f"reduce_scatter_tensor avg {numel} {dtype}")
            lst_f, lst_g = torch.zeros(numel, dtype=dtype), torch.zeros(numel, dtype=dtype)
            dist.reduce_scatter(lst_f, list(mk_in().chunk(n)))
            dist.reduce_scatter(lst_g, list(mk_in().chunk(n)), group=gloo)
            _same(lst_f, lst_g, f"reduce_scatter list {numel} {dtype}")
            # async: the Work's future carries the shard
            out_w = torch.zeros(numel, dtype=dtype)
            w = dist.reduce_scatter_tensor(out_w, mk_in(), async_op=True)
            w.get_future().wait()
            _same(out_w, out_g, f"reduce_scatter async {numel} {dtype}")
        # allgather: list and into-tensor forms, any dtype (bytes are moved)
        for dtype in (torch.float32, torch.int64, torch.bfloat16, torch.uint8) if numel == 7 else (torch.float32,):
            x = _ints((numel,), rank, 200 + i, dtype if dtype != torch.uint8 else torch.int16).to(dtype)
            for g in (None, gloo):
                outs = [torch.zeros(numel, dtype=dtype) for _ in range(n)]
                dist.all_gather(outs, x, group=g)
                flat = torch.zeros(n * numel, dtype=dtype)
                dist.all_gather_into_tensor(flat, x, group=g)
                if g is None:
                    assert be.records()[-1]["name"].startswith("fastar::allgather"), be.records()[-1]
                _same(torch.cat(outs), flat, f"all_gather forms {numel} {dtype}")
                if g is None:
                    mine = flat
            _same(mine, flat, f"all_gather {numel} {dtype}")
        checks += 4
    # the native path really ran, and the plan names the hierarchy the topology implies
    topo = be.topology
    assert be.records(), "no native collective was recorded"
    hiers = {p.split(":")[0] for p in plans}
    expect = {"flat"} if topo.local_size == 1 else {"leader", "rail"} if topo.num_nodes > 1 else {"leader"}
    assert hiers <= expect and hiers, (hiers, expect, topo)
    if big and topo.num_nodes > 1:
        assert "rail" in hiers, plans
    # fallbacks: another op, an integer dtype
    both(lambda t, g: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=g), lambda: _ints((33,), rank, 7), "max")
    both(lambda t, g: dist.all_reduce(t, group=g), lambda: _ints((33,), rank, 8, torch.int64), "int64 sum")
    both(lambda t, g: dist.all_reduce(t, op=dist.ReduceOp.PRODUCT, group=g),
         lambda: _ints((5,), rank, 9).clamp(1, 2), "product")
    # coalesced
    both(lambda ts, g: dist.all_reduce_coalesced(ts, group=g),
         lambda: [_ints((5, 3), rank, 10), _ints((17,), rank, 11)], "all_reduce_coalesced")
    # delegated ones
    for src in {0, n - 1}:
        both(lambda t, g: dist.broadcast(t, src=src, group=g), lambda: _ints((9,), rank, 12), f"broadcast {src}")
    both(lambda t, g: dist.reduce(t, dst=n - 1, group=g), lambda: _ints((9,), rank, 13), "reduce")

    def gather(ts, g):
        dist.gather(ts[0], ts[1:] if rank == 0 else None, dst=0, group=g)
    both(gather, lambda: [_ints((4,), rank, 14)] + [torch.zeros(4) for _ in range(n)], "gather")

    def scatter(ts, g):
        dist.scatter(ts[0], ts[1:] if rank == 0 else None, src=0, group=g)
    both(scatter, lambda: [torch.zeros(4)] + [_ints((4,), r, 15) for r in range(n)], "scatter")

    def a2a(ts, g):
        dist.all_to_all_single(ts[0], ts[1], group=g)
    both(a2a, lambda: [torch.zeros(2 * n), _ints((2 * n,), rank, 16)], "all_to_all_single")
    objs = [None] * n
    dist.all_gather_object(objs, {"rank": rank})
    assert objs == [{"rank": r} for r in range(n)]
    dist.barrier()
    if n > 1:  # send/recv around the ring
        x, y = _ints((6,), rank, 17), torch.zeros(6)
        reqs = [dist.isend(x, (rank + 1) % n), dist.irecv(y, (rank - 1) % n)]
        for r in reqs:
            r.wait()
        _same(y, _ints((6,), (rank - 1) % n, 17), "send/recv")
    # async work: its future carries the result, and chains
    t = _ints((100,), rank, 18)
    ref = t.clone()
    dist.all_reduce(ref, group=gloo)
    w = dist.all_reduce(t, async_op=True)
    doubled = w.get_future().then(lambda f: f.value()[0] * 2)
    w.wait()
    _same(t, ref, "async all_reduce")
    _same(doubled.wait(), ref * 2, "future.then")
    # a subgroup on fastar: the last ranks (flat)
    if n >= 3:
        ranks = list(range(1, n))
        sub, subg = dist.new_group(ranks, backend="fastar"), dist.new_group(ranks, backend="gloo")
        if rank in ranks:
            a, b = _ints((50,), rank, 19), _ints((50,), rank, 19)
            dist.all_reduce(a, group=sub)
            dist.all_reduce(b, group=subg)
            _same(a, b, "subgroup all_reduce")
            assert fastar.backend.get_backend(sub).topology.local_size == 1
    if n in (2, 4):  # fastar.init / fastar.all_reduce beside the backend: harmless
        fastar.init()
        a, b = _ints((64,), rank, 20), _ints((64,), rank, 20)
        fastar.all_reduce(a)
        dist.all_reduce(b)
        _same(a, b, "fastar.all_reduce beside the backend")
    # the profiler sees a named range per native collective
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        dist.all_reduce(torch.ones(256))
    names = [e.name for e in prof.events() if e.name.startswith("fastar::allreduce")]
    assert names and "1024B" in names[0] and f"peers={n}" in names[0], names
    fastar.shutdown()
    dist.destroy_process_group()
    return checks, sorted(plans), os.getpid()


def _check_device_string(rank, n, spec):
    """"cpu:fastar" and "cpu:fastar,cuda:nccl": CPU tensors go to fastar."""
    import torch.distributed as dist

    import fastar
    dist.init_process_group(spec, rank=rank, world_size=n, timeout=timedelta(seconds=TIMEOUT_S))
    t = torch.ones(10) * (rank + 1)
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((10,), n * (n + 1) / 2))
    ok = bool(fastar.backend.get_backend().records())
    dist.destroy_process_group()
    return ok


@pytest.mark.parametrize("n,local,spec", [(1, None, "cpu:fastar"), (2, None, "fastar"), (3, 1, "tcp://"),
                                          (4, None, "fastar"), (5, None, "fastar"), (4, 2, "fastar"),
                                          (6, 3, "fastar")])
def test_collectives_match_gloo(n, local, spec):
    """Worlds 1..5: on one host (shared-memory local phase), 3 nodes x 1 (flat, FASTAR_LOCAL_SIZE=1,
    init_method tcp://) and 2 nodes x 2 (FASTAR_LOCAL_SIZE=2, with a buffer big enough for "rail").
    First every collective form, each asserting the path it took (path_counts: latency, native or
    delegated) and Gloo's result (_check_paths); at 2 ranks the same again under torch.profiler.
    5 ranks and 2 nodes x 3 run with a 64 KiB shared-memory chunk, so that reduce-scatter and
    allgather go through the slots in several pieces (and 2 x 3 crosses nodes with 3 local ranks)."""
    before = fastar_segments()
    env = {"FASTAR_LOCAL_SIZE": str(local)} if local else {}
    if n in (5, 6):
        env["FASTAR_SHM_CHUNK_MB"] = "0.0625"
    out = run_workers(_check_collectives, n, local == 2, spec, init_dist=False, env=env, timeout=150)
    assert all(c == out[0][0] and c > 30 for c, _, _ in out), out
    assert not leaked(before, {pid for _, _, pid in out})


def test_cpu_fastar_cuda_nccl():
    if not torch.cuda.is_available():  # ("cpu:fastar" alone: world 1 of test_collectives_match_gloo)
        pytest.skip("torch's ProcessGroupNCCL refuses to start without a GPU")
    spec = "cpu:fastar,cuda:nccl"
    assert run_workers(_check_device_string, 2, spec, init_dist=False, timeout=60) == [True, True]


# -- DDP ----------------------------------------------------------------------------------------

def _ddp_worker(rank, n):
    """Unmodified DDP on the "fastar" default group vs DDP on a Gloo group: 5 steps with BatchNorm
    (buffers broadcast), a no_sync step, and with and without a comm hook."""
    dist, fastar = _init(rank, n)
    from torch import nn
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP
    gloo = dist.new_group(backend="gloo")

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))

    diffs = {}
    for hook in (None, "allreduce_hook"):
        ref = DDP(model(), process_group=gloo, bucket_cap_mb=0.0005)  # several buckets
        got = DDP(model(), bucket_cap_mb=0.0005)
        if hook:
            ref.register_comm_hook(gloo, default_hooks.allreduce_hook)
            got.register_comm_hook(None, default_hooks.allreduce_hook)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, got)]
        g = torch.Generator().manual_seed(rank)
        for step in range(5):
            x, y = torch.randn(6, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
            for m, opt in zip((ref, got), opts):
                if step == 2:  # accumulate one micro-batch locally, sync on the next
                    with m.no_sync():
                        nn.functional.cross_entropy(m(x[:3]), y[:3]).backward()
                    nn.functional.cross_entropy(m(x[3:]), y[3:]).backward()
                else:
                    nn.functional.cross_entropy(m(x), y).backward()
                opt.step()
                opt.zero_grad()
        diffs[str(hook)] = max((a - b).abs().max().item() for a, b in
                               zip(list(ref.parameters()) + list(ref.buffers()),
                                   list(got.parameters()) + list(got.buffers())) if a.is_floating_point())
        # the models did train (the comparison is not between two untouched copies)
        assert (next(got.parameters()) - next(model().parameters())).abs().max() > 1e-3
    native = len(fastar.backend.get_backend().records())
    fsdp = _fsdp_vs_single_process(rank, n, nn)
    dist.destroy_process_group()
    return diffs, native, fsdp


def _fsdp_vs_single_process(rank, n, nn):
    """FSDP2 (fully_shard) on CPU on the "fastar" default group: 5 SGD steps, each rank on its slice
    of the batch, against one process on the whole batch."""
    from torch.distributed.fsdp import fully_shard
    import fastar
    be = fastar.backend.get_backend()

    def model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))

    def batch(step):
        g = torch.Generator().manual_seed(100 + step)
        return torch.randn(4 * n, 8, generator=g), torch.randint(0, 3, (4 * n,), generator=g)
    before = len(be.records())
    m = model()
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ref = model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(5):
        x, y = batch(step)
        nn.functional.cross_entropy(m(x[4 * rank:4 * rank + 4]), y[4 * rank:4 * rank + 4]).backward()
        opt.step()
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    full = {k: v.full_tensor() for k, v in m.state_dict().items()}
    diff = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    moved = (ref[0].weight - model()[0].weight).abs().max().item()
    names = {r["name"].split()[0] for r in be.records()[before:]}
    return {"diff": diff, "moved": moved, "native": sorted(names)}


def test_ddp_and_fsdp_fastar():
    out = run_workers(_ddp_worker, 2, init_dist=False, timeout=120)
    for diffs, native, fsdp in out:
        assert native > 0, "DDP never reached fastar's native allreduce"
        for hook, d in diffs.items():
            assert d <= 1e-6, (hook, d)
        assert fsdp["moved"] > 1e-3 and fsdp["diff"] <= 1e-5, fsdp
        assert "fastar::reduce_scatter" in fsdp["native"], fsdp  # FSDP's gradient reduce-scatter ran on fastar
        assert "fastar::allgather" in fsdp["native"], fsdp  # and its parameter all-gathers


# -- fastar.init on a "fastar" default group: one communicator -------------------------------------

def _shared_worker(rank, n):
    """fastar.init() adopts the backend's communicator: fastar.all_reduce and fastar.wrap on it match
    Gloo, no process group is added, fastar.shutdown() leaves it open; another local_size builds
    fastar's own beside it."""
    import copy
    import logging

    dist, fastar = _init(rank, n)
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastar import state
    be = fastar.backend.get_backend()
    gloo = dist.new_group(backend="gloo")
    pg_map = dist.distributed_c10d._world.pg_map
    groups_before = len(pg_map)
    topo = fastar.init()
    st = state.get_state()
    out = {"same_comm": st.comm is be.communicator, "owner": st.owner is be, "topo": topo == be.topology,
           "new_groups": len(pg_map) - groups_before, "local_size": topo.local_size, "shm": st.comm.has_shm(),
           "explain": "adopted by fastar.init" in fastar.explain()}
    # fastar.all_reduce (latency path, general path, avg, async) between dist calls on the same communicator
    for i, (numel, op) in enumerate(((64, "sum"), (100_000, "sum"), (1000, "avg"))):
        ref = _ints((numel,), rank, 30 + i)
        dist.all_reduce(ref, group=gloo)
        a = _ints((numel,), rank, 30 + i)
        fastar.all_reduce(a, op=op)
        if op == "avg":
            _same_avg(a, ref, n, f"fastar.all_reduce avg {numel}")
        else:
            _same(a, ref, f"fastar.all_reduce {numel}")
        b = _ints((numel,), rank, 30 + i)
        dist.all_reduce(b)
        _same(b, ref, f"dist.all_reduce after fastar.all_reduce {numel}")
    a = _ints((5000,), rank, 40)
    w = fastar.all_reduce(a, async_op=True)
    b = _ints((5000,), rank, 40)
    dist.all_reduce(b)  # queued behind fastar's on the one communicator
    w.wait()
    _same(a, b, "async fastar.all_reduce, then dist.all_reduce")
    # the tensor path (a bf16 wire, flat) over the backend's transport groups; integer sums are exact in bf16
    a, b = _ints((3000,), rank, 41), _ints((3000,), rank, 41)
    fastar.all_reduce(a, hierarchy="flat", compression="bf16")
    dist.all_reduce(b, group=gloo)
    _same(a, b, "fastar.all_reduce bf16 wire")
    out["tensor_path"] = st.comm.has_tensor_groups("cpu")
    # fastar.wrap vs DDP on Gloo: 2 SGD steps, several buckets
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)).double()
    ref, got = DDP(copy.deepcopy(base), process_group=gloo), fastar.wrap(copy.deepcopy(base), bucket_cap_mb=0.004,
                                                                         first_bucket_mb=0.001)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, got)]
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x, y = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
        for m, opt in zip((ref, got), opts):
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            opt.zero_grad()
    out["buckets"], out["wrap_shm"] = got._engine.num_buckets(), got._engine.has_arena()
    out["wrap_diff"] = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), got.parameters()))
    out["moved"] = (next(got.parameters()) - next(base.parameters())).abs().max().item()
    # fastar.shutdown() drops fastar's state, not the backend's communicator
    fastar.shutdown()
    t = torch.ones(10)
    dist.all_reduce(t)
    out["open_after_shutdown"] = torch.equal(t, torch.full((10,), float(n))) and not be.closed
    # another local_size than the backend's: fastar's own communicator beside it, and a log line
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: lines.append(r.getMessage())
    log = logging.getLogger("fastar")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        fastar.init(local_size=1 if topo.local_size == 2 else 2)
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    own = state.get_state()
    out["own"] = own.owner is None and own.comm is not be.communicator and own.topo.local_size != topo.local_size
    out["log"] = lines
    a, b = _ints((3000,), rank, 50), _ints((3000,), rank, 50)
    fastar.all_reduce(a)
    dist.all_reduce(b, group=gloo)
    _same(a, b, "fastar.all_reduce on fastar's own communicator")
    fastar.shutdown()  # closes fastar's own only
    t = torch.ones(10)
    dist.all_reduce(t)
    out["open_after_own_shutdown"] = torch.equal(t, torch.full((10,), float(n)))
    fastar.init()  # adopts again; destroying the group ends fastar's state with it
    out["adopted_again"] = state.get_state().comm is be.communicator
    dist.destroy_process_group()
    out["ended_with_group"] = not fastar.is_initialized() and be.closed
    return out, os.getpid()


@pytest.mark.parametrize("local", [1, 2])
def test_fastar_init_shares_the_backend_communicator(local):
    """2 ranks as 2 nodes x 1 (flat) and as 1 node x 2 (shared memory)."""
    before = fastar_segments()
    res = run_workers(_shared_worker, 2, init_dist=False, env={"FASTAR_LOCAL_SIZE": str(local)}, timeout=120)
    for out, _ in res:
        assert out["same_comm"] and out["owner"] and out["topo"] and out["explain"], out
        assert out["new_groups"] == 0, out  # no Gloo group, arena or communicator of fastar's own
        assert out["local_size"] == local and out["shm"] == (local == 2) and out["tensor_path"], out
        assert out["buckets"] >= 3 and out["wrap_shm"] == (local == 2), out
        assert out["wrap_diff"] < 1e-9 and out["moved"] > 1e-3, out
        assert out["open_after_shutdown"] and out["open_after_own_shutdown"], out
        assert out["own"] and any("makes its own" in line for line in out["log"]), out
        assert out["adopted_again"] and out["ended_with_group"], out
    assert not leaked(before, {pid for _, pid in res})


# Both shutdown orders, and neither, in real 2-rank jobs (bench/exit_stress.py's runner): every
# process exits with 0.
SHARED_EXIT_SCRIPT = """
import sys, torch, torch.distributed as dist
import fastar
from fastar import state
dist.init_process_group("fastar")
be = fastar.backend.get_backend()
model = fastar.wrap(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)), bucket_cap_mb=0.01)
assert state.get_state().comm is be.communicator
model(torch.randn(8, 64)).sum().backward()
fastar.all_reduce(torch.ones(1000))
dist.all_reduce(torch.ones(10))
if sys.argv[1] == "fastar-first":
    fastar.shutdown()
    model(torch.randn(8, 64)).sum().backward()  # the backend's communicator is still open
    t = torch.ones(10)
    dist.all_reduce(t)
    assert t[0].item() == 2, t
    dist.destroy_process_group()
    assert be.closed
elif sys.argv[1] == "dist-first":
    dist.destroy_process_group()
    assert be.closed and not fastar.is_initialized()
    for what, call in (("not initialised", lambda: fastar.all_reduce(torch.ones(4))),
                       ("has been destroyed", lambda: model(torch.randn(8, 64)).sum().backward())):
        try:
            call()
        except RuntimeError as e:
            assert what in str(e), str(e)
        else:
            raise AssertionError(f"no error after destroy_process_group ({what})")
    fastar.shutdown()
# "plain-exit": neither; fastar's exit hook and then the backend's release the communicator
"""


@pytest.mark.parametrize("order,local", [("fastar-first", 2), ("dist-first", 2), ("plain-exit", 2),
                                         ("fastar-first", 1), ("dist-first", 1)])
def test_shared_communicator_shutdown_orders(order, local):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from exit_stress import run_exit_script
    before = fastar_segments()
    codes, errors = run_exit_script(order, local_size=local, timeout=60, script=SHARED_EXIT_SCRIPT)
    assert codes == [0, 0], errors
    assert not leaked(before, set())


# -- FASTAR_BACKEND_VALIDATE ------------------------------------------------------------------------

def _validate_worker(rank, n):
    """import fastar with a bad value is fine; creating a backend raises; 0 turns the check off."""
    import torch.distributed as dist

    import fastar
    out = {}
    for value in ("yes", "0", "1"):
        os.environ["FASTAR_BACKEND_VALIDATE"] = value
        try:
            dist.init_process_group("fastar", store=dist.HashStore(), rank=0, world_size=1)
        except ValueError as e:
            out[value] = str(e)
            continue
        t = torch.ones(5)
        dist.all_reduce(t)
        out[value] = (fastar.backend.get_backend()._validate, torch.equal(t, torch.ones(5)))
        dist.destroy_process_group()
    return out


def test_backend_validate_setting():
    (out,) = run_workers(_validate_worker, 1, init_dist=False, env={"FASTAR_BACKEND_VALIDATE": "bad"}, timeout=60)
    assert "FASTAR_BACKEND_VALIDATE='yes' is not valid: expected '0' or '1'" in out["yes"], out
    assert out["0"] == (False, True) and out["1"] == (True, True), out  # (header exchange, result right)


# -- errors -------------------------------------------------------------------------------------

def _error_worker(rank, n):
    dist, fastar = _init(rank, n, timeout_s=8)
    spare = dist.new_group(backend="fastar")  # for the dead rank, after the default group failed
    # a failed group stays failed: one more for each of the halves' mismatches
    halves = {k: dist.new_group(backend="fastar") for k in ("mismatch_rs", "mismatch_ag")}
    out = {}
    t0 = time.monotonic()
    work = dist.all_reduce(torch.ones(10 if rank == 0 else 12), async_op=True)  # rank 0: a different shape
    try:
        work.wait()
        out["mismatch"] = None
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out["mismatch"] = str(e)
    out["mismatch_work"] = (work.is_completed(), work.is_success())  # what the failed Work says after it
    out["mismatch_s"] = time.monotonic() - t0
    k = 10 if rank == 0 else 12  # the same again for reduce-scatter and allgather
    for key, call in (("mismatch_rs", lambda g: dist.reduce_scatter_tensor(torch.ones(k), torch.ones(n * k), group=g)),
                      ("mismatch_ag", lambda g: dist.all_gather_into_tensor(torch.ones(n * k), torch.ones(k), group=g))):
        try:
            call(halves[key])
            out[key] = None
        except Exception as e:  # noqa: BLE001
            out[key] = str(e)
    if rank == n - 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        for _ in range(3):
            dist.all_reduce(torch.ones(1 << 16), group=spare)
        out["dead"] = None
    except Exception as e:  # noqa: BLE001
        out["dead"] = str(e)
    out["dead_s"] = time.monotonic() - t0
    return out


def test_errors_mismatch_and_dead_rank():
    n = 3
    got, failures = run_workers(_error_worker, n, init_dist=False, timeout=120, allow_failures=True)
    assert set(failures) == {n - 1}, failures
    for rank, out in got.items():
        assert out["mismatch"] is not None, f"rank {rank}: a mismatched shape gave no error"
        assert "disagree" in out["mismatch"] and "has 12" in out["mismatch"], out["mismatch"]
        assert out["mismatch_s"] < 30, out
        assert out["mismatch_work"] == (True, False), out  # completed, not successful
        for key in ("mismatch_rs", "mismatch_ag"):
            assert out[key] is not None and "disagree" in out[key], (rank, key, out[key])
        assert out["dead"] is not None, f"rank {rank}: a dead peer gave no error"
        assert f"rank {n - 1}" in out["dead"] and "exited" in out["dead"], out["dead"]  # names the dead rank
        assert out["dead_s"] < 8 + 20, out


def _dying_halves_worker(rank, n, what, timeout_s):
    """Every rank runs 4 MiB reduce-scatters (or allgathers: queued on the communicator's thread)
    back to back; the last rank is killed (SIGKILL) half a second in, during one of them."""
    import threading
    dist, fastar = _init(rank, n, timeout_s=timeout_s)
    be = fastar.backend.get_backend()
    numel = 1 << 20
    small, big = torch.ones(numel), torch.ones(n * numel)
    dist.barrier()
    if rank == n - 1:
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    t0, calls, err = time.monotonic(), 0, None
    try:
        while time.monotonic() - t0 < 3 * timeout_s + 60:
            if what == "reduce_scatter":
                dist.reduce_scatter_tensor(small, big)
            else:
                dist.all_gather_into_tensor(big, small)
            calls += 1
    except Exception as e:  # noqa: BLE001 - what the test checks
        err = f"{type(e).__name__}: {e}"
    return {"err": err, "s": time.monotonic() - t0, "calls": calls, "paths": be.path_counts()}


@pytest.mark.parametrize("what,local", [("reduce_scatter", None), ("allgather", "1")])
def test_rank_dies_during_halves(what, local):
    """A rank killed during a reduce-scatter (1 node x 3: shared memory) or an allgather (3 nodes x
    1: Gloo between them): every other rank's call raises a Python exception within the group's
    timeout + 15 s of the kill, the dead rank named; none hangs or dies by a signal."""
    n, timeout_s = 3, 8
    before = fastar_segments()
    env = {"FASTAR_LOCAL_SIZE": local} if local else {}
    got, failures = run_workers(_dying_halves_worker, n, what, timeout_s, init_dist=False, env=env, timeout=150,
                                allow_failures=True)
    assert set(failures) == {n - 1} and "code -9" in failures[n - 1], failures  # only the killed rank
    assert set(got) == set(range(n - 1)), got
    op = "reduce_scatter_single" if what == "reduce_scatter" else "all_gather_single"
    for rank, out in got.items():
        assert out["err"] is not None, f"rank {rank}: no error after its peer died ({out})"
        assert out["s"] < 0.5 + timeout_s + 15, f"rank {rank}: the error came {out['s']:.1f} s in ({out})"
        assert set(out["paths"]) == {(op, "native"), ("barrier", "delegated")}, out["paths"]  # fastar's halves ran
    # In shared memory each rank sees the dead one's pid gone; over Gloo (a ring) the rank that
    # receives from it times out naming it, and the other may only see its own peer close.
    named = [r for r, out in got.items() if f"rank {n - 1}" in out["err"].split("\n")[0]]
    assert named == list(got) if local is None else named, f"the dead rank is not named: {got}"
    assert not leaked(before, set())


# -- Chrome trace -------------------------------------------------------------------------------

def test_chrome_trace_export(tmp_path):
    from fastar import trace
    stats = {"iteration": 3, "backward_s": 0.010, "comm_s": 0.004, "overlap": 0.5,
             "buckets": [{"bytes": 1024, "ready_s": 0.001, "start_s": 0.002, "end_s": 0.004, "algorithm": "x"},
                         {"bytes": 2048, "ready_s": 0.006, "start_s": 0.007, "end_s": 0.012, "algorithm": "y"}],
             "bucket_params": [["a"], ["b", "c"]]}
    records = [{"name": "fastar::allreduce 4B flat:ring peers=2", "bytes": 4, "plan": "flat:ring",
                "start_s": 100.0, "end_s": 100.5}]
    path = trace.export_chrome_trace(records + [stats, stats], tmp_path / "t.json", rank=1)
    data = json.loads(open(path).read())
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    for e in xs:
        assert {"name", "ph", "ts", "dur", "pid", "tid", "args"} <= set(e) and e["pid"] == 1
    buckets = [e for e in xs if e["name"].startswith("bucket")]
    assert len(buckets) == 4 and buckets[1]["dur"] == pytest.approx(5000)
    # iterations are laid end to end: the second one starts after the first one's last bucket
    assert buckets[2]["ts"] > buckets[1]["ts"] + buckets[1]["dur"]
    assert xs[0]["dur"] == pytest.approx(0.5e6)
