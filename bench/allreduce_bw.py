"""Allreduce bandwidth, nccl-tests style: fastar's hierarchies x algorithms against
torch.distributed.all_reduce on Gloo, all in the same run.

    python bench/allreduce_bw.py --nproc 4 [--local-size 2] --sizes 4K,256K,4M,64M --json out.json \
        [--plot out.png] [--iters N --warmup N] [--impls torch:gloo,fastar:flat:*] [--dtype float32] [--compression fp16]
    torchrun --nproc-per-node 4 bench/allreduce_bw.py --sizes ...      (WORLD_SIZE set: no spawning)

Impls: "torch:gloo" (torch.distributed.all_reduce on a Gloo group), "torch:fastar" (the same call on a
group of fastar's torch.distributed backend; only when named in --impls) and "fastar:<hierarchy>:<algorithm>"
for hierarchy in flat, leader, rail (leader and rail only with local_size > 1) and algorithm in
halving_doubling, ring, timed with fastar.all_reduce(..., validate=False) (no header exchange), and
"mpi:openmpi": Open MPI's MPI_Allreduce through mpi4py (bench/mpi_allreduce.py, launched with mpirun in
the same invocation, before fastar's workers start; in the default set when the bench extra is
installed), and "deepspeed:shm": DeepSpeed's shared-memory CPU allreduce (bench/deepspeed_allreduce.py,
by name only, with --deepspeed-python naming a Python that has deepspeed). One more
impl, "fastar:auto:auto", is timed with the defaults a user gets (auto choice, validate=True) at every
size (--auto-max caps it, for a shorter run).

Placement (--bind): each rank pinned to one core, or not at all, the same for every impl. The default
follows Open MPI's own (a core per rank for up to 2 ranks, nothing when the ranks outnumber the cores),
so mpi:openmpi runs as a user gets it and fastar's workers get the same placement.

Method, per size:
  warm-up: --warmup calls of every impl (default: adapted to size);
  timing:  --iters calls per impl (default: adapted so that each impl gets about --budget-s seconds),
           split into rounds; every round runs every impl once, in a rotated order, so that drift in
           the machine's load (it is shared) hits all impls alike. A block of calls starts after a
           barrier and its time is taken on each rank with perf_counter around the calls;
  time_us: per rank, the mean over all timed calls; reported: the max over ranks (nccl-tests'
           "time averaged across ranks" in its conservative form);
  algbw = bytes / time; busbw = algbw * 2 (n-1) / n, n = world size (the ring's bytes per link, so
           that busbw is comparable across world sizes and to the hardware's bandwidth);
  wrong:   a separate correctness pass per impl and size on integer-valued data whose sum is exact in
           the dtype: the number of elements that differ from the exact expected value, summed over ranks.
memcpy_GBps: one process (before the workers start, or rank 0 alone under torchrun), torch copy_ of a
64 MiB buffer: bytes / time, best of 10 copies with 1 thread and with one thread per core; the ceiling
every allreduce is measured against (memcpy_detail has each setting's best and median, and, when the
workers are spawned, concurrent_<k>_procs_GBps_each: the rate each of k single-threaded processes,
one per core, gets while all copy their own 64 MiB buffer at once: the ceiling of one rank).
core_round_trip_ns: a cache line's round trip between the first two cores (bench/stamp.py's
core_round_trip_ns()) before and after each phase (Open MPI before, fastar's workers, Open MPI after): whether the
host placed its cores where they share a cache. host_states classifies each phase; Open MPI's run in
the workers' placement is the one compared (common.best_of_runs).
The JSON carries bench/stamp.py's stamp (commit, dirty tree, host, core round trip when written).
"""
from __future__ import annotations

