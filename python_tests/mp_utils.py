"""Spawns real worker processes on Gloo for the tests; nothing waits forever."""
from __future__ import annotations

import os
import queue
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, nprocs, port, env, init_dist, results, args, all_done):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(nprocs), **(env or {})})
    try:
        if init_dist:
            import torch.distributed as dist
            from datetime import timedelta
            dist.init_process_group("gloo", rank=rank, world_size=nprocs, timeout=timedelta(seconds=120))
        out = fn(rank, nprocs, *args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        # Stay alive until every rank has reported, as under torchrun, where the rendezvous store
        # (hosted here by rank 0) outlives the ranks: a rank that fails first must not take the
        # store, and the error reports its peers read from it, down with it.
        all_done.wait(60)
        try:
            import fastar
            fastar.shutdown()
        except Exception:  # noqa: BLE001
            pass


# Once every rank has reported, how long each still gets to exit by itself (at least; the call's
# deadline when that is later): the rendezvous wait ends at once, so this is interpreter shutdown.
EXIT_GRACE_S = 15.0


class WorkerError(RuntimeError):
    def __init__(self, failures: dict, results: dict):
        self.failures, self.results = failures, results
        super().__init__("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))


def run_workers(fn, nprocs: int, *args, timeout: float = 180, env: dict | None = None, init_dist: bool = True,
                allow_failures: bool = False, exitcodes: dict | None = None):
    """Runs fn(rank, nprocs, *args) in nprocs spawned processes (after init_process_group("gloo") unless
    init_dist=False) and returns their return values by rank. Raises WorkerError naming each failing
    rank with its traceback (or returns (results, failures) when allow_failures); kills every process
    still alive after `timeout` seconds. With `exitcodes` (a dict), fills it with each rank's exit
    code: 0 when a rank left by itself after every rank had reported (they get until the deadline,
    and at least EXIT_GRACE_S, to do so), -9 when it had to be killed."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    all_done = ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, nprocs, port, env, init_dist, results, args, all_done),
                         daemon=True)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    import time
    deadline = time.monotonic() + timeout
    got: dict = {}
    failures: dict = {}
    try:
        while len(got) + len(failures) < nprocs:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"workers did not finish within {timeout} s; finished: {sorted(got)}, "
                                   f"failed: {failures}")
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)
                        and r not in got and r not in failures]
                for r in dead:
                    failures[r] = f"process exited with code {procs[r].exitcode}"
                continue
            (got if ok else failures)[rank] = out
    finally:
        all_done.set()
        reported = len(got) + len(failures) == nprocs
        exit_by = max(deadline, time.monotonic() + EXIT_GRACE_S) if reported else deadline
        for p in procs:
            left = exit_by - time.monotonic()
            p.join(timeout=max(0.1, left if reported else min(10.0, left)))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if exitcodes is not None:
            exitcodes.update({r: p.exitcode for r, p in enumerate(procs)})
    if allow_failures:
        return got, failures
    if failures:
        raise WorkerError(failures, got)
    return [got[r] for r in range(nprocs)]
