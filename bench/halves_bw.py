"""Reduce-scatter and allgather on the "fastar" torch.distributed backend against Gloo.

    python bench/halves_bw.py --nproc 2 --json bench/results/halves_1x2.json

For each size (the bytes of the whole buffer: reduce-scatter's input, allgather's output) and each
collective, it times `dist.reduce_scatter_tensor` / `dist.all_gather_into_tensor` on a Gloo group
and on a "fastar" group of the same ranks, and, as the yardstick of what the halves save,
`dist.all_reduce` of the whole buffer on the fastar group (what the backend ran for a reduce-scatter
before it had the halves: an allreduce, then a copy of the shard). The timing rules are
bench/allreduce_bw.py's (bench/common.py): warm-up, adaptive iteration counts, interleaved rounds,
the max over ranks of the mean per call. Every result is checked against exact integer sums.
Progress on rank 0 (tqdm); the JSON holds every row and the ratios Gloo time / fastar time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COLLECTIVES = ("reduce_scatter", "allgather")
IMPLS = ("torch:gloo", "torch:fastar", "torch:fastar allreduce")


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def _worker(rank: int, world: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import fastar  # noqa: F401 - registers "fastar"
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    groups = {"torch:gloo": dist.new_group(backend="gloo"), "torch:fastar": dist.new_group(backend="fastar")}
    groups["torch:fastar allreduce"] = groups["torch:fastar"]
    ctl = dist.new_group(backend="gloo")

    def max_over_ranks(x: float) -> float:
        v = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=ctl)
        return v.item()

    rows, wrong_total = [], 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    bar = None
    if rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=len(sizes) * len(COLLECTIVES), desc=f"halves_bw {world}p", unit="case", file=sys.stderr)
    for nbytes in sizes:
        whole = max(world, nbytes // 4 // world * world)  # float32 elements, a multiple of the world size
        shard = whole // world
        # integer values: every sum is exact, so fastar's answer must equal the reference bit for bit
        full = (torch.arange(whole, dtype=torch.float32) % 7) + rank
        expect_rs = (torch.arange(whole, dtype=torch.float32) % 7)[rank * shard:(rank + 1) * shard] * world \
            + world * (world - 1) / 2
        mine = full[rank * shard:(rank + 1) * shard].clone()
        expect_ag = torch.cat([(torch.arange(whole, dtype=torch.float32) % 7)[r * shard:(r + 1) * shard] + r
                               for r in range(world)])
        for coll in COLLECTIVES:
            out = torch.empty(shard if coll == "reduce_scatter" else whole)
            buf = full.clone()

            def call(impl: str) -> None:
                g = groups[impl]
                if impl == "torch:fastar allreduce":
                    dist.all_reduce(buf, group=g)
                elif coll == "reduce_scatter":
                    dist.reduce_scatter_tensor(out, full, group=g)
                else:
                    dist.all_gather_into_tensor(out, mine, group=g)

            def block(impl: str, n: int) -> float:
                dist.barrier(group=ctl)
                t0 = time.perf_counter()
                for _ in range(n):
                    call(impl)
                return time.perf_counter() - t0

            for impl in IMPLS:
                if impl.endswith("allreduce"):
                    continue
                out.zero_()
                call(impl)
                wrong = int(not torch.equal(out, expect_rs if coll == "reduce_scatter" else expect_ag))
                wrong_total += wrong
            warm = []
            for impl in IMPLS:
                block(impl, 1)
                nw = common.warm_counts(whole * 4, args.warmup)
                warm.append(max_over_ranks(block(impl, nw) / nw))
            iters = common.adaptive_iters(warm, list(IMPLS), args)
            means, done = common.timed_rounds(list(IMPLS), iters, args.rounds, block)
            for impl, s in zip(IMPLS, means):
                rows.append({"collective": coll, "impl": impl, "bytes": whole * 4, "time_us": max_over_ranks(s) * 1e6,
                             "iters": done[impl]})
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    if rank == 0:
        ratios = {}
        for coll in COLLECTIVES:
            for nbytes in sorted({r["bytes"] for r in rows}):
                t = {r["impl"]: r["time_us"] for r in rows if r["collective"] == coll and r["bytes"] == nbytes}
                ratios[f"{coll} {nbytes}"] = {"gloo_over_fastar": t["torch:gloo"] / t["torch:fastar"],
                                              "allreduce_over_fastar": t["torch:fastar allreduce"] / t["torch:fastar"]}
        out = {"world": world, "local_size": world, "commit": os.environ.get("FASTAR_COMMIT", ""),
               "rows": rows, "ratios": ratios, "wrong": wrong_total}
        common.emit_json(out, args.json)
        print(f"{'collective':16}{'bytes':>10}{'gloo us':>11}{'fastar us':>11}{'allreduce us':>14}{'gloo/fastar':>13}")
        for key, r in ratios.items():
            coll, nbytes = key.split()
            t = {x["impl"]: x["time_us"] for x in rows if x["collective"] == coll and x["bytes"] == int(nbytes)}
            print(f"{coll:16}{nbytes:>10}{t['torch:gloo']:>11.1f}{t['torch:fastar']:>11.1f}"
                  f"{t['torch:fastar allreduce']:>14.1f}{r['gloo_over_fastar']:>13.2f}", file=sys.stderr)
    dist.destroy_process_group()
    if wrong_total:
        raise SystemExit(f"halves_bw: {wrong_total} wrong results on rank {rank}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sizes", default="4K,64K,1M,16M", help="whole-buffer bytes, comma-separated (K/M/G)")
    ap.add_argument("--json", default=None, help="where to write the results (default: print them)")
    common.add_timing_args(ap)
    args = ap.parse_args(argv)
    mp.spawn(_worker, args=(args.nproc, args, common.free_port()), nprocs=args.nproc, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
