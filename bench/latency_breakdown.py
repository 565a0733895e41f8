"""Where the microseconds of a small allreduce go: fastar.all_reduce of a 4 KiB float32 CPU tensor on
one node (the latency path), broken down into Python entry, checks, copy-in, wait, copy-out.

    python bench/latency_breakdown.py [--nproc 2] [--bytes 4096] [--iters 20000] [--json out.json]

Per rank, in one run:
  total_us       fastar.all_reduce(t) per call, profiling off (what a user gets);
  profiled_us    the same with the stage clocks on (each stage adds a clock read);
  stages         the C++ side's stage means with the clocks on (LatencyProfile in
                 csrc/core/hierarchical.h): checks (entry to the C++ side, tensor checks, the queue
                 and executor locks), copy_in (bytes into this rank's small region, block by
                 block, each block's flag raised), wait (every local peer's blocks, their
                 descriptor checks compared), reduce_copy_out (the sum of all regions, written into
                 the tensor), exit (bookkeeping, releasing the locks). With the clocks on, the
                 blocks are all waited for and then summed at once (three clock reads per call);
                 with them off, a peer's first blocks are summed while it writes its last;
  python_entry   profiled_us minus the C++ stages: the Python function, the pybind11 call and
                 the release of the GIL;
  floor_us       a pybind11 call that does nothing (Communicator.has_shm) from the same loop, and
                 a Python loop with a no-op function: what any Python-level API pays.
Reported: the max over ranks of each mean (JSON: every rank's figures too; stamped, bench/stamp.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import launch, under_launcher  # noqa: E402
from stamp import write_result  # noqa: E402

STAGES = ("checks_ns", "copy_in_ns", "wait_ns", "reduce_copy_out_ns", "exit_ns")


def per_call_us(fn, iters: int) -> float:
    for _ in range(min(1000, iters)):
        fn()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e6


def worker(rank: int, world: int, args) -> dict:
    """One rank (common.launch): its figures."""
    os.environ["FASTAR_LOCAL_SIZE"] = str(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env://
    import fastar
    from fastar import state
    fastar.init()
    comm = state.get_state().comm
    t = torch.zeros(args.bytes // 4)

    def noop():
        return None
    out = {"rank": rank}
    out["python_noop_us"] = per_call_us(noop, args.iters)
    out["pybind_noop_us"] = per_call_us(comm.has_shm, args.iters)
    out["total_us"] = per_call_us(lambda: fastar.all_reduce(t), args.iters)
    comm.set_latency_profile(True)
    out["profiled_us"] = per_call_us(lambda: fastar.all_reduce(t), args.iters)
    prof = comm.latency_profile()
    comm.set_latency_profile(False)
    calls = max(1, prof["calls"])
    out["stages_us"] = {k[:-3]: prof[k] / calls / 1e3 for k in STAGES}
    out["python_entry_us"] = out["profiled_us"] - sum(out["stages_us"].values())
    out["route"] = state.get_state().last_choice["why"]
    dist.barrier()
    fastar.shutdown()
    dist.destroy_process_group()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--bytes", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if under_launcher():
        ap.error("it starts its own ranks: run it without torchrun (WORLD_SIZE is set)")
    ranks = launch(worker, args.nproc, args, timeout_s=600)
    worst = {k: max(r[k] for r in ranks) for k in ("python_noop_us", "pybind_noop_us", "total_us", "profiled_us",
                                                    "python_entry_us")}
    worst["stages_us"] = {k: max(r["stages_us"][k] for r in ranks) for k in ranks[0]["stages_us"]}
    print(f"# fastar.all_reduce of {args.bytes} B float32 on 1 node x {args.nproc}; max over ranks of the "
          f"per-call mean, {args.iters} calls")
    print(f"  total (profiling off)   {worst['total_us']:7.2f} us")
    print(f"  total (profiling on)    {worst['profiled_us']:7.2f} us, of which:")
    print(f"    python entry          {worst['python_entry_us']:7.2f} us  (Python function, pybind11 call, GIL release)")
    for k, v in worst["stages_us"].items():
        print(f"    {k:<21} {v:7.2f} us")
    print(f"  floor: Python no-op call {worst['python_noop_us']:.3f} us, pybind11 no-op call "
          f"{worst['pybind_noop_us']:.3f} us")
    print(f"  route: {ranks[0]['route']}")
    if args.json:
        res = {"bytes": args.bytes, "nproc": args.nproc, "iters": args.iters, "max_over_ranks": worst,
               "ranks": ranks, "loadavg": list(os.getloadavg()),
               "command": "python bench/latency_breakdown.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        write_result(res, args.json, cpu=True)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
