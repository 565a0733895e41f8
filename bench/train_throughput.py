"""Training throughput: fastar.wrap against torch DDP and against no gradient sync at all (the
ceiling), in the same run, on synthetic images.

    python bench/train_throughput.py --nproc 2 --model resnet50 --image-size 64 --batch 8 --steps 10 --json out.json

Runs under torchrun (WORLD_SIZE set) or spawns --nproc local workers itself (common.launch). The
implementations take turns round by round so that drift on a shared host affects all of them alike;
the step time reported is the median over all timed steps. The JSON is stamped (bench/stamp.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import launch, max_over_ranks, progress  # noqa: E402
from stamp import write_result  # noqa: E402

DEFAULT_IMPLS = ("none", "torch:ddp", "fastar", "fastar:fp16", "fastar:bf16")  # fastar:<wire>: compression
# torch:ddp@fastar: unmodified DDP on a process group of fastar's torch.distributed backend (by name only)
IMPLS = DEFAULT_IMPLS + ("torch:ddp@fastar",)


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    import torchvision
    return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


def worker(rank: int, world: int, args) -> dict | None:
    """One rank (common.launch, or torchrun): returns the results on rank 0."""
    import fastar
    dist.init_process_group("gloo")  # env://
    try:
        return measure(rank, world, args)
    finally:
        fastar.shutdown()
        dist.destroy_process_group()


def measure(rank: int, world: int, args) -> dict | None:
    import fastar
    torch.set_num_threads(args.threads)
    fastar.init(local_size=args.local_size)
    torch.manual_seed(0)
    base = build_model(args.model)
    models = {}
    fastar_group = None
    if "torch:ddp@fastar" in args.impls:
        if args.local_size:
            os.environ["FASTAR_LOCAL_SIZE"] = str(args.local_size)  # the backend's node layout
        fastar_group = dist.new_group(backend="fastar")
    for impl in args.impls:
        m = copy.deepcopy(base)
        if impl == "torch:ddp":
            m = nn.parallel.DistributedDataParallel(m, forward_sync_buffers=False, bucket_cap_mb=args.bucket_mb)
        elif impl == "torch:ddp@fastar":
            m = nn.parallel.DistributedDataParallel(m, forward_sync_buffers=False, bucket_cap_mb=args.bucket_mb,
                                                    process_group=fastar_group)
        elif impl.startswith("fastar"):
            # per-worker buffers, as the DDP rows above (the paper's BN; no buffer broadcast per step)
            m = fastar.wrap(m, bucket_cap_mb=args.bucket_mb, compression=impl.partition(":")[2] or None,
                            forward_sync_buffers=False)
        models[impl] = (m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9))
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def step(impl):
        m, opt = models[impl]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    for impl in args.impls:  # warm-up (fastar re-lays its buckets after the first iteration)
        for _ in range(args.warmup):
            step(impl)
    times = {impl: [] for impl in args.impls}
    faults = {impl: [] for impl in args.impls}  # minor page faults a step (max over ranks)
    comm = {impl: [] for impl in args.impls}
    overlap = {impl: [] for impl in args.impls}
    timeline = None
    rounds = max(1, args.steps // args.per_round)
    bar = progress(rank == 0, rounds * len(args.impls) * args.per_round, "train_throughput", "step")
    for _ in range(rounds):
        for impl in args.impls:
            for _ in range(args.per_round):
                dist.barrier()
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                step(impl)
                dt, nf = max_over_ranks([time.perf_counter() - t0,
                                         resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0])
                times[impl].append(dt)  # a step lasts as long as its slowest rank
                faults[impl].append(int(nf))
                if impl.startswith("fastar"):
                    st = models[impl][0].comm_stats()
                    comm[impl].append(st["comm_s"])
                    overlap[impl].append(st["overlap"])
                    if impl == "fastar":
                        timeline = st
                bar.update(1)
    bar.close()
    if rank != 0:
        return None
    rows = []
    for impl in args.impls:
        step_s = statistics.median(times[impl])
        rows.append({"impl": impl, "images_per_s": world * args.batch / step_s, "step_ms": step_s * 1e3,
                     "comm_ms": statistics.median(comm[impl]) * 1e3 if comm[impl] else None,
                     "overlap": statistics.median(overlap[impl]) if overlap[impl] else None,
                     "minor_faults": statistics.median(faults[impl]),
                     "step_ms_all": [t * 1e3 for t in times[impl]]})
    return {"world_size": world, "local_size": fastar.state.get_state().topo.local_size, "model": args.model,
            "image_size": args.image_size, "batch_per_worker": args.batch, "threads_per_rank": args.threads,
            "rows": rows, "fastar_timeline": timeline, "command": " ".join(sys.argv)}


def plot_timeline(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tl = result["fastar_timeline"]
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(tl["buckets"]) + 1.5))
    for i, b in enumerate(tl["buckets"]):
        ax.barh(i, (b["end_s"] - b["start_s"]) * 1e3, left=b["start_s"] * 1e3, color="tab:blue")
        ax.plot([b["ready_s"] * 1e3], [i], "k|", markersize=10)
    ax.axvline(tl["backward_s"] * 1e3, color="tab:red", ls="--", label="backward ends")
    ax.set_xlabel("ms after the first gradient")
    ax.set_ylabel("bucket (launch order)")
    ax.set_title(f"fastar.wrap buckets, {result['model']}, {result['world_size']} ranks: "
                 f"overlap {tl['overlap']:.2f} (| = bucket ready, bar = allreduce)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def finish(out: dict, args) -> None:
    print(f"\n{'impl':>16} {'images/s':>10} {'step ms':>9} {'comm ms':>9} {'overlap':>8} {'faults':>7}")
    for r in out["rows"]:
        cm = f"{r['comm_ms']:.1f}" if r["comm_ms"] is not None else "-"
        ov = f"{r['overlap']:.2f}" if r["overlap"] is not None else "-"
        print(f"{r['impl']:>16} {r['images_per_s']:>10.1f} {r['step_ms']:>9.1f} {cm:>9} {ov:>8} "
              f"{r.get('minor_faults', 0):>7.0f}")
    by = {r["impl"]: r for r in out["rows"]}
    for impl in (i for i in by if (i.startswith("fastar") or i == "torch:ddp@fastar") and "torch:ddp" in by):
        print(f"{impl} / DDP images/s: {by[impl]['images_per_s'] / by['torch:ddp']['images_per_s']:.3f}")
    if "fastar" in by and "none" in by:
        print(f"fastar / ceiling:      {by['fastar']['images_per_s'] / by['none']['images_per_s']:.3f}")
    if args.json:
        write_result(out, args.json, cpu=True)
        print("wrote", args.json)
    if args.plot and out.get("fastar_timeline"):
        plot_timeline(out, args.plot)
        print("wrote", args.plot)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--local-size", type=int, default=None, help="ranks per simulated node (default: all on one)")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="images per worker")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    p.add_argument("--per-round", type=int, default=2, help="consecutive steps of one implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--bucket-mb", type=float, default=25)
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"from {','.join(IMPLS)}")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of the per-bucket timeline of one fastar step")
    args = p.parse_args(argv)
    args.impls = [s for s in args.impls.split(",") if s]
    bad = set(args.impls) - set(IMPLS)
    if bad:
        p.error(f"unknown impls {sorted(bad)}; choose from {IMPLS}")
    out = launch(worker, args.nproc, args)[int(os.environ.get("RANK", 0))]
    if out is not None:  # rank 0
        finish(out, args)


if __name__ == "__main__":
    main()
