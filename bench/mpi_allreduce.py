"""Open MPI's collectives, timed by bench/allreduce_bw.py's rules: the peer "mpi:openmpi" of
bench/allreduce_bw.py (MPI_Allreduce) and of bench/halves_bw.py (MPI_Reduce_scatter_block and
MPI_Allgather).

Those scripts launch it with mpirun in the same invocation (before and after their own workers,
common.around_workers) and merge its rows into the same table and JSON; it can be run alone too:

    mpirun -np 2 --oversubscribe --bind-to none python bench/mpi_allreduce.py --sizes 4096,65536 --json out.json
    mpirun -np 2 ... python bench/mpi_allreduce.py --collective reduce_scatter,allgather --sizes ... --json out.json

Every rank calls comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM), comm.Reduce_scatter_block(whole,
shard, op=MPI.SUM) or comm.Allgather(shard, whole) on NumPy buffers (mpi4py's buffer path: no
pickling), float32 sums like the other impls; the same warm-up, adaptive iteration counts, rounds,
barrier before each block of calls, per-rank mean and max over ranks, and the same exact-integer
correctness pass (bench/common.py). For the halves a size is the whole buffer (reduce-scatter's
input, allgather's output), a multiple of the world size in elements, as in halves_bw.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import (MPI_IMPL, add_timing_args, emit_json, exact_sum, exact_values, result_row,  # noqa: E402
                    time_one)

NP_DTYPES = {"float32": np.float32, "float64": np.float64}
COLLECTIVES = ("allreduce", "reduce_scatter", "allgather")


def buffers(coll: str, numel: int, rank: int, world: int, dt) -> tuple:
    """(the call's input, its output, the exact output expected) for one collective: the input holds
    common.exact_values of the whole buffer's indices (allgather: this rank's shard of them)."""
    idx = np.arange(numel, dtype=np.int64)
    data = exact_values(idx, rank).astype(dt)
    if coll == "allreduce":  # in place
        return data, data, exact_sum(idx, world)
    shard = numel // world
    mine = slice(rank * shard, (rank + 1) * shard)
    if coll == "reduce_scatter":
        return data, np.empty(shard, dtype=dt), exact_sum(idx[mine], world)
    want = np.concatenate([exact_values(idx[r * shard:(r + 1) * shard], r) for r in range(world)])
    return data[mine].copy(), np.empty(numel, dtype=dt), want


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", required=True, help="comma-separated sizes in bytes")
    ap.add_argument("--collective", default="allreduce",
                    help=f"comma-separated, from {','.join(COLLECTIVES)} (rows carry `collective` unless allreduce)")
    ap.add_argument("--dtype", default="float32", choices=sorted(NP_DTYPES))
    add_timing_args(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    colls = [c for c in args.collective.split(",") if c]
    if set(colls) - set(COLLECTIVES):
        ap.error(f"--collective: {sorted(set(colls) - set(COLLECTIVES))} not in {COLLECTIVES}")
    from mpi4py import MPI  # noqa: PLC0415 - only under mpirun
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    dt = NP_DTYPES[args.dtype]
    esize = np.dtype(dt).itemsize
    calls = {"allreduce": lambda src, dst: comm.Allreduce(MPI.IN_PLACE, dst, op=MPI.SUM),
             "reduce_scatter": lambda src, dst: comm.Reduce_scatter_block(src, dst, op=MPI.SUM),
             "allgather": comm.Allgather}

    def block(call, src, dst, n: int) -> float:
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            call(src, dst)
        return time.perf_counter() - t0

    rows = []
    for nbytes in [int(s) for s in args.sizes.split(",") if s.strip()]:
        for coll in colls:
            numel = max(1, nbytes // esize)
            if coll != "allreduce":
                numel = max(world, numel // world * world)
            call = calls[coll]
            # timing buffers hold zeros: repeated in-place sums stay finite
            src = np.zeros(numel if coll != "allgather" else numel // world, dtype=dt)
            dst = src if coll == "allreduce" else np.zeros(numel // world if coll == "reduce_scatter" else numel, dtype=dt)
            t, done = time_one(MPI_IMPL, numel * esize, args, lambda n: block(call, src, dst, n),
                               lambda x: comm.allreduce(x, op=MPI.MAX))
            src, dst, want = buffers(coll, numel, rank, world, dt)
            call(src, dst)
            wrong = comm.allreduce(int((dst.astype(np.float64) != want.astype(np.float64)).sum()), op=MPI.SUM)
            row = result_row(MPI_IMPL, numel * esize, args.dtype, t, world, wrong, done)
            rows.append(row if coll == "allreduce" else {"collective": coll, **row})
    if rank == 0:
        out = {"world_size": world, "rows": rows, "library": MPI.Get_library_version().strip(),
               "mpi4py": __import__("mpi4py").__version__, "collectives": colls}
        emit_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
