"""DeepSpeed's shared-memory CPU allreduce, timed by bench/allreduce_bw.py's rules: the impl "deepspeed:shm".

It needs a Python with deepspeed installed (its shm op is compiled on first use, by torch's JIT
extension builder, into ~/.cache/torch_extensions: g++ and ninja, a minute or two, then cached);
neither oneCCL nor intel_extension_for_pytorch is needed. It spawns its own ranks on this host:

    python bench/deepspeed_allreduce.py --nproc 2 --sizes 4096,4194304 --json out.json

or runs as one rank under DeepSpeed's launcher or torchrun (WORLD_SIZE set: no spawning):

    deepspeed --num_accelerators 2 bench/deepspeed_allreduce.py --sizes 4096,4194304 --json out.json

Every rank calls deepspeed.comm.inference_all_reduce(buf) in place: with DeepSpeed's CPU accelerator
(DS_ACCELERATOR=cpu, Gloo for the process group) that is its ShareMemCommBuilder op,
torch.ops.deepspeed.inference_all_reduce_, which sums through POSIX shared memory when every rank is
on this host (LOCAL_SIZE == WORLD_SIZE). DeepSpeed falls back silently to a Gloo all_reduce when the
op is missing or the CPU lacks the ISA its kernels need, and leaves other dtypes untouched; this
script checks those conditions first and refuses rather than time something else. The same warm-up,
adaptive iteration counts, rounds, barrier before each block of calls, per-rank mean and max over
ranks, and the same exact-integer correctness pass as the other impls (bench/common.py). Each rank
runs --threads OpenMP/torch threads (default 1, as allreduce_bw.py's workers).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (add_timing_args, emit_json, exact_sum, exact_values, launch, max_over_ranks,  # noqa: E402
                    pin_to_core, result_row, time_one)

IMPL = "deepspeed:shm"
# the dtypes the shm kernels reduce, and the vector_kernel_level() each needs: fp32 uses AVX2 (1),
# bf16/fp16 AVX-512BW (2); DeepSpeed returns other dtypes unreduced
DTYPE_LEVEL = {"float32": 1, "bfloat16": 2, "float16": 2}
SHM_PREFIX = "deepspeed_allreduce_buffer"  # the name DeepSpeed's shm.cpp gives its segments


def shm_segment(rank: int) -> str:
    """This job's shared-memory segment of a rank (DeepSpeed never unlinks it: we do, at the end)."""
    return (f"/dev/shm/{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def worker(rank: int, world: int, args) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch  # noqa: PLC0415
    import torch.distributed as tdist  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    if args.bind == "core":  # as allreduce_bw.py pins its own workers (its --bind)
        pin_to_core(int(os.environ.get("LOCAL_RANK", rank)))
    dtype = getattr(torch, args.dtype)
    local_size = int(os.environ.get("LOCAL_SIZE", "0"))
    if world < 2:
        raise SystemExit(f"{IMPL}: world size {world}: with one rank DeepSpeed returns the tensor untouched")
    if local_size != world:  # DeepSpeed's shm initialize() keys on LOCAL_SIZE; without it the op is unusable
        raise SystemExit(f"{IMPL}: LOCAL_SIZE={local_size or 'unset'} but WORLD_SIZE={world}: DeepSpeed's shm "
                         "allreduce needs every rank on this host")
    try:
        import deepspeed  # noqa: PLC0415
        import deepspeed.comm as dscomm  # noqa: PLC0415
    except ImportError as e:
        raise SystemExit(f"{IMPL} cannot run: {e} (this Python, {sys.executable}, has no deepspeed)") from e
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    if get_accelerator().device_name() != "cpu":
        raise SystemExit(f"{IMPL}: DeepSpeed's accelerator is {get_accelerator().device_name()!r}, not cpu "
                         "(set DS_ACCELERATOR=cpu)")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=args.timeout_s))
    cdb = dscomm.comm.cdb  # DeepSpeed's TorchBackend: holds the loaded op and the host's ISA level
    op = getattr(cdb, "shm_comm_op", None)
    level = getattr(cdb, "shm_vector_kernel_level", 0)
    why = None
    if op is None:
        why = "DeepSpeed did not load its ShareMemCommBuilder op (not compatible here)"
    elif not hasattr(torch.ops.deepspeed, "inference_all_reduce_"):
        why = "torch.ops.deepspeed.inference_all_reduce_ is not registered"
    elif level < DTYPE_LEVEL[args.dtype]:
        why = f"this CPU's vector level {level} < {DTYPE_LEVEL[args.dtype]} that {args.dtype} needs"
    if why:  # deepspeed.comm.inference_all_reduce would fall back to Gloo: refuse to time that
        raise SystemExit(f"{IMPL} cannot run: {why}")

    def block(buf, n: int) -> float:
        tdist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            dscomm.inference_all_reduce(buf)
        return time.perf_counter() - t0

    esize = torch.empty((), dtype=dtype).element_size()
    rows = []
    try:
        for nbytes in [int(s) for s in args.sizes.split(",") if s.strip()]:
            numel = max(1, nbytes // esize)
            nbytes = numel * esize
            buf = torch.zeros(numel, dtype=dtype)  # zeros: repeated in-place sums stay finite
            t, done = time_one(IMPL, nbytes, args, lambda n: block(buf, n), max_over_ranks)
            # exact-integer correctness pass (common.exact_values)
            idx = torch.arange(numel, dtype=torch.int64)
            data = exact_values(idx, rank).to(dtype)
            tdist.barrier()
            dscomm.inference_all_reduce(data)
            want = exact_sum(idx, world).to(torch.float64)
            wrong = torch.tensor([int((data.to(torch.float64) != want).sum())], dtype=torch.int64)
            tdist.all_reduce(wrong)
            rows.append(result_row(IMPL, nbytes, args.dtype, t, world, int(wrong.item()), done))
        tdist.barrier()  # every rank is done with every segment
    finally:
        try:
            os.unlink(shm_segment(rank))
        except OSError:
            pass
    if rank == 0:
        out = {"world_size": world, "local_size": local_size, "rows": rows,
               "library": f"DeepSpeed {deepspeed.__version__} shm allreduce "
                          "(deepspeed.comm.inference_all_reduce -> torch.ops.deepspeed.inference_all_reduce_)",
               "deepspeed": deepspeed.__version__, "torch": torch.__version__,
               "shm_op": getattr(op, "__file__", None), "vector_kernel_level": level,
               "process_group": tdist.get_backend(), "threads_per_rank": args.threads}
        emit_json(out, args.json)
    tdist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn on this host (ignored when WORLD_SIZE is set)")
    ap.add_argument("--sizes", required=True, help="comma-separated sizes in bytes")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPE_LEVEL))
    add_timing_args(ap)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP/torch threads per rank")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--json", default=None)
    ap.add_argument("--bind", choices=("core", "none"), default="none", help="pin each rank to a core")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DeepSpeed's launcher
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before any rank's OpenMP runtime starts
    if "WORLD_SIZE" in os.environ:  # DeepSpeed's launcher, torchrun, or any env:// launcher
        # torchrun says LOCAL_WORLD_SIZE; DeepSpeed's shm op reads LOCAL_SIZE
        if "LOCAL_SIZE" not in os.environ and "LOCAL_WORLD_SIZE" in os.environ:
            os.environ["LOCAL_SIZE"] = os.environ["LOCAL_WORLD_SIZE"]
    elif args.nproc < 2:
        ap.error("--nproc must be at least 2 (with one rank DeepSpeed returns the tensor untouched)")
    else:  # common.launch spawns the ranks: every one on this host
        os.environ.update(LOCAL_SIZE=str(args.nproc), DS_ACCELERATOR="cpu")
    launch(worker, args.nproc, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