import argparse
import functools
import fnmatch
import os
import subprocess
import sys
import time
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import (MPI_DTYPES, MPI_IMPL, add_timing_args, adaptive_iters, around_workers,  # noqa: E402
                    bind_policy, exact_sum, exact_values, fmt_size, launch,
                    max_over_ranks, mpi_command, mpi_unavailable, parse_size, parse_sizes, pin_to_core, progress,
                    result_row, run_peer, timed_rounds, timing_argv, under_launcher, warm_counts)
from stamp import core_round_trip_ns, write_result  # noqa: E402

HIERARCHIES = ("flat", "leader", "rail")
ALGORITHMS = ("halving_doubling", "ring")
AUTO_IMPL = "fastar:auto:auto"
DEFAULT_SIZES = "4K,64K,256K,1M,4M,16M,64M"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def all_impls(local_size: int) -> list[str]:
    hiers = HIERARCHIES if local_size > 1 else ("flat",)
    mpi = [MPI_IMPL] if mpi_unavailable() is None else []
    return ["torch:gloo"] + mpi + [f"fastar:{h}:{a}" for h in hiers for a in ALGORITHMS] + [AUTO_IMPL]


# Open MPI (MPI_IMPL: bench/mpi_allreduce.py under mpirun, launched by main() before and after the
# workers): in the default set when mpi4py and mpirun are installed (the bench extra), else skipped
# with the reason.
# DeepSpeed's shared-memory CPU allreduce (bench/deepspeed_allreduce.py, run with --deepspeed-python):
# selected by name only, since DeepSpeed is not in the bench extra.
DS_IMPL = "deepspeed:shm"


# Selected by name only (--impls torch:fastar or torch:*): dist.all_reduce on a process group
# created with backend="fastar" (fastar's torch.distributed backend, docs/backend.md).
BACKEND_IMPL = "torch:fastar"


def select_impls(spec: str | None, local_size: int) -> list[str]:
    if not spec:
        return all_impls(local_size)
    avail = all_impls(local_size) + [BACKEND_IMPL, DS_IMPL] + ([MPI_IMPL] if mpi_unavailable() else [])
    out = []
    for pat in spec.split(","):
        pat = pat.strip()
        hits = [i for i in avail if fnmatch.fnmatchcase(i, pat)]
        if not hits:
            raise SystemExit(f"allreduce_bw: --impls entry {pat!r} matches none of {avail} "
                             "(leader and rail need --local-size > 1)")
        out += [h for h in hits if h not in out]
    return out


def impls_at(impls: list[str], nbytes: int, auto_max: int | None) -> list[str]:
    """The impls timed at one size: all, but fastar:auto:auto only up to auto_max when one is given."""
    return [i for i in impls if i != AUTO_IMPL or auto_max is None or nbytes <= auto_max]


