"""Two protocols of fastar's one plan against each other, in the same processes, alternately: the
single-copy protocol (peers' memory read with process_vm_readv) and the shared-memory slots, for
fastar.all_reduce and for the "fastar" backend's reduce_scatter_tensor / all_gather_into_tensor.
The tuning decides which one a call takes (fastar.policy.set_tuning), so both run on the same
tensors, on the same pinned cores, round after round; each figure is the median over rounds of the
slowest rank's mean. This is how policy.Tuning's single-copy bounds were chosen (docs/results.md,
session 11).

    python bench/protocol_ab.py --nproc 2 --sizes 128K,1M,4M,16M,64M --json out.json
    python bench/protocol_ab.py --nproc 4 --collectives reduce_scatter,allgather --sizes 4K,1M --json out.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import bind_policy, fmt_bytes, launch, max_over_ranks, parse_sizes, pin_to_core  # noqa: E402
from bench.stamp import write_result  # noqa: E402

COLLECTIVES = ("allreduce", "reduce_scatter", "allgather")
# The tuning that sends a call to each protocol, per collective.
MODES = {
    "allreduce": {"single_copy": {"single_copy_min_bytes": 0, "single_copy_max_bytes": 1 << 62},
                  "slots": {"single_copy_min_bytes": 1 << 62}},
    "halves": {"single_copy": {"halves_single_copy_min_bytes": 0, "halves_single_copy_pair_min_bytes": 0,
                               "halves_single_copy_max_bytes": 1 << 62},
               "slots": {"halves_single_copy_min_bytes": 1 << 62, "halves_single_copy_pair_min_bytes": 1 << 62}},
}


def worker(rank: int, world: int, args) -> list[dict] | None:
    import torch
    import torch.distributed as dist

    import fastar
    warnings.filterwarnings("ignore", category=FutureWarning)  # reduce_scatter_tensor's rename
    torch.set_num_threads(1)
    if bind_policy(args.bind, world) == "core":
        pin_to_core(int(os.environ.get("LOCAL_RANK", rank)))
    os.environ["FASTAR_LOCAL_SIZE"] = str(world)  # one node
    dist.init_process_group("fastar")
    ctl = dist.new_group(backend="gloo")
    if not fastar.backend.get_backend()._comm.single_copy():
        raise RuntimeError("the node's probe refused the single-copy protocol here (process_vm_readv): "
                           "nothing to compare")
    fastar.init()  # adopts the backend's communicator
    state = fastar.state.get_state()
    rows = []
    for nbytes in parse_sizes(args.sizes):
        for coll in args.collectives.split(","):
            whole = torch.zeros(max(world, nbytes // 4))
            part = torch.zeros(whole.numel() // world)
            whole = whole[: part.numel() * world]
            call = {"allreduce": lambda: fastar.all_reduce(whole),
                    "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, whole),
                    "allgather": lambda: dist.all_gather_into_tensor(whole, part)}[coll]
            modes = MODES["allreduce" if coll == "allreduce" else "halves"]
            iters = max(5, int(args.bytes_per_block / max(1, whole.numel() * 4)))
            times: dict = {m: [] for m in modes}
            ran: dict = {m: set() for m in modes}
            for _ in range(args.rounds):
                for mode, tune in modes.items():
                    old = fastar.policy.set_tuning(**tune)
                    for _ in range(3):
                        call()
                    ran[mode].add(fastar.backend.get_backend()._comm.last_op()["protocol"]
                                  if coll != "allreduce" else state.last_choice["protocol"])
                    dist.barrier(group=ctl)
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        call()
                    times[mode].append(max_over_ranks([(time.perf_counter() - t0) / iters], ctl)[0] * 1e6)
                    fastar.policy.set_tuning(**vars(old))
            sc, slots = statistics.median(times["single_copy"]), statistics.median(times["slots"])
            rows.append({"collective": coll, "bytes": whole.numel() * 4, "single_copy_us": sc, "slots_us": slots,
                         "ratio": sc / slots, "rounds": args.rounds, "iters": iters,
                         "ran": {m: sorted(v) for m, v in ran.items()}})
            if rank == 0 and not args.quiet:
                print(f"{world}x {coll:<15} {fmt_bytes(whole.numel() * 4):>8}  single_copy {sc:10.1f} us  "
                      f"slots {slots:10.1f} us  ratio {sc / slots:.2f}  ran {rows[-1]['ran']}", flush=True)
    dist.destroy_process_group()
    return rows if rank == 0 else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sizes", default="128K,256K,1M,2M,4M,16M,32M,64M")
    ap.add_argument("--collectives", default="allreduce,reduce_scatter,allgather")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--bytes-per-block", type=float, default=100e6, help="bytes moved per timed block")
    ap.add_argument("--bind", default="auto", choices=("auto", "core", "none"))
    ap.add_argument("--json", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    for c in args.collectives.split(","):
        if c not in COLLECTIVES:
            ap.error(f"--collectives: {c!r} is not one of {COLLECTIVES}")
    t0 = time.monotonic()
    rows = launch(worker, args.nproc, args, timeout_s=1800)[0]
    if args.json:
        write_result({"world_size": args.nproc, "local_size": args.nproc, "rows": rows,
                      "command": "python bench/protocol_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      "wall_s": time.monotonic() - t0, "loadavg_after": list(os.getloadavg())}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
