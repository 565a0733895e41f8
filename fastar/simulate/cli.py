"""python -m fastar.simulate: the cluster report (per impl: allreduce, iteration, efficiency), its
plot, and the fit of the host model to this machine's benchmark files."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace

from .calibration import bench_label, calibrate
from .cost_model import HIERARCHIES, IMPLS, MB, PRESETS, KiB, Preset, allreduce_time, needed_gbps, topo_of
from .host_fit import DEFAULT_FIT_LABELS, calibrate_host
from .schedules import ALGORITHMS
from .step_model import buckets, compute_ms, model_profile, scaling


def report(p: Preset, nodes, model, batch, hierarchy, algorithm, ready_by="flops"):
    kw = dict(model=model, batch=batch, ready_by=ready_by)
    grad = sum(c for _, c in model_profile(model)[0]) * p.grad_bytes
    t = topo_of(p, nodes)
    per = {i: scaling(p, nodes, hierarchy=i.split(":")[0], algorithm=i.split(":")[1], **kw) for i in IMPLS}
    head = per[f"{hierarchy}:{algorithm}"]
    fwd, bwd = compute_ms(p, model, batch)
    return {
        "config": {**asdict(p), "nodes": nodes, "model": model, "batch_per_gpu": batch,
                   "hierarchy": hierarchy, "algorithm": algorithm, "ready_by": ready_by,
                   "gradient_bytes": grad, "forward_ms_used": fwd, "backward_ms_used": bwd,
                   "buckets": [{"bytes": b, "ready_ms": r * bwd} for b, r in buckets(model, p.grad_bytes,
                                                                                      ready_by=ready_by)]},
        "iteration_ms": head["iteration_ms"],
        "images_per_s": head["images_per_s"],
        "scaling_efficiency": head["scaling_efficiency"],
        "scaling_efficiency_vs_1gpu": head["scaling_efficiency_vs_1gpu"],
        "allreduce_ms": {i: 1e3 * allreduce_time(grad, *i.split(":"), t) for i in IMPLS},
        "per_impl": per,
        "needed_nic_gbps": needed_gbps(grad, max(nodes, 2), bwd * 1e-3, p, algorithm),
    }


def plot(p: Preset, path, model="resnet50", batch=32, node_counts=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    node_counts = node_counts or [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i in IMPLS:
        h, a = i.split(":")
        eff = [scaling(p, n, model=model, batch=batch, hierarchy=h, algorithm=a)["scaling_efficiency"]
               for n in node_counts]
        ax.plot([n * p.gpus_per_node for n in node_counts], eff, marker="o", ms=3,
                ls="-" if a == "halving_doubling" else "--", label=i)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel(f"scaling efficiency vs one node of {p.gpus_per_node}")
    ax.set_title(f"{model}, {batch} images/GPU, preset {p.name} "
                 f"({p.nics_per_node} x {p.nic_gbps:g} Gbit/s per node)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_host_calibration(res):
    P = res["params"]
    print(f"host model fitted on {', '.join(res['fit_labels'])} ({res['n_fit_rows']} rows >= "
          f"{res['fit_min_bytes'] // KiB} KiB), {P['cores']} cores:")
    print(f"  tcp: alpha {P['tcp_alpha'] * 1e6:.0f} us/step, path {1 / P['tcp_beta'] / 1e9:.2f} GB/s of sent+received "
          f"per rank; work {P['step_cpu'] * 1e6:.0f} core-us per rank and step + {1 / P['tcp_cpu'] / 1e9:.2f} GB/s per core")
    print(f"  shm: alpha {P['shm_alpha'] * 1e6:.1f} us/phase, {1 / P['shm_beta'] / 1e9:.2f} GB/s per rank "
          f"(copy-in, slice sum, copy-out); Gloo allreduce: alpha {P['gloo_alpha'] * 1e6:.0f} us/step")
    print(f"  cache: buffers within {P['cache_bytes'] / MB:.1f} MB (all ranks) move at {P['cache_ratio']:.2f}x "
          f"(TCP) and {P['shm_cache_ratio']:.2f}x (arena) the per-byte cost from DRAM")
    print(f"{'role':8s} {'NxL':4s} {'impl':32s} {'bytes':>9s} {'time_us':>9s} {'pred_us':>9s} {'err':>7s}")
    for r in res["rows"]:
        flag = "  > 30%" if r["bytes"] >= res["min_bytes"] and abs(r["rel_err"]) > 0.30 else ""
        print(f"{r['role']:8s} {r['label']:4s} {r['impl']:32s} {r['bytes']:9d} {r['time_us']:9.0f} "
              f"{r['pred_us']:9.0f} {r['rel_err']:+7.1%}{flag}")
    e = res["max_rel_err_ge_256KiB"]
    print(f"max |relative error|, sizes >= {res['min_bytes'] // KiB} KiB: fitted rows {e.get('fit', 0):.1%}, "
          f"held-out rows {e.get('held_out', 0):.1%}, all {e.get('all', 0):.1%}")
    print("  per configuration: " + ", ".join(f"{k} {e[k]:.1%}" for k in res["labels"] if k in e))
    if any(n > 1 for n in res["runs"].values()):
        single = {}
        for r in res["single_run_max_rel_err"]:
            single[r["label"]] = max(single.get(r["label"], 0.0), r["max_rel_err"])
        print("  (times are medians over " + ", ".join(f"{n} runs of {k}" for k, n in res["runs"].items()) +
              "; a single run's rows against the same model: up to " +
              ", ".join(f"{k} {v:.0%}" for k, v in sorted(single.items())) + ")")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastar.simulate",
                                 description=sys.modules[__package__].__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--gpus-per-node", type=int)
    ap.add_argument("--model", default="resnet50", help="a torchvision.models constructor name")
    ap.add_argument("--batch-per-gpu", type=int, default=32)
    ap.add_argument("--link-gbps", type=float, help="NIC line rate, Gbit/s (overrides the preset)")
    ap.add_argument("--nics-per-node", type=int)
    ap.add_argument("--hierarchy", choices=HIERARCHIES, default="leader")
    ap.add_argument("--algorithm", choices=ALGORITHMS, default="halving_doubling")
    ap.add_argument("--jitter-cv", type=float, help="per-worker compute jitter (std/mean); 0: none")
    ap.add_argument("--ready-by", choices=("flops", "params"), default="flops",
                    help="gradient ready times proportional to backward FLOPs or parameter count")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--plot", help="PNG of scaling efficiency vs GPU count")
    ap.add_argument("--calibrate", metavar="BENCH_JSON", nargs="+",
                    help="fit the host model to bench/allreduce_bw.py outputs of this machine and predict every row")
    ap.add_argument("--fit-on", default=",".join(DEFAULT_FIT_LABELS),
                    help="with --calibrate: '<nodes>x<local>' configurations whose rows are fitted; the "
                         "other files' rows are only predicted (held out)")
    ap.add_argument("--per-impl", action="store_true",
                    help="with --calibrate: instead, the older fit of one alpha/beta per impl and file (in-sample)")
    ap.add_argument("--shared", action="store_true", help="with --per-impl: one alpha/beta for all impls")
    a = ap.parse_args(argv)

    if a.calibrate:
        benches = []
        for path in a.calibrate:
            with open(path) as f:
                benches.append(json.load(f))
        if a.per_impl:
            res = [calibrate(b, shared=a.shared) for b in benches]
            for path, r in zip(a.calibrate, res):
                print(f"# {path} ({bench_label(r)})")
                for k, v in r["fits"].items():
                    print(f"{k:32s} alpha {v['alpha_us']:9.2f} us  beta^-1 {v['GBps']:8.3f} GB/s")
                print(f"{'impl':32s} {'bytes':>10s} {'time_us':>10s} {'pred_us':>10s} {'err':>7s}")
                for row in r["rows"]:
                    print(f"{row['impl']:32s} {row['bytes']:10d} {row['time_us']:10.1f} {row['pred_us']:10.1f} "
                          f"{row['rel_err']:+7.1%}")
                print("max |relative error|, sizes >= 256 KiB:",
                      ", ".join(f"{k} {v:.1%}" for k, v in sorted(r["max_rel_err_ge_256KiB"].items())))
            res = res[0] if len(res) == 1 else {"files": a.calibrate, "results": res}
        else:
            res = calibrate_host(benches, fit_labels=tuple(x.strip() for x in a.fit_on.split(",") if x.strip()))
            print_host_calibration(res)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return res

    p = PRESETS[a.preset]
    over = {k: v for k, v in (("gpus_per_node", a.gpus_per_node), ("nic_gbps", a.link_gbps),
                              ("nics_per_node", a.nics_per_node),
                              ("jitter_cv", a.jitter_cv)) if v is not None}
    p = replace(p, **over)
    res = report(p, a.nodes, a.model, a.batch_per_gpu, a.hierarchy, a.algorithm, a.ready_by)
    print(f"{a.nodes} nodes x {p.gpus_per_node} GPUs, {a.model} at {a.batch_per_gpu}/GPU, "
          f"{p.nics_per_node} x {p.nic_gbps:g} Gbit/s per node (preset {p.name})")
    print(f"{'impl':26s} {'allreduce_ms':>12s} {'iter_ms':>8s} {'exposed':>8s} {'img/s':>9s} {'eff':>6s}")
    for i, s in res["per_impl"].items():
        print(f"{i:26s} {res['allreduce_ms'][i]:12.2f} {s['iteration_ms']:8.1f} {s['exposed_comm_ms']:8.2f} "
              f"{s['images_per_s']:9.0f} {s['scaling_efficiency']:6.3f}")
    print(f"NIC rate for one halving/doubling allreduce of the gradients within backward: "
          f"{res['needed_nic_gbps']:.1f} Gbit/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.plot:
        plot(p, a.plot, a.model, a.batch_per_gpu)
    return res