def _copy_gbps(nbytes: int, reps: int) -> tuple[float, float]:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    times.sort()
    return nbytes / times[0] / 1e9, nbytes / times[len(times) // 2] / 1e9


def memcpy_gbps(nbytes: int = 64 << 20, reps: int = 10) -> dict:
    """Host memcpy bandwidth: bytes copied / time of torch copy_ of a 64 MiB buffer (twice the
    last-level cache of this host), one process, with 1 thread and with every core's thread.
    "GBps" (reported as memcpy_GBps, the ceiling) is the best of all; the medians say how much other
    load on the host moved it (a multi-threaded copy on a loaded host waits for its slowest thread)."""
    threads = torch.get_num_threads()
    out = {}
    try:
        for n in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(n)
            best, med = _copy_gbps(nbytes, reps)
            out[f"{n}_threads_best"], out[f"{n}_threads_median"] = best, med
    finally:
        torch.set_num_threads(threads)
    out["GBps"] = max(v for k, v in out.items() if k.endswith("_best"))
    return out


def _copy_rank(rank: int, world: int, nbytes: int, reps: int, start_at: float) -> float:
    pin_to_core(rank)
    torch.set_num_threads(1)
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    while time.time() < start_at:  # every rank starts copying at the same moment (no semaphores)
        pass
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return best


def concurrent_copy_gbps(nproc: int, nbytes: int = 64 << 20, reps: int = 10) -> float:
    """What each of nproc single-threaded processes (one per core) gets when all copy their own
    64 MiB buffer at once: bytes / time of the slowest rank's best copy. An allreduce rank with one
    thread moves its input and output at no more than this rate (docs/results.md, "the large path")."""
    start_at = time.time() + 3.0  # after every process has started and filled its buffers
    worst = max(launch(_copy_rank, nproc, nbytes, reps, start_at, timeout_s=120))
    return nbytes / worst / 1e9


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def fill_exact(t: torch.Tensor, rank: int) -> None:
    """common.exact_values: every sum is exact in every dtype."""
    t.copy_(exact_values(torch.arange(t.numel(), dtype=torch.int64), rank).to(t.dtype))


def expected_exact(numel: int, world: int) -> torch.Tensor:
    return exact_sum(torch.arange(numel, dtype=torch.int64), world).to(torch.float64)


class Runner:
    def __init__(self, args, rank: int, world: int, topo):
        import fastar
        self.fastar = fastar
        self.args, self.rank, self.world, self.topo = args, rank, world, topo
        self.gloo = dist.new_group(backend="gloo")  # the baseline's own group, like fastar has its own
        self.ctl = dist.new_group(backend="gloo")   # barriers and result gathering, never timed
        self.backend_group = None
        if BACKEND_IMPL in select_impls(args.impls, topo.local_size):
            if args.local_size:
                os.environ["FASTAR_LOCAL_SIZE"] = str(args.local_size)  # the backend's node layout
            self.backend_group = dist.new_group(backend="fastar")

    def caller(self, impl: str):
        """The call an impl times, bound once: the timed loop then calls the library directly, as
        bench/mpi_allreduce.py's loop calls comm.Allreduce (no dispatch of the harness's own)."""
        if impl == "torch:gloo":
            return functools.partial(dist.all_reduce, group=self.gloo)
        if impl == BACKEND_IMPL:
            return functools.partial(dist.all_reduce, group=self.backend_group)
        if impl == AUTO_IMPL:  # what a user gets: auto, validate=True
            if self.args.compression is None:
                return self.fastar.all_reduce
            return functools.partial(self.fastar.all_reduce, compression=self.args.compression)
        _, h, a = impl.split(":")
        return functools.partial(self.fastar.all_reduce, hierarchy=h, algorithm=a, validate=False,
                                 compression=self.args.compression)

    def block(self, impl: str, t: torch.Tensor, n: int) -> float:
        fn = self.caller(impl)
        dist.barrier(group=self.ctl)
        t0 = time.perf_counter()
        for _ in range(n):
            fn(t)
        return time.perf_counter() - t0

    def correctness(self, impl: str, numel: int, dtype) -> int:
        t = torch.empty(numel, dtype=dtype)
        fill_exact(t, self.rank)
        self.caller(impl)(t)
        wrong = int((t.to(torch.float64) != expected_exact(numel, self.world)).sum())
        w = torch.tensor([wrong], dtype=torch.int64)
        dist.all_reduce(w, group=self.ctl)
        return int(w.item())

    def measure_size(self, nbytes: int, impls: list[str], dtype) -> list[dict]:
        a = self.args
        if not impls:  # only external peers (mpi:openmpi, deepspeed:shm) were asked for
            return []
        esize = torch.empty((), dtype=dtype).element_size()
        numel = max(1, nbytes // esize)
        nbytes = numel * esize
        # timing buffers hold zeros: repeated in-place sums stay finite (no inf/NaN, no denormals)
        bufs = {i: torch.zeros(numel, dtype=dtype) for i in impls}
        nwarm = warm_counts(nbytes, a.warmup)
        warm_s = []
        for impl in impls:
            self.block(impl, bufs[impl], 1)  # first call: lazy set-up, not counted
            warm_s.append(self.block(impl, bufs[impl], max(1, nwarm - 1)) / max(1, nwarm - 1))
        iters = adaptive_iters(max_over_ranks(warm_s, self.ctl), impls, a)
        mean_s, done = timed_rounds(impls, iters, a.rounds, lambda impl, n: self.block(impl, bufs[impl], n))
        mean_s = max_over_ranks(mean_s, self.ctl)
        rows = []
        for impl, t in zip(impls, mean_s):
            wrong = self.correctness(impl, numel, dtype)
            rows.append(result_row(impl, nbytes, a.dtype, t, self.world, wrong, done[impl]))
        return rows


def print_table(rows: list[dict], world: int) -> None:
    print(f"# world_size {world}; time_us = max over ranks of the per-rank mean; "
          "vs gloo = torch:gloo time / this time; vs mpi = mpi:openmpi time / this time")
    print(f"#{'size':>10} {'count':>10} {'type':>8}  {'impl':<31} {'iters':>6} {'time(us)':>11} "
          f"{'algbw(GB/s)':>11} {'busbw(GB/s)':>11} {'#wrong':>6} {'vs gloo':>8} {'vs mpi':>7}")
    sizes = list(dict.fromkeys(r["bytes"] for r in rows))
    for b in sizes:
        rs = [r for r in rows if r["bytes"] == b]
        base = next((r["time_us"] for r in rs if r["impl"] in ("torch:gloo", "torch:nccl")), None)
        mpi = next((r["time_us"] for r in rs if r["impl"] == MPI_IMPL), None)
        for r in rs:
            esize = torch.empty((), dtype=DTYPES[r["dtype"]]).element_size()
            ratio = f"{base / r['time_us']:8.2f}" if base else f"{'-':>8}"
            vs_mpi = f"{mpi / r['time_us']:7.2f}" if mpi else f"{'-':>7}"
            print(f" {r['bytes']:>10} {r['bytes'] // esize:>10} {r['dtype']:>8}  {r['impl']:<31} "
                  f"{r.get('_iters', 0):>6} {r['time_us']:>11.1f} {r['algbw_GBps']:>11.3f} "
                  f"{r['busbw_GBps']:>11.3f} {r['wrong']:>6} {ratio} {vs_mpi}")
    print(f"# total #wrong: {sum(r['wrong'] for r in rows)}")


def worker(rank: int, world: int, args, memcpy: dict | None) -> dict | None:
    """One rank (common.launch, or torchrun): every impl at every size. Returns the results on rank 0."""
    torch.set_num_threads(1)  # the workers share the host's cores; the reductions are single-threaded
    args.bind = bind_policy(args.bind, world)  # resolved once: pinning changes what the auto rule would see
    if args.bind == "core":  # as mpirun binds its ranks (run_external passes the same policy)
        pin_to_core(int(os.environ.get("LOCAL_RANK", rank)))
    timeout = timedelta(seconds=args.timeout_s)
    dist.init_process_group("gloo", timeout=timeout)  # env:// (common.launch or torchrun set it)
    import fastar
    topo = fastar.init(local_size=args.local_size, timeout=timeout)
    if args.local_size and args.local_size > 1 and topo.local_size != args.local_size:
        raise RuntimeError(f"rank {rank}: asked for local_size {args.local_size}, fastar has {topo.local_size}")
    impls = [i for i in select_impls(args.impls, topo.local_size) if i not in (MPI_IMPL, DS_IMPL)]  # main() ran them
    runner = Runner(args, rank, world, topo)
    if memcpy is None:  # torchrun: rank 0 measures alone while the others wait
        dist.barrier(group=runner.ctl)
        objs = [memcpy_gbps() if rank == 0 else None]
        dist.barrier(group=runner.ctl)
        dist.broadcast_object_list(objs, 0, group=runner.ctl)
        memcpy = objs[0]
    dtype = DTYPES[args.dtype]
    sizes = parse_sizes(args.sizes)
    bar = progress(rank == 0 and not args.no_progress, len(sizes), f"allreduce_bw {world}p", "size")
    load_before = loadavg()
    t_start = time.time()
    rows = []
    for nbytes in sizes:
        rows += runner.measure_size(nbytes, impls_at(impls, nbytes, args.auto_max), dtype)
        bar.set_postfix_str(fmt_size(nbytes))
        bar.update(1)
    bar.close()
    out = None
    if rank == 0:
        out = {
            "world_size": world, "local_size": topo.local_size, "memcpy_GBps": memcpy["GBps"],
            "memcpy_detail": memcpy, "rows": rows,
            "dtype": args.dtype, "num_nodes": topo.num_nodes, "compression": args.compression,
            "time_us_is": "per-rank mean over timed calls, max over ranks",
            "timed_with": "fastar.all_reduce(validate=False) for fastar:<h>:<a>; "
                          "fastar.all_reduce() defaults (auto, validate=True) for fastar:auto:auto",
            "loadavg_before": load_before, "loadavg_after": loadavg(),  # host, cores, torch: the stamp
            "wall_s": time.time() - t_start,
            "command": "python bench/allreduce_bw.py " + " ".join(args.argv), "bind": args.bind,
            "auto_max": args.auto_max,
        }
    dist.barrier(group=runner.ctl)
    fastar.shutdown()
    dist.destroy_process_group()
    return out  # main() adds the external peers' rows and writes the results


def finish(out: dict, args) -> None:
    """Joins the external peers' rows (args.external) to the workers', prints the table, writes the
    JSON and the plot."""
    rows = sorted(out["rows"] + [r for res in args.external for r in res["rows"]], key=lambda r: r["bytes"])
    print_table(rows, out["world_size"])  # the sort is stable: each size's impls stay in order
    out["rows"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    out["iters"] = {f"{r['impl']}@{r['bytes']}": r["_iters"] for r in rows}
    out["external"] = {res["rows"][0]["impl"] if res["rows"] else str(i): {k: v for k, v in res.items() if k != "rows"}
                       for i, res in enumerate(args.external)}
    memcpy = out["memcpy_detail"]
    print(f"# memcpy_GBps {memcpy['GBps']:.2f} ({', '.join(f'{k} {v:.1f}' for k, v in memcpy.items() if k != 'GBps')}); "
          f"load average before {out['loadavg_before']}, after {out['loadavg_after']}; {out['wall_s']:.0f} s")
    if out.get("core_round_trip_ns"):
        rt = out["core_round_trip_ns"]
        print(f"# core-to-core round trip of a cache line: {rt['before']} ns before fastar's workers, {rt['after']} ns "
              f"after; host placement: {out.get('host_states')}")
    if args.json:
        write_result(out, args.json, cpu=True)
        print(f"# wrote {args.json}")
    if args.plot:
        from plot import plot_allreduce
        plot_allreduce(out, args.plot)
        print(f"# wrote {args.plot}")


def run_external(impl: str, args, nproc: int) -> dict | None:
    """Runs another library's allreduce (mpi:openmpi under mpirun, deepspeed:shm with its own spawner)
    with this invocation's sizes, timing rules and placement, on as many ranks, while fastar's workers
    do not run (so that they never share the cores): Open MPI before and after them (best_of_runs),
    DeepSpeed before. Its rows join the same table and JSON. None when not selected (or, unasked for
    by name, when it cannot run here: the reason is printed)."""
    if impl not in select_impls(args.impls, args.local_size or nproc):
        return None
    bind = bind_policy(args.bind, nproc)
    if impl == MPI_IMPL:
        why = mpi_unavailable() or (None if args.dtype in MPI_DTYPES else
                                    f"dtype {args.dtype}: MPI has no {args.dtype} sum in its standard ops")
        cmd, shown = (None, None) if why else mpi_command(nproc, bind)
    else:
        why = deepspeed_unavailable(args)
        cmd = [args.deepspeed_python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed_allreduce.py"),
               "--nproc", str(nproc), "--bind", bind, "--timeout-s", str(args.timeout_s)]
        shown = ["python", "bench/deepspeed_allreduce.py"] + cmd[2:]
    if why:
        if args.impls:  # asked for by name
            raise SystemExit(f"allreduce_bw: {impl} cannot run: {why}")
        print(f"# {impl} skipped: {why}", file=sys.stderr)
        return None
    rules = ["--sizes", ",".join(map(str, parse_sizes(args.sizes))), "--dtype", args.dtype] + timing_argv(args)
    return run_peer(f"allreduce_bw: {impl}", cmd, shown, rules, args.timeout_s + 300)


def deepspeed_unavailable(args) -> str | None:
    """Why deepspeed:shm cannot run with --deepspeed-python, or None (it imports deepspeed there)."""
    p = subprocess.run([args.deepspeed_python, "-c", "import deepspeed"], capture_output=True, text=True)
    if p.returncode != 0:
        return (f"{args.deepspeed_python} cannot import deepspeed (DeepSpeed is not in the bench extra: see "
                "docs/results.md for the set-up that measured it; pass --deepspeed-python)")
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="local workers to spawn when WORLD_SIZE is unset")
    ap.add_argument("--local-size", type=int, default=None,
                    help="ranks per simulated node (default: LOCAL_WORLD_SIZE under torchrun, else host names)")
    ap.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated bytes, K/M/G suffixes ({DEFAULT_SIZES})")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--compression", default=None, choices=["fp16", "bf16"],
                    help="fastar's wire dtype (the fastar impls only; the data's sums stay exact: small integers)")
    ap.add_argument("--impls", default=None, help="comma-separated impl names or globs, e.g. 'torch:gloo,fastar:flat:*'")
    add_timing_args(ap)
    ap.add_argument("--auto-max", type=parse_size, default=None,
                    help="largest size timed for fastar:auto:auto (default: every size)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of busbw and time against size")
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--deepspeed-python", default=sys.executable,
                    help="the Python with deepspeed installed, for the impl deepspeed:shm (default: this one)")
    ap.add_argument("--bind", choices=("auto", "core", "none"), default="auto",
                    help="pin each rank to a core (fastar's workers and mpirun alike); auto: Open MPI's default "
                         "(core for up to 2 ranks, else none)")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.argv = argv
    args.external = []
    if under_launcher():  # torchrun (or any launcher that sets the env:// variables)
        for ext in (MPI_IMPL, DS_IMPL):
            if args.impls and ext in select_impls(args.impls, args.local_size or 1):
                print(f"# {ext} skipped: under torchrun the ranks exist already; run without torchrun to "
                      "launch it in the same invocation", file=sys.stderr)
        out = launch(worker, args.nproc, args, None)[int(os.environ["RANK"])]
        if out is not None:
            finish(out, args)
        return 0
    if args.nproc < 1:
        ap.error("--nproc must be >= 1")
    if args.local_size and args.nproc % args.local_size:
        ap.error(f"--local-size {args.local_size} does not divide --nproc {args.nproc}")
    memcpy = memcpy_gbps()  # single process, before the workers exist
    cores = len(os.sched_getaffinity(0))
    memcpy[f"concurrent_{min(args.nproc, cores)}_procs_GBps_each"] = concurrent_copy_gbps(min(args.nproc, cores))
    ds = []

    def workers() -> dict:  # DeepSpeed (when asked for) runs in the workers' phase, before them
        ds.append(run_external(DS_IMPL, args, args.nproc))
        return launch(worker, args.nproc, args, memcpy)[0]

    out, mpi, rt, states = around_workers(lambda: run_external(MPI_IMPL, args, args.nproc), workers,
                                          core_round_trip_ns)
    args.external = [r for r in (mpi, ds[0]) if r]
    out["core_round_trip_ns"] = rt
    out["host_states"] = states
    finish(out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
