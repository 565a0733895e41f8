"""The TensorAllreduce path on the CPU (issue 6): fp16/bf16 on the wire with fp32 accumulation, in
every hierarchy and algorithm, through fastar.all_reduce and fastar.wrap. The same code moves CUDA
tensors over NCCL (test_gpu.py); here it runs over Gloo groups, so that its schedules, hierarchies
and error paths are tested with several processes on any machine.
"""
from __future__ import annotations

import pytest
import torch

from mp_utils import run_workers

# (world size, ranks per node) -> the hierarchies it runs; leader and rail need several ranks per node.
# One spawn per layout runs every hierarchy with both wires (it was one spawn per case: 118 processes
# for the 24 cases, now 27).
LAYOUTS = [(2, 1, ("flat",)), (3, 1, ("flat",)), (6, 1, ("flat",))] + [
    (size, local, ("flat", "leader", "rail")) for size, local in ((4, 2), (6, 2), (6, 3))]
WIRES = ("fp16", "bf16")
COUNTS = (1000, 5, 65537, 1)  # the CPU's scratch buffers grow, are reused smaller, grow again


def _allreduce_worker(rank, size, local_size, hierarchies, algorithm, counts):
    import fastar
    fastar.init(local_size=local_size)
    torch.set_num_threads(2)  # the CPU path runs its ops on one thread, and must give this back
    res = {}
    for hierarchy in hierarchies:
        for wire in WIRES:
            wdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[wire]
            out = {}
            for n in counts:
                g = torch.Generator().manual_seed(1000 * n + rank)
                # Small integers: every partial sum is exact in the wire dtype, so the result must be exact.
                ints = torch.randint(-8, 9, (n,), generator=g).float()
                t = ints.clone()
                fastar.all_reduce(t, hierarchy=hierarchy, algorithm=algorithm, compression=wire)
                # Random values: close to the fp64 sum; rounded to the wire dtype; same bits on every rank.
                r = torch.randn(n, generator=g, dtype=torch.float32)
                x = r.clone()
                fastar.all_reduce(x, hierarchy=hierarchy, algorithm=algorithm, compression=wire)
                out[n] = (ints, t, r, x, bool(torch.equal(x, x.to(wdt).float())))
            choice = fastar.state.get_state().last_choice
            res[hierarchy, wire] = (out, choice["why"], fastar.explain(), torch.get_num_threads())
    return res


@pytest.mark.parametrize("size,local_size,hierarchies", LAYOUTS, ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_compressed_allreduce(size, local_size, hierarchies):
    algorithm = "ring" if size == 6 and local_size != 2 else "halving_doubling"
    got = run_workers(_allreduce_worker, size, local_size, hierarchies, algorithm, COUNTS, timeout=300)
    for hierarchy in hierarchies:
        for wire in WIRES:
            case = f"{size} ranks, {local_size} per node, {hierarchy}, {wire}"
            res = [got[r][hierarchy, wire] for r in range(size)]
            tol = {"fp16": 2e-3, "bf16": 1.6e-2}[wire]
            for n in COUNTS:
                exact = sum(res[r][0][n][0].double() for r in range(size))
                ref = sum(res[r][0][n][2].double() for r in range(size))
                x0 = res[0][0][n][3]
                for r in range(size):
                    ints, t, _, x, representable = res[r][0][n]
                    assert torch.equal(t.double(), exact), f"{case}: rank {r}, n={n}: integer sums must be exact"
                    assert torch.equal(x, x0), f"{case}: rank {r}, n={n}: ranks disagree bitwise"
                    assert representable, f"{case}: rank {r}, n={n}: the result is not rounded to {wire}"
                err = (x0.double() - ref).abs().max().item()
                scale = ref.abs().max().item() + 1
                # each value crosses the wire rounded, at most once per step of the schedule
                assert err <= tol * scale * 2 * size, (case, n, err, scale)
            assert f"{wire} on the wire" in res[0][1], (case, res[0][1])
            assert "cpu tensor path: gloo groups" in res[0][2], (case, res[0][2])
            assert all(threads == 2 for *_, threads in res), (case, [threads for *_, threads in res])


def _wrap_worker(rank, size):
    import fastar
    fastar.init(local_size=1)  # two "nodes": the whole allreduce crosses the (compressed) wire
    return {wire: _wrap_run(rank, wire) for wire in ("fp16", "bf16")}  # one spawn, a wrapper per wire


def _wrap_run(rank, wire):
    import fastar
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    ref = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    ref.load_state_dict(model.state_dict())
    wrapped = fastar.wrap(model, compression=wire, bucket_cap_mb=0.005, first_bucket_mb=0.001)
    grads = []
    for it in range(3):
        g = torch.Generator().manual_seed(100 * it + rank)
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 3, (16,), generator=g)
        wrapped.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        # the reference: this rank's own gradient (the average is assembled by the parent)
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        grads.append([p.grad.clone() for p in ref.parameters()])
    stats = wrapped.comm_stats()
    return grads, [b["algorithm"] for b in stats["buckets"]], wrapped._engine.has_arena()


