"""Reduce-scatter and allgather on the "fastar" torch.distributed backend against Gloo and Open MPI.

    python bench/halves_bw.py --nproc 2 --json bench/results/halves_1x2.json

For each size (the bytes of the whole buffer: reduce-scatter's input, allgather's output; a multiple
of the world size in float32 elements) and each collective, it times fastar's own calls
(`fastar.reduce_scatter_single` / `fastar.all_gather_single` with their defaults: impl "fastar", as
bench/allreduce_bw.py times fastar.all_reduce), `dist.reduce_scatter_single` /
`dist.all_gather_single` on a Gloo group and on a "fastar" group of the same ranks (impl
"torch:fastar": the backend, what FSDP gets), and, as the yardstick of what the halves save,
`dist.all_reduce` of the whole buffer on the fastar group (what the backend ran for a reduce-scatter
before it had the halves: an allreduce, then a copy of the shard). Open MPI's MPI_Reduce_scatter_block and MPI_Allgather (impl "mpi:openmpi", through mpi4py:
bench/mpi_allreduce.py --collective) run as allreduce_bw.py runs its MPI_Allreduce: under mpirun in
the same invocation, before and after the workers (never at the same time), the same sizes, timing
rules and placement (--bind), the run in the workers' host placement compared
(common.around_workers); skipped, with the reason, when mpi4py or mpirun is missing or --no-mpi.
The timing rules are bench/allreduce_bw.py's (bench/common.py): warm-up, adaptive iteration counts,
interleaved rounds, the max over ranks of the mean per call. Every result is checked against exact
integer sums (each row's `wrong`: elements that differ, summed over ranks).
Progress on rank 0 (tqdm); the JSON (stamped: bench/stamp.py) holds every row and the ratios
other time / fastar time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from stamp import core_round_trip_ns, write_result  # noqa: E402

COLLECTIVES = ("reduce_scatter", "allgather")
IMPLS = ("torch:gloo", "fastar", "torch:fastar", "torch:fastar allreduce")
MPI_CALLS = {"reduce_scatter": "MPI_Reduce_scatter_block", "allgather": "MPI_Allgather"}


def whole_bytes(nbytes: int, world: int) -> int:
    """A size as measured: float32 elements, a multiple of the world size, at least one per rank."""
    return max(world, nbytes // 4 // world * world) * 4


def _worker(rank: int, world: int, args) -> dict | None:
    torch.set_num_threads(1)  # the workers share the host's cores, as allreduce_bw.py's
    if args.bind == "core":  # as mpirun places its ranks (the same policy)
        common.pin_to_core(rank)
    import fastar  # registers "fastar"
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))  # env:// (common.launch)
    fastar.init()  # fastar's own calls: its process groups and arena, beside the "fastar" group's
    groups = {"torch:gloo": dist.new_group(backend="gloo"), "torch:fastar": dist.new_group(backend="fastar")}
    groups["torch:fastar allreduce"] = groups["torch:fastar"]
    ctl = dist.new_group(backend="gloo")
    rows = []
    sizes = common.parse_sizes(args.sizes)
    bar = common.progress(rank == 0 and not args.no_progress, len(sizes) * len(COLLECTIVES), f"halves_bw {world}p",
                          "case")
    for nbytes in sizes:
        whole = whole_bytes(nbytes, world) // 4
        shard = whole // world
        # integer values: every sum is exact, so each answer must equal the reference bit for bit
        idx = torch.arange(whole, dtype=torch.int64)
        full = common.exact_values(idx, rank).float()
        mine = full[rank * shard:(rank + 1) * shard].clone()
        expect = {"reduce_scatter": common.exact_sum(idx[rank * shard:(rank + 1) * shard], world).float(),
                  "allgather": torch.cat([common.exact_values(idx[r * shard:(r + 1) * shard], r)
                                          for r in range(world)]).float(),
                  "allreduce": common.exact_sum(idx, world).float()}
        for coll in COLLECTIVES:
            out = torch.empty(shard if coll == "reduce_scatter" else whole)
            buf = torch.zeros(whole)  # the yardstick's buffer: zeros, repeated in-place sums stay finite

            def call(impl: str, dst=out, src=full, ar=buf) -> None:
                if impl == "fastar":
                    if coll == "reduce_scatter":
                        fastar.reduce_scatter_single(dst, src)
                    else:
                        fastar.all_gather_single(dst, mine)
                    return
                g = groups[impl]
                if impl == "torch:fastar allreduce":
                    dist.all_reduce(ar, group=g)
                elif coll == "reduce_scatter":
                    dist.reduce_scatter_single(dst, src, group=g)
                else:
                    dist.all_gather_single(dst, mine, group=g)

            def block(impl: str, n: int) -> float:
                dist.barrier(group=ctl)
                t0 = time.perf_counter()
                for _ in range(n):
                    call(impl)
                return time.perf_counter() - t0

            wrong = {}
            for impl in IMPLS:  # the correctness pass, on fresh buffers
                is_ar = impl.endswith("allreduce")
                got = full.clone() if is_ar else torch.zeros_like(out)
                call(impl, dst=got, ar=got)
                w = torch.tensor([int((got != expect["allreduce" if is_ar else coll]).sum())], dtype=torch.int64)
                dist.all_reduce(w, group=ctl)
                wrong[impl] = int(w.item())
            warm = []
            for impl in IMPLS:
                block(impl, 1)
                nw = common.warm_counts(whole * 4, args.warmup)
                warm.append(block(impl, nw) / nw)
            iters = common.adaptive_iters(common.max_over_ranks(warm, ctl), list(IMPLS), args)
            means, done = common.timed_rounds(list(IMPLS), iters, args.rounds, block)
            for impl, t in zip(IMPLS, common.max_over_ranks(means, ctl)):
                rows.append({"collective": coll, "impl": impl, "bytes": whole * 4, "time_us": t * 1e6,
                             "iters": done[impl], "wrong": wrong[impl]})
            bar.update(1)
    bar.close()
    dist.barrier(group=ctl)
    dist.destroy_process_group()
    return {"world": world, "local_size": world, "rows": rows} if rank == 0 else None


def mpi_rows(res: dict) -> list[dict]:
    """mpi_allreduce.py's rows in this script's form."""
    return [{"collective": r["collective"], "impl": r["impl"], "bytes": r["bytes"], "time_us": r["time_us"],
             "iters": r["_iters"], "wrong": r["wrong"]} for r in res["rows"]]


# ratio name -> (numerator impl, denominator impl); above 1: the denominator takes less time
RATIOS = {"mpi_over_fastar": (common.MPI_IMPL, "fastar"),  # fastar's own calls, as allreduce_bw's
          "mpi_over_backend": (common.MPI_IMPL, "torch:fastar"),
          "gloo_over_backend": ("torch:gloo", "torch:fastar"),  # both through torch.distributed
          "allreduce_over_backend": ("torch:fastar allreduce", "torch:fastar"),
          "backend_over_fastar": ("torch:fastar", "fastar")}  # what torch.distributed's call costs


def ratios_of(rows: list[dict]) -> dict:
    """Per collective and size: the RATIOS present in the rows."""
    out = {}
    for coll in COLLECTIVES:
        for nbytes in sorted({r["bytes"] for r in rows}):
            t = {r["impl"]: r["time_us"] for r in rows if r["collective"] == coll and r["bytes"] == nbytes}
            out[f"{coll} {nbytes}"] = {key: t[a] / t[b] for key, (a, b) in RATIOS.items() if a in t and b in t}
    return out


def _cell(v, width: int, digits: int) -> str:
    return f"{v:>{width}.{digits}f}" if v is not None else f"{'-':>{width}}"


def print_table(rows: list[dict]) -> None:
    print(f"{'collective':16}{'bytes':>10}{'gloo us':>11}{'mpi us':>11}{'fastar us':>11}{'backend us':>12}"
          f"{'allreduce us':>14}{'gloo/backend':>14}{'mpi/fastar':>12}{'mpi/backend':>13}{'wrong':>7}")
    for coll in COLLECTIVES:
        for nbytes in sorted({r["bytes"] for r in rows}):
            rs = [r for r in rows if r["collective"] == coll and r["bytes"] == nbytes]
            t = {r["impl"]: r["time_us"] for r in rs}
            mpi = t.get(common.MPI_IMPL)
            f, b = t["fastar"], t["torch:fastar"]
            print(f"{coll:16}{nbytes:>10}{t['torch:gloo']:>11.1f}{_cell(mpi, 11, 1)}{f:>11.1f}{b:>12.1f}"
                  f"{t['torch:fastar allreduce']:>14.1f}{t['torch:gloo'] / b:>14.2f}"
                  f"{_cell(mpi / f if mpi else None, 12, 2)}{_cell(mpi / b if mpi else None, 13, 2)}"
                  f"{sum(r['wrong'] for r in rs):>7}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sizes", default="4K,64K,1M,16M", help="whole-buffer bytes, comma-separated (K/M/G)")
    ap.add_argument("--json", default=None, help="where to write the results (default: print them)")
    common.add_timing_args(ap)
    ap.add_argument("--bind", choices=("auto", "core", "none"), default="auto",
                    help="pin each rank to a core (the workers and mpirun alike); auto: Open MPI's default")
    ap.add_argument("--no-mpi", action="store_true", help="leave out Open MPI's rows")
    ap.add_argument("--timeout-s", type=float, default=120)
    ap.add_argument("--no-progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    args.bind = common.bind_policy(args.bind, args.nproc)
    # the sizes as measured, so that Open MPI's ranks get the same buffers
    args.sizes = ",".join(str(whole_bytes(b, args.nproc)) for b in common.parse_sizes(args.sizes))
    why = "--no-mpi" if args.no_mpi else common.mpi_unavailable()
    peer = lambda: None  # noqa: E731
    if why:
        print(f"# {common.MPI_IMPL} skipped: {why}", file=sys.stderr)
    else:
        cmd, shown = common.mpi_command(args.nproc, args.bind)
        rules = ["--collective", ",".join(COLLECTIVES), "--sizes", args.sizes, "--dtype", "float32"] \
            + common.timing_argv(args)
        peer = lambda: common.run_peer("halves_bw: mpi:openmpi", cmd, shown, rules, args.timeout_s + 300)  # noqa: E731
    out, mpi, rt, states = common.around_workers(
        peer, lambda: common.launch(_worker, args.nproc, args, timeout_s=args.timeout_s + 600)[0], core_round_trip_ns)
    if mpi:
        out["rows"] += mpi_rows(mpi)
        out["external"] = {common.MPI_IMPL: {k: v for k, v in mpi.items() if k != "rows"}}
    else:
        out["mpi_skipped"] = why
    out["rows"].sort(key=lambda r: (r["bytes"], COLLECTIVES.index(r["collective"])))
    out.update(ratios=ratios_of(out["rows"]), wrong=sum(r["wrong"] for r in out["rows"]),
               core_round_trip_ns=rt, host_states=states, bind=args.bind,
               command="python bench/halves_bw.py " + " ".join(argv))
    print_table(out["rows"])
    if args.json:
        write_result(out, args.json, cpu=True)
        print(f"# wrote {args.json}")
    else:
        common.emit_json(out, None)
    if out["wrong"]:
        raise SystemExit(f"halves_bw: {out['wrong']} wrong elements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
