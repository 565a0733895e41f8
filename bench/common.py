"""What the benchmark scripts share (they import it as `common`, from their own folder)."""
from __future__ import annotations

import json
import socket


def free_port() -> int:
    """A free TCP port on the loopback interface, for a job's MASTER_PORT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """A peer launcher's result: written to path (what allreduce_bw.py reads back), else printed."""
    text = json.dumps(out, indent=1)
    if path:
        with open(path, "w") as f:
            f.write(text)
    else:
        print(text)
