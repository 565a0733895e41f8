"""GPU figures for docs/results.md (issue 6), on one machine with a CUDA GPU:

1. pack: a 25 MB ResNet-50 gradient bucket (161 tensors' worth, scaled by 1/8) packed by fastar's
   one-launch kernel, against torch's per-tensor mul_out loop and against a plain device-to-device
   copy of the same bytes (the GPU's copy bandwidth: the bound a pack can reach).
2. step time of ResNet-50 (fp32, batch --batch at --image-size) with fastar.wrap against DDP, on
   the same GPU, world size 1 (NCCL), and with fp16 wire compression; steps interleaved in rounds so
   that clock drift hits every implementation alike.

    python bench/gpu_bench.py --json bench/results/gpu_<card>.json

World size 1 times the bucket machinery (hooks, pack, events, fastar's stream) and not the network:
the multi-GPU NCCL path needs a machine with several GPUs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cuda_time(fn, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of fn over iters calls, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def bench_pack(iters: int) -> dict:
    import fastar._C as C
    from bench.bench_kernels import bucket_shapes
    shapes = bucket_shapes()
    dev = torch.device("cuda")
    srcs = [torch.randn(*s, device=dev) for s in shapes]
    offsets, off = [], 0
    for s in srcs:
        offsets.append(off)
        off += s.numel()
    flat = torch.empty(off, device=dev)
    scale = 1.0 / 8
    nbytes = off * 4

    def fastar_pack():
        C.kernels_pack(srcs, flat, offsets, scale)

    def torch_loop():
        for s, o in zip(srcs, offsets):
            torch.mul(s.view(-1), scale, out=flat[o:o + s.numel()])

    src_flat = torch.randn(off, device=dev)

    def copy():
        flat.copy_(src_flat)

    C.kernels_pack(srcs, flat, offsets, scale)
    ref = torch.cat([s.view(-1) * scale for s in srcs])
    assert torch.equal(flat, ref), "pack differs from torch"
    out = {"tensors": len(srcs), "bytes": nbytes}
    for name, fn in (("fastar_pack", fastar_pack), ("torch_mul_out_loop", torch_loop), ("d2d_copy", copy)):
        ms = cuda_time(fn, iters)
        # bytes read + written, as nccl-tests and the copy-bandwidth figures count them
        out[name] = {"ms": ms, "GBps": 2 * nbytes / ms / 1e6}
    out["pack_vs_copy"] = out["fastar_pack"]["GBps"] / out["d2d_copy"]["GBps"]
    out["pack_vs_torch_loop"] = out["torch_mul_out_loop"]["ms"] / out["fastar_pack"]["ms"]
    return out


def bench_step(args) -> dict:
    import torch.distributed as dist
    import torchvision
    from torch.nn.parallel import DistributedDataParallel as DDP

    import fastar
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    torch.backends.cudnn.benchmark = True

    def model():
        torch.manual_seed(0)
        return torchvision.models.resnet50(num_classes=1000).to(dev)

    impls = {
        "none": model(),
        "ddp": DDP(model(), device_ids=[0], bucket_cap_mb=25, gradient_as_bucket_view=True),
        "fastar": fastar.wrap(model()),
        "fastar_fp16": fastar.wrap(model(), compression="fp16"),
    }
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in impls.items()}
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)

    def step(name):
        m, opt = impls[name], opts[name]
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()

    times = {k: [] for k in impls}
    for k in impls:
        for _ in range(args.warmup):
            step(k)
    torch.cuda.synchronize()
    for _ in range(args.rounds):
        for k in impls:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.per_round):
                step(k)
            torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) / args.per_round * 1e3)
    # correctness at world size 1: averaged gradients are the local ones
    g_f = [p.grad for p in impls["fastar"].parameters()]
    out = {k: {"ms_median": statistics.median(v), "ms_all": v,
               "img_per_s": args.batch / statistics.median(v) * 1e3} for k, v in times.items()}
    out["fastar_vs_ddp"] = out["ddp"]["ms_median"] / out["fastar"]["ms_median"]
    out["fastar_fp16_vs_ddp"] = out["ddp"]["ms_median"] / out["fastar_fp16"]["ms_median"]
    out["fastar_vs_none"] = out["none"]["ms_median"] / out["fastar"]["ms_median"]
    out["grads_finite"] = bool(all(torch.isfinite(g).all() for g in g_f))
    out["explain"] = fastar.explain()
    out["comm_stats_overlap"] = impls["fastar"].comm_stats()["overlap"]
    fastar.shutdown()
    dist.destroy_process_group()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pack-iters", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    res = {"device": props.name, "torch": torch.__version__, "args": vars(args)}
    res["pack"] = bench_pack(args.pack_iters)
    pk = res["pack"]
    print(f"pack of a {pk['bytes'] / 2**20:.1f} MiB bucket ({pk['tensors']} tensors) on {props.name}:")
    for k in ("fastar_pack", "torch_mul_out_loop", "d2d_copy"):
        print(f"  {k:20s} {pk[k]['ms']:8.3f} ms  {pk[k]['GBps']:8.1f} GB/s")
    print(f"  pack / copy bandwidth {pk['pack_vs_copy']:.2f}; pack vs torch loop {pk['pack_vs_torch_loop']:.1f}x")
    res["step"] = bench_step(args)
    st = res["step"]
    print(f"ResNet-50 step, batch {args.batch} at {args.image_size}px, world size 1:")
    for k in ("none", "ddp", "fastar", "fastar_fp16"):
        print(f"  {k:12s} {st[k]['ms_median']:8.2f} ms  {st[k]['img_per_s']:8.1f} img/s")
    print(f"  fastar vs DDP {st['fastar_vs_ddp']:.3f}x, fp16 {st['fastar_fp16_vs_ddp']:.3f}x, "
          f"vs no communication {st['fastar_vs_none']:.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
