"""The hierarchies (issue 3): one host plays several nodes through fastar.init(local_size=L).

Every hierarchy and algorithm must give exactly torch's sum for integer data and the same bytes on
every rank as "flat"; the shared-memory segment must never outlive init (no "fastar_" entry under
/dev/shm afterwards, also when a rank is killed).
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from datetime import timedelta

import pytest
import torch

from mp_utils import run_workers

HIERARCHIES = ("flat", "leader", "rail")
ALGOS = ("halving_doubling", "ring")
# 0 .. 2^22+1 elements: odd sizes, both sides of the one-phase threshold (64 KiB per rank), of the
# 4 MiB shared-memory chunk (2^20 float32 / 2^21 half elements), several chunks.
F32_SIZES = (0, 1, 7, 1000, 16383, 16384, 16385, 2**20 - 1, 2**20, 2**20 + 1, 2**22 + 1)
HALF_SIZES = (3, 16385, 2**21 + 1)
F64_SIZES = (5, 2**19 + 7)


def fill(count: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
    i = torch.arange(count, dtype=torch.int64)
    if dtype == torch.bfloat16:
        v = (i % 3) + rank % 2
    elif dtype == torch.float16:
        v = (i % 7) + rank % 5
    else:
        v = (i % 13) * (rank + 1)
    return v.to(dtype)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def fastar_segments() -> set:
    return {n for n in os.listdir("/dev/shm") if n.startswith("fastar_")}


def pid_of(name: str) -> int:
    m = re.search(r"_p(\d+)$", name)
    return int(m.group(1)) if m else -1


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def leaked(before: set, our_pids) -> list:
    """Segments that appeared during the test and belong to our workers or to a dead process (other
    engineers' jobs may be initialising at the same moment: their live segments are not ours)."""
    return sorted(n for n in fastar_segments() - before if pid_of(n) in our_pids or not alive(pid_of(n)))


def segment_mode(name: str):
    """Mode of our mapping of the (already unlinked) segment, through /proc/self/map_files."""
    with open("/proc/self/maps") as f:
        for line in f:
            if name.lstrip("/") in line:
                rng = line.split()[0]
                try:
                    return os.stat(f"/proc/self/map_files/{rng}").st_mode & 0o777
                except OSError:
                    return None
    return None


def _hier_worker(rank, n, local_size):
    import torch.distributed as dist

    import fastar
    from fastar.state import get_state
    fastar.init(local_size=local_size, timeout=timedelta(seconds=60))
    st = get_state()
    info = {"pid": os.getpid(), "errors": [], "hashes": {}}
    name = st.comm.shm_name()
    dist.barrier()  # local rank 0 unlinks right after init's last barrier: wait until it is past it
    if local_size > 1:
        if not name.startswith(f"/fastar_{os.getuid()}_"):
            info["errors"].append(f"segment name {name!r} does not carry the user and job")
        if os.path.exists("/dev/shm" + name):
            info["errors"].append(f"segment {name} still has a name after init")
        info["mode"] = segment_mode(name)
    cases = [(torch.float32, c) for c in F32_SIZES] + [(torch.bfloat16, c) for c in HALF_SIZES] + \
            [(torch.float16, c) for c in HALF_SIZES] + [(torch.float64, c) for c in F64_SIZES]
    for dtype, count in cases:
        ref = fill(count, rank, dtype)
        dist.all_reduce(ref)
        for hier in HIERARCHIES:
            for algo in ALGOS:
                key = f"{hier}/{algo}/{dtype}/{count}"
                t = fill(count, rank, dtype)
                fastar.all_reduce(t, algorithm=algo, hierarchy=hier)
                if not torch.equal(t, ref):
                    bad = (t != ref).nonzero()
                    info["errors"].append(f"rank {rank} {key}: {bad.numel()} elements differ from torch, first at "
                                          f"{bad[0].item()}: {t[bad[0]].item()} != {ref[bad[0]].item()}")
                info["hashes"][key] = digest(t)
                want = hier if local_size > 1 else "flat"
                if count and st.comm.last_op()["hierarchy"] != want:
                    info["errors"].append(f"rank {rank} {key}: ran {st.comm.last_op()['hierarchy']}")
    # avg through the shared-memory path
    t = fill(1000, rank, torch.float64)
    fastar.all_reduce(t, op="avg", hierarchy="rail" if local_size > 1 else "flat")
    info["hashes"]["avg"] = digest(t)
    if not torch.allclose(t, fill(1000, 0, torch.float64) * (n + 1) / 2):
        info["errors"].append(f"rank {rank}: avg is wrong")
    # async through the shared-memory path, two in flight
    ts = [fill(c, rank, torch.float32) for c in (17, 2**20 + 5)]
    works = [fastar.all_reduce(t, hierarchy="leader", async_op=True) for t in ts]
    for w, t in zip(works, ts):
        w.wait()
        if not torch.equal(t, fill(t.numel(), 0, torch.float32) * (n * (n + 1) // 2)):
            info["errors"].append(f"rank {rank}: async leader allreduce of {t.numel()} is wrong")
    # "auto" says what it chose
    for count in (10, 2**19):
        fastar.all_reduce(torch.ones(count))
        info[f"explain/{count}"] = fastar.explain()
        info[f"chosen/{count}"] = st.last_choice["hierarchy"]
    dist.barrier()
    return info


CONFIGS = [(4, 2), (6, 2), (8, 4), (4, 4)]


@pytest.mark.parametrize("n,local_size", CONFIGS, ids=[f"{n}as{n // l}x{l}" for n, l in CONFIGS])
def test_hierarchies_match_flat_and_torch(n, local_size):
    before = fastar_segments()
    out = run_workers(_hier_worker, n, local_size, timeout=300)
    errors = [e for o in out for e in o["errors"]]
    assert not errors, "\n".join(errors[:20])
    h0 = out[0]["hashes"]
    for key in h0:
        ranks = [r for r in range(n) if out[r]["hashes"][key] != h0[key]]
        assert not ranks, f"{key}: ranks {ranks} differ from rank 0"
    for key in h0:  # every hierarchy gives the bytes that flat gives
        hier = key.split("/")[0]
        if hier in HIERARCHIES and hier != "flat":
            flat_key = "flat/" + key.split("/", 1)[1]
            assert h0[key] == h0[flat_key], f"{key} differs from {flat_key}"
    # explain() names the hierarchy that "auto" chose
    for count in (10, 2**19):
        chosen = out[0][f"chosen/{count}"]
        assert chosen in ("leader", "rail")
        assert f"-> {chosen}:" in out[0][f"explain/{count}"], out[0][f"explain/{count}"]
        assert "shared memory arena" in out[0][f"explain/{count}"]
    if n // local_size == 1:
        assert out[0]["chosen/10"] == "leader"  # one node: everything in shared memory
    # the segment is 0600 (seen through our own mapping: its name is gone right after init)
    modes = {o.get("mode") for o in out}
    if modes != {None}:
        assert modes == {0o600}, modes
    assert not leaked(before, {o["pid"] for o in out})


def _kill_worker(rank, n, local_size, victim, hierarchy, timeout_s):
    import fastar
    fastar.init(local_size=local_size, timeout=timedelta(seconds=timeout_s))
    t = torch.ones(2**20 + 3)
    fastar.all_reduce(t, hierarchy=hierarchy)  # a first one that works
    if rank == victim:
        # 64 MiB take tens of ms even on a quiet host: die a few ms into it, not after it
        work = fastar.all_reduce(torch.ones(2**24), hierarchy=hierarchy, async_op=True)  # noqa: F841
        time.sleep(0.003)
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        fastar.all_reduce(torch.ones(2**24), hierarchy=hierarchy)
        err = None
    except Exception as e:  # noqa: BLE001 - reported to the parent
        err = str(e)
    return os.getpid(), err, time.monotonic() - t0


def test_killed_rank_leaves_no_segment():
    n, local_size, victim, timeout_s = 4, 2, 3, 8
    before = fastar_segments()
    got, failures = run_workers(_kill_worker, n, local_size, victim, "leader", timeout_s, timeout=120,
                                allow_failures=True)
    assert set(failures) == {victim}, failures
    for r, (_, err, elapsed) in got.items():
        assert err is not None, f"rank {r} did not notice that rank {victim} died"
        assert elapsed < timeout_s + 15, f"rank {r} took {elapsed:.1f} s"
    # its node peer sees it through shared memory
    assert f"rank {victim}" in got[2][1], got[2][1]
    assert not leaked(before, {pid for pid, _, _ in got.values()})


def _halves_ref_input(rank, n, shard, dtype):
    g = torch.Generator().manual_seed(shard * 64 + rank)
    return torch.randint(-8, 9, (n * shard,), generator=g).to(dtype)


def _halves_worker(rank, n):
    import torch.distributed as dist

    import fastar
    dist.init_process_group("fastar", rank=rank, world_size=n, timeout=timedelta(seconds=60))
    be = fastar.backend.get_backend()
    gloo = dist.new_group(backend="gloo")
    errors = []

    def check(got, want, what):
        if not torch.equal(got, want):
            bad = (got != want).nonzero().flatten()
            errors.append(f"rank {rank} {what}: {bad.numel()} elements wrong, first at {bad[0].item()}: "
                          f"{got[bad[0]].item()} != {want[bad[0]].item()}")

    def native(what):
        name = be.records()[-1]["name"]
        if not name.startswith(f"fastar::{what}") or "delegated" in name:
            errors.append(f"rank {rank}: {what} ran as {name!r}")

    for shard in (1, 4097, 50_001):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            what = f"shard {shard} {dtype}"
            inp = _halves_ref_input(rank, n, shard, dtype)
            kept = inp.clone()
            # the reference without any collective: every rank's input, summed here (exact integers)
            every = [_halves_ref_input(r, n, shard, torch.float64) for r in range(n)]
            want_rs = sum(every)[rank * shard:(rank + 1) * shard].to(dtype)
            out = torch.full((shard,), 99, dtype=dtype)
            dist.reduce_scatter_tensor(out, inp)
            native("reduce_scatter")
            check(out, want_rs, f"reduce_scatter {what}")
            check(inp, kept, f"reduce_scatter's input {what}")
            ref = torch.empty_like(out)
            dist.reduce_scatter_tensor(ref, kept.clone(), group=gloo)
            check(out, ref, f"reduce_scatter against Gloo {what}")
            mine = inp[rank * shard:(rank + 1) * shard].clone()
            want_ag = torch.cat([e[r * shard:(r + 1) * shard] for r, e in enumerate(every)]).to(dtype)
            ag = torch.full((n * shard,), 99, dtype=dtype)
            dist.all_gather_into_tensor(ag, mine)
            native("allgather")
            check(ag, want_ag, f"allgather {what}")
    # two in flight on the backend's queue, each over many chunks
    shard = 50_001
    ins = [_halves_ref_input(rank, n, shard, torch.float32) for _ in range(2)]
    outs = [torch.empty(shard), torch.empty(n * shard)]
    works = [dist.reduce_scatter_tensor(outs[0], ins[0], async_op=True),
             dist.all_gather_into_tensor(outs[1], ins[1][:shard].clone(), async_op=True)]
    for w in works:
        w.wait()
    every = [_halves_ref_input(r, n, shard, torch.float64) for r in range(n)]
    check(outs[0], sum(every)[rank * shard:(rank + 1) * shard].float(), "async reduce_scatter")
    check(outs[1], torch.cat([e[:shard] for e in every]).float(), "async allgather")
    # Ranks that disagree raise on every rank, promptly: local rank 1 of each node passes another
    # size (the rails agree among themselves, each node's arena does not). A fresh group per call:
    # a failed group stays failed.
    for coll in ("reduce_scatter", "allgather"):
        grp = dist.new_group(backend="fastar")
        k = 20_000 + (3 if rank % 2 else 0)
        t0 = time.monotonic()
        try:
            if coll == "reduce_scatter":
                dist.reduce_scatter_tensor(torch.ones(k), torch.ones(n * k), group=grp)
            else:
                dist.all_gather_into_tensor(torch.ones(n * k), torch.ones(k), group=grp)
            errors.append(f"rank {rank}: a {coll} whose local ranks disagree gave no error")
        except Exception as e:  # noqa: BLE001 - checked below
            if "disagree" not in str(e):
                errors.append(f"rank {rank}: {coll} with disagreeing ranks raised {e}")
        if time.monotonic() - t0 > 20:
            errors.append(f"rank {rank}: {coll} with disagreeing ranks took {time.monotonic() - t0:.1f} s to raise")
    dist.barrier(group=gloo)
    dist.destroy_process_group()
    return os.getpid(), errors


def test_halves_between_nodes_pipelined():
    """reduce_scatter and allgather on the backend between 2 nodes x 2 (FASTAR_LOCAL_SIZE=2) with a
    64 KiB shared-memory chunk: the driver runs them in chunks, the rail's half of chunk c on its
    worker while the caller works on chunk c + 1 (a shard of 50001 float32 is 13 chunks of the
    reduce-scatter's 4096 elements, 7 of the allgather's 32768 bytes). Every result is exact: each
    rank's inputs summed (or gathered) here, and Gloo's answer to the same call. Then ranks that
    disagree (another size on local rank 1 of each node) raise on every rank, within 20 s."""
    shard, chunk = 50_001, 64 << 10
    assert -(-shard // (chunk // (4 * 4))) >= 8 and -(-shard * 4 // (chunk // 2)) >= 4  # several chunks each
    before = fastar_segments()
    env = {"FASTAR_LOCAL_SIZE": "2", "FASTAR_SHM_CHUNK_MB": "0.0625"}
    out = run_workers(_halves_worker, 4, init_dist=False, env=env, timeout=180)
    errors = [e for _, errs in out for e in errs]
    assert not errors, "\n".join(errors[:20])
    assert not leaked(before, {pid for pid, _ in out})