@pytest.fixture(scope="module")
def wrap_results():
    return run_workers(_wrap_worker, 2, timeout=180)


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
def test_wrap_with_compression_matches_the_average(wire, wrap_results):
    size = 2
    res = [wrap_results[r][wire] for r in range(size)]
    tol = {"fp16": 1e-3, "bf16": 8e-3}[wire]
    wdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[wire]
    for it in range(3):
        got = res[0][0][2 * it]
        mean = [sum(res[r][0][2 * it + 1][k] for r in range(size)) / size for k in range(len(got))]
        for r in range(size):
            for a, b in zip(res[r][0][2 * it], got):
                assert torch.equal(a, b), "ranks disagree bitwise"
        for a, m in zip(got, mean):
            assert torch.allclose(a, m, rtol=tol, atol=tol * (m.abs().max().item() + 1e-3)), (it, (a - m).abs().max())
            # buckets are scaled by 1/k before the sum, and the sum is rounded to the wire dtype
            assert torch.equal(a, a.to(wdt).float())
    assert all(a.endswith(":" + wire) for a in res[0][1]), res[0][1]
    assert res[0][2] is False  # compressed buckets are not shared-memory buckets


def _disagree_worker(rank, size):
    import fastar
    fastar.init(local_size=1)  # two "nodes" (on one node compression is dropped: nothing to disagree on)
    t = torch.ones(1000)
    fastar.all_reduce(t, compression="fp16" if rank == 0 else "bf16")


def test_ranks_disagreeing_on_compression_fail_on_every_rank():
    _, failures = run_workers(_disagree_worker, 2, timeout=120, allow_failures=True)
    assert set(failures) == {0, 1}
    for tb in failures.values():
        assert "ranks disagree on the hierarchy/algorithm" in tb, tb


def _one_node_worker(rank, size):
    import warnings

    import fastar
    fastar.init(local_size=size)  # one node
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(100_000, generator=g)
    plain, compressed = x.clone(), x.clone()
    fastar.all_reduce(plain)
    fastar.all_reduce(compressed, compression="fp16")
    why = fastar.state.get_state().last_choice["why"]
    forced_flat = x.clone()
    fastar.all_reduce(forced_flat, hierarchy="flat", compression="fp16")  # asked for: the wire is used
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fastar.wrap(torch.nn.Linear(8, 4), compression="bf16")
    return (torch.equal(plain, compressed), why, torch.equal(forced_flat, forced_flat.half().float()),
            model.compression, model._engine.has_arena(), [str(w.message) for w in caught])


def _one_node_then_bad_args_worker(rank, size):
    return _one_node_worker(rank, size), _bad_args_worker(rank, size)


@pytest.fixture(scope="module")
def one_node_results():
    """One spawn of 2 ranks on one node for the two tests below (fastar.init(local_size=2) first)."""
    return run_workers(_one_node_then_bad_args_worker, 2, timeout=120)


def test_one_node_drops_compression_for_shared_memory(one_node_results):
    """Nothing crosses a network on one node: the hierarchical paths sum in full precision anyway, so
    compression is dropped for the (faster) shared-memory path: the same bits as no compression."""
    for same, why, flat_rounded, wrap_compression, arena, warned in (o[0] for o in one_node_results):
        assert same, "one node, compression='fp16': not the uncompressed result"
        assert "one node: no network to compress for" in why, why
        assert flat_rounded, "hierarchy='flat' asked for the wire: its result is rounded to fp16"
        assert wrap_compression is None and arena is True
        assert any("compression='bf16' on a single node" in w for w in warned), warned


def _bad_args_worker(rank, size):
    import fastar
    errors = []
    for call in (lambda: fastar.all_reduce(torch.ones(3), compression="int8"),
                 lambda: fastar.wrap(torch.nn.Linear(2, 2), compression="fp8"),
                 lambda: fastar.all_reduce(torch.ones(3, device="meta"))):
        try:
            call()
            errors.append(None)
        except (ValueError, RuntimeError) as e:
            errors.append(str(e))
    # a 16-bit tensor is already compressed: the option changes nothing, and nothing fails
    h = torch.full((10,), 1.5, dtype=torch.float16)
    fastar.all_reduce(h, compression="fp16")
    return errors, h


def test_bad_compression_arguments_are_named(one_node_results):
    errors, h = one_node_results[0][1]
    assert "compression='int8'" in errors[0] and "fp16" in errors[0]
    assert "fastar.wrap: compression='fp8'" in errors[1]
    assert "meta" in errors[2]
    assert torch.equal(h, torch.full((10,), 3.0, dtype=torch.float16))
