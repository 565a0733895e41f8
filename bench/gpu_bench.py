"""GPU figures for docs/results.md (issues 6 and 17), on one machine with a CUDA GPU:

1. pack: a 25 MB ResNet-50 gradient bucket (82 tensors, scaled by 1/8) packed by fastar's
   one-launch kernel, against torch's per-tensor mul_out loop and against a plain device-to-device
   copy of the same bytes (the GPU's copy bandwidth: the bound a pack can reach). fastar's output is
   checked against torch before and after the timing.
2. step time of ResNet-50 (fp32, batch --batch at --image-size) with fastar.wrap against DDP, on
   the same GPU, world size 1 (NCCL), and with fp16 wire compression; steps interleaved in rounds so
   that clock drift hits every implementation alike. At world size 1 the two do different work:
   fastar skips the collective (TensorAllreduce::p2p returns at once, so compression does nothing
   either) and only packs gradients into buckets and hands back views; DDP still launches a one-rank
   NCCL allreduce per bucket. One profiled step of each counts the NCCL and pack kernels, so the JSON
   shows what each did rather than saying it.
3. the torch.distributed "fastar" backend on CUDA tensors, when fastar registers one (guarded: the
   JSON says "absent" otherwise): dist.all_reduce of CUDA tensors on min(2, GPUs) ranks, checked
   against the exact sum, and timed.

    python bench/gpu_bench.py --json bench/results/gpu_<card>.json
    python bench/gpu_bench.py --report out/gpu      # gpu_check.json + results_gpu.md from a gpu_check.sh run

Every JSON carries a stamp (bench/stamp.py): commit, dirty flag, torch/CUDA/driver versions, device.
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

from bench.common import launch  # noqa: E402
from bench.stamp import short as stamp_line, stamp, write_result  # noqa: E402

WHAT = {
    "none": "no gradient synchronisation at all (the ceiling)",
    "ddp": "torch DDP: copies gradients into 25 MB buckets per tensor and calls a one-rank NCCL allreduce "
           "per bucket (the NCCL kernels it leads to are counted)",
    "fastar": "fastar.wrap: packs each bucket with one kernel and hands back bucket views as .grad; at world "
              "size 1 the collective is skipped (no NCCL call, no kernel of its own)",
    "fastar_fp16": "fastar.wrap(compression='fp16'): at world size 1 exactly the same work as fastar (the "
                   "collective, and with it the compression, is skipped)",
}


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
    from bench.bench_kernels import packed_bucket
    dev = torch.device("cuda")
    srcs, offsets, flat = packed_bucket(dev)
    off = flat.numel()
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
    flat.fill_(float("nan"))  # what was timed was right: fastar's own output, after the timing
    C.kernels_pack(srcs, flat, offsets, scale)
    assert torch.equal(flat, ref), "pack differs from torch after the timing"
    out["checked"] = "fastar's pack equals torch.cat of the scaled tensors, bit for bit, before and after timing"
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

    kernels = {k: count_kernels(lambda k=k: step(k)) for k in impls}
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
    out["world_size"] = dist.get_world_size()
    for k in impls:
        out[k]["what"] = WHAT[k]
        out[k]["kernels_per_step"] = kernels[k]
    fastar.shutdown()
    dist.destroy_process_group()
    return out


def count_kernels(fn) -> dict:
    """GPU kernels of one call of fn, by the torch profiler: NCCL kernels, fastar's pack/unpack
    kernels, all kernels. {"error": ...} when the profiler cannot run."""
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"nccl": sum("nccl" in n.lower() for n in names),
            "fastar_pack": sum("multi_tensor_copy_kernel" in n for n in names),
            "all": len(names)}


def backend_present() -> bool:
    import torch.distributed as dist

    import fastar  # noqa: F401 - registers the backend when this version has one
    return "fastar" in dist.Backend.backend_list


def _backend_worker(rank, size):
    """One rank (common.launch): its rows, or the error it met (reported in the JSON)."""
    import torch.distributed as dist

    import fastar  # noqa: F401
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    out = {"rank": rank}
    try:
        spec = os.environ.get("FASTAR_BENCH_BACKEND", "cpu:gloo,cuda:fastar")
        dist.init_process_group(spec)  # env://
        out["backend"] = str(dist.get_backend())
        rows = []
        for n in (1 << 10, 1 << 20, 16 << 20):  # elements of fp32: 4 KiB, 4 MiB, 64 MiB
            t = torch.full((n,), rank + 1.0, device=dev)
            dist.all_reduce(t)
            torch.cuda.synchronize()
            exact = bool(torch.equal(t, torch.full_like(t, size * (size + 1) / 2)))
            ms = cuda_time(lambda: dist.all_reduce(t), iters=10, warmup=2)
            rows.append({"bytes": n * 4, "exact": exact, "ms": ms, "algbw_GBps": n * 4 / ms / 1e6})
        out["rows"] = rows
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def bench_backend() -> dict:
    """The "fastar" torch.distributed backend on CUDA tensors, on min(2, GPUs) spawned ranks."""
    try:
        if not backend_present():
            return {"status": "absent", "note": "this tree registers no torch.distributed 'fastar' backend"}
    except Exception as e:  # noqa: BLE001
        return {"status": "absent", "note": f"import failed: {e}"}
    size = min(2, torch.cuda.device_count())
    try:
        res = launch(_backend_worker, size, timeout_s=120)
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        res = [{"error": f"timed out or died: {e}"[:2000]}]
    status = "ok" if all("error" not in r and all(x["exact"] for x in r.get("rows", [])) for r in res) else "failed"
    note = ("world size 1: dist.all_reduce through the backend, no data crosses between GPUs" if size == 1
            else f"world size {size}: one rank per GPU")
    return {"status": status, "world_size": size, "note": note, "ranks": res}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pack-iters", type=int, default=50)
    p.add_argument("--parts", default="pack,step,backend", help="comma-separated: pack, step, backend")
    p.add_argument("--report", metavar="DIR", default=None,
                   help="no benchmark: summarise a gpu_check.sh output folder (DIR/gpu_bench.json, DIR/*.xml) "
                        "into DIR/gpu_check.json and DIR/results_gpu.md, and print the markdown")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report))
        return None
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU")
    parts = set(args.parts.split(","))
    props = torch.cuda.get_device_properties(0)
    res = {"device": props.name, "torch": torch.__version__, "args": vars(args), "stamp": stamp()}
    print(stamp_line(res["stamp"]))
    if "backend" in parts:  # first: it spawns its own processes, before this one holds a process group
        res["backend"] = bench_backend()
        print(f"fastar backend on CUDA: {res['backend']['status']} ({res['backend'].get('note', '')})")
        for r in res["backend"].get("ranks", [])[:1]:
            for row in r.get("rows", []):
                print(f"  {row['bytes'] / 2**20:8.3f} MiB  {row['ms']:8.3f} ms  exact={row['exact']}")
            if "error" in r:
                print("  error:", r["error"])
    if "pack" not in parts:
        return _finish(res, args)
    res["pack"] = bench_pack(args.pack_iters)
    pk = res["pack"]
    print(f"pack of a {pk['bytes'] / 2**20:.1f} MiB bucket ({pk['tensors']} tensors) on {props.name}:")
    for k in ("fastar_pack", "torch_mul_out_loop", "d2d_copy"):
        print(f"  {k:20s} {pk[k]['ms']:8.3f} ms  {pk[k]['GBps']:8.1f} GB/s")
    print(f"  pack / copy bandwidth {pk['pack_vs_copy']:.2f}; pack vs torch loop {pk['pack_vs_torch_loop']:.1f}x")
    if "step" not in parts:
        return _finish(res, args)
    res["step"] = bench_step(args)
    st = res["step"]
    print(f"ResNet-50 step, batch {args.batch} at {args.image_size}px, world size 1:")
    for k in ("none", "ddp", "fastar", "fastar_fp16"):
        print(f"  {k:12s} {st[k]['ms_median']:8.2f} ms  {st[k]['img_per_s']:8.1f} img/s  kernels/step "
              f"{st[k]['kernels_per_step']}")
    print(f"  fastar vs DDP {st['fastar_vs_ddp']:.3f}x, fp16 {st['fastar_fp16_vs_ddp']:.3f}x, "
          f"vs no communication {st['fastar_vs_none']:.3f}x")
    return _finish(res, args)


def _finish(res, args):
    if args.json:
        write_result(res, args.json, cpu=False)  # the stamp taken before the run (res["stamp"]) is kept
    return res


# ------------------------------------------------------------------ report of a gpu_check.sh run

def junit_summary(path: str) -> dict:
    """Counts and the failing/skipped tests (with reasons) of a pytest --junitxml file."""
    import xml.etree.ElementTree as ET
    root = ET.parse(path).getroot()
    out = {"passed": 0, "failed": 0, "skipped": 0, "seconds": 0.0, "failures": [], "skips": {}}
    for suite in root.iter("testsuite"):
        out["seconds"] += float(suite.get("time", 0))
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append(f"{name}: {(bad.get('message') or '')[:200]}")
        elif skip is not None:
            out["skipped"] += 1
            reason = (skip.get("message") or "").strip()
            out["skips"][reason] = out["skips"].get(reason, 0) + 1
        else:
            out["passed"] += 1
    return out


def report(folder: str) -> str:
    """Markdown for docs/results.md from a gpu_check.sh output folder, and a stamped gpu_check.json."""
    import glob
    summary = {"stamp": None, "tests": {}, "bench": None}
    bench_path = os.path.join(folder, "gpu_bench.json")
    if os.path.exists(bench_path):
        with open(bench_path) as f:
            summary["bench"] = json.load(f)
    stamp_path = os.path.join(folder, "stamp.json")
    if os.path.exists(stamp_path):
        with open(stamp_path) as f:
            summary["stamp"] = json.load(f)
    else:
        summary["stamp"] = (summary["bench"] or {}).get("stamp") or stamp()
    for x in sorted(glob.glob(os.path.join(folder, "*.xml"))):
        summary["tests"][os.path.basename(x)[:-4]] = junit_summary(x)
    st = summary["stamp"]
    lines = [f"GPU check of {stamp_line(st)}; run {st.get('utc')} on {st.get('device_count')} GPU(s) "
             f"(`bash bench/gpu_check.sh`, outputs in `{folder}`).", ""]
    if summary["tests"]:
        lines += ["| suite | passed | failed | skipped | s |", "| --- | --- | --- | --- | --- |"]
        for name, t in summary["tests"].items():
            lines.append(f"| `{name}` | {t['passed']} | {t['failed']} | {t['skipped']} | {t['seconds']:.0f} |")
        lines.append("")
        for name, t in summary["tests"].items():
            for fl in t["failures"]:
                lines.append(f"- FAILED in `{name}`: {fl}")
            for reason, n in t["skips"].items():
                lines.append(f"- skipped in `{name}` ({n}): {reason}")
        lines.append("")
    b = summary["bench"]
    if b and "pack" in b:
        pk = b["pack"]
        lines += [f"Pack of a {pk['bytes'] / 2**20:.1f} MiB ResNet-50 bucket ({pk['tensors']} tensors, x1/8), "
                  "bytes read + written, median of CUDA-event-timed calls:", "",
                  "| | ms | GB/s |", "| --- | --- | --- |"]
        for k, label in (("fastar_pack", "fastar pack (one launch)"), ("torch_mul_out_loop", "torch mul_out per tensor"),
                         ("d2d_copy", "device-to-device copy")):
            lines.append(f"| {label} | {pk[k]['ms']:.3f} | {pk[k]['GBps']:.0f} |")
        lines += ["", f"pack / copy bandwidth {pk['pack_vs_copy']:.2f}; pack vs per-tensor loop "
                  f"{pk['pack_vs_torch_loop']:.1f}x ({pk.get('checked', 'output not checked after timing')}).", ""]
    if b and "step" in b:
        s = b["step"]
        a = b["args"]
        lines += [f"ResNet-50 step at world size {s.get('world_size', 1)}, fp32, batch {a['batch']} at "
                  f"{a['image_size']} px, median of {a['rounds']} interleaved rounds of {a['per_round']} steps:", "",
                  "| | ms/step | img/s | NCCL kernels/step | pack kernels/step | what it does at world size 1 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for k in ("none", "ddp", "fastar", "fastar_fp16"):
            kp = s[k].get("kernels_per_step", {})
            lines.append(f"| {k} | {s[k]['ms_median']:.2f} | {s[k]['img_per_s']:.0f} | {kp.get('nccl', '?')} | "
                         f"{kp.get('fastar_pack', '?')} | {s[k].get('what', WHAT[k])} |")
        lines += ["", f"fastar {s['fastar_vs_ddp']:.3f}x DDP's speed, {s['fastar_vs_none']:.3f}x of no "
                  "communication. This compares different work: fastar runs no collective at world size 1, DDP "
                  "runs a one-rank NCCL allreduce per bucket; it measures the bucket machinery, not NCCL.", ""]
    if b and "backend" in b:
        be = b["backend"]
        lines.append(f"torch.distributed 'fastar' backend on CUDA: **{be['status']}** ({be.get('note', '')}).")
        for r in be.get("ranks", [])[:1]:
            for row in r.get("rows", []):
                lines.append(f"- {row['bytes'] / 2**20:.3f} MiB: {row['ms']:.3f} ms, exact sum: {row['exact']}")
            if "error" in r:
                lines.append(f"- error: {r['error']}")
        lines.append("")
    md = "\n".join(lines)
    with open(os.path.join(folder, "gpu_check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(folder, "results_gpu.md"), "w") as f:
        f.write(md + "\n")
    return md


if __name__ == "__main__":
    main()
