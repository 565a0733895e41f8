"""Open MPI's allreduce, timed by bench/allreduce_bw.py's rules: the impl "mpi:openmpi".

allreduce_bw.py launches it with mpirun in the same invocation (before its own workers start) and
merges its rows into the same table and JSON; it can be run alone too:

    mpirun -np 2 --oversubscribe --bind-to none python bench/mpi_allreduce.py --sizes 4096,65536 --json out.json

Every rank calls comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM) on a NumPy view of a torch tensor
(mpi4py's buffer path: no pickling), float32 sums like the other impls; the same warm-up, adaptive
iteration counts, rounds, barrier before each block of calls, per-rank mean and max over ranks, and
the same exact-integer correctness pass (bench/common.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from common import add_timing_args, emit_json, result_row, time_one  # noqa: E402

IMPL = "mpi:openmpi"
NP_DTYPES = {"float32": np.float32, "float64": np.float64}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", required=True, help="comma-separated sizes in bytes")
    ap.add_argument("--dtype", default="float32", choices=sorted(NP_DTYPES))
    add_timing_args(ap)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from mpi4py import MPI  # noqa: PLC0415 - only under mpirun
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    dt = NP_DTYPES[args.dtype]
    esize = np.dtype(dt).itemsize

    def block(buf, n: int) -> float:
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return time.perf_counter() - t0

    rows = []
    for nbytes in [int(s) for s in args.sizes.split(",") if s.strip()]:
        numel = max(1, nbytes // esize)
        nbytes = numel * esize
        buf = np.zeros(numel, dtype=dt)  # zeros: repeated in-place sums stay finite
        t, done = time_one(IMPL, nbytes, args, lambda n: block(buf, n), lambda x: comm.allreduce(x, op=MPI.MAX))
        # exact-integer correctness pass, the values of allreduce_bw.fill_exact
        idx = np.arange(numel, dtype=np.int64)
        data = ((idx * 7 + rank) % 9 + rank).astype(dt)
        comm.Allreduce(MPI.IN_PLACE, data, op=MPI.SUM)
        want = sum(((idx * 7 + r) % 9 + r) for r in range(world)).astype(np.float64)
        wrong = comm.allreduce(int((data.astype(np.float64) != want).sum()), op=MPI.SUM)
        rows.append(result_row(IMPL, nbytes, args.dtype, t, world, wrong, done))
    if rank == 0:
        out = {"world_size": world, "rows": rows, "library": MPI.Get_library_version().strip(),
               "mpi4py": __import__("mpi4py").__version__}
        emit_json(out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
