"""Starts real worker processes on Gloo for the tests; nothing waits forever.

Workers are forked from a forkserver that has imported torch once (torch.multiprocessing's
"forkserver" with torch and torch.distributed preloaded): a spawned worker spends ~1.5 s of CPU
importing torch (on this 2-core host, 4 spawned workers took 3.2 s to start, 4 forked ones 0.1 s;
test_errors.py went from 205 to 97 s, test_backend.py from 115 to 60 s). A forked worker is a
fresh process in everything the tests look at: fastar (and every test module) is imported in the
worker, after the parent's environment (os.environ when run_workers was called, plus `env`) is in
place, and fastar's exit hooks (atexit) run when the worker's function returns, as at a normal exit.
What a fork cannot give: a variable read when the process starts (glibc's MALLOC_*, LD_PRELOAD), or
exit codes that include the interpreter's finalization: those callers pass start="spawn", and
run_workers spawns whenever the caller asks for exit codes.
"""
from __future__ import annotations

import atexit
import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

# What the forkserver imports once; fastar is left to the workers (its settings read the environment).
PRELOAD = ["torch", "torch.distributed"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, nprocs, port, env, init_dist, results, args, all_done, parent_env=None):
    if parent_env is not None:  # forked from the forkserver: the parent's environment of now, not the server's
        os.environ.clear()
        os.environ.update(parent_env)
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
        if parent_env is not None:
            # A forked worker ends in os._exit, which skips atexit: run the hooks a spawned worker's
            # interpreter would run (fastar's and the backend's shutdown), once.
            atexit._run_exitfuncs()


# Once every rank has reported, how long each still gets to exit by itself (at least; the call's
# deadline when that is later): the rendezvous wait ends at once, so this is interpreter shutdown.
EXIT_GRACE_S = 15.0


class WorkerError(RuntimeError):
    def __init__(self, failures: dict, results: dict):
        self.failures, self.results = failures, results
        super().__init__("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))


def run_workers(fn, nprocs: int, *args, timeout: float = 180, env: dict | None = None, init_dist: bool = True,
                allow_failures: bool = False, exitcodes: dict | None = None, start: str | None = None):
    """Runs fn(rank, nprocs, *args) in nprocs spawned processes (after init_process_group("gloo") unless
    init_dist=False) and returns their return values by rank. Raises WorkerError naming each failing
    rank with its traceback (or returns (results, failures) when allow_failures); kills every process
    still alive after `timeout` seconds. With `exitcodes` (a dict), fills it with each rank's exit
    code: 0 when a rank left by itself after every rank had reported (they get until the deadline,
    and at least EXIT_GRACE_S, to do so), -9 when it had to be killed; those workers are spawned, so
    that the code includes the interpreter's own exit. start: "spawn" or "forkserver" (the default;
    see the module's docstring)."""
    start = start or ("spawn" if exitcodes is not None else "forkserver")
    ctx = mp.get_context(start)
    parent_env = None
    if start == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
        parent_env = dict(os.environ)
    results = ctx.Queue()
    all_done = ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, nprocs, port, env, init_dist, results, args, all_done,
                                              parent_env), daemon=True)
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


# A rank that must stay alive without progressing (a stalled peer) until the ranks under test have
# seen what they should, instead of sleeping out a fixed worst case: the others mark a folder (a test's
# tmp_path) when they are done, and the staller waits for their marks, at most cap_s.

def mark_done(folder, rank: int) -> None:
    with open(os.path.join(str(folder), f"done.{rank}"), "w"):
        pass


def stay_until_done(folder, ranks, cap_s: float) -> float:
    """Sleeps until every rank in `ranks` has called mark_done(folder, rank), or cap_s; returns the
    seconds it stayed."""
    import time
    t0 = time.monotonic()
    while time.monotonic() - t0 < cap_s:
        if all(os.path.exists(os.path.join(str(folder), f"done.{r}")) for r in ranks):
            break
        time.sleep(0.05)
    return time.monotonic() - t0
