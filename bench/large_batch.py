"""The paper's Table 1 / Figure 3 in miniature: small vs 8x larger minibatch on digits.

Goyal et al. train ResNet-50 on ImageNet for 90 epochs with kn=256 (lr 0.1) and kn=8k; with the
linear scaling rule and gradual warmup the 8k error matches the baseline, without warmup it is
worse, and without scaling the lr it is far worse. Here the same epochs are run on scikit-learn's
digits with a CIFAR-style ResNet-8 at 16x16: a baseline minibatch of 16 (lr 0.1, the reference)
and a minibatch 8x larger, 128, made of 8 accumulated micro-batches of 16 (= 8 simulated workers of
n=16, with BN per micro-batch exactly as per worker; see fastar/train/sampler.py), in four ways:
  linear scaling (lr 0.8) + gradual warmup | + constant warmup | no warmup | no scaling (lr 0.1).
Reported per run: the median of the last 5 epochs' validation top-1 error (the paper's measure);
per setting: mean +- std over the seeds.

  python bench/large_batch.py [--seeds 3] [--epochs 30] [--jobs 2]
writes bench/results/large_batch.json, bench/results/large_batch.png and the table in
docs/training.md (between the large_batch markers).

  python bench/large_batch.py --dataset fashion-mnist [--seeds 3 --epochs 5 --train-subset 0 ...]
runs the same study on Fashion-MNIST (Debian's dataset-fashion-mnist; by default all 60,000 training
images at 28x28, resnet8 width 8, n = 16, 5 epochs; see docs/training.md for the CPU-time budget
behind that choice; each run's CPU seconds are recorded) with the paper's rows: the
baseline kn; kn up to 64x with gradual warmup; no warmup; constant warmup; no lr scaling; LARS and
LAMB (timm) at the largest kn; >= 3 seeds per cell, cells run seed by seed so that a study cut short
still covers every cell. It writes bench/results/large_batch/fashion_mnist_study{.json,.partial.json,
_train_error.png,_error_vs_kn.png} and the docs/training.md section between the fashion_mnist_study
markers, with the paper's three findings decided from the numbers (fashion_analysis). With
--only baseline --seeds 0 --bf16-seeds S --name fashion_mnist_bf16 it runs the baseline in fp32 and
with --amp bf16 side by side instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BEGIN, END = "<!-- large_batch:begin -->", "<!-- large_batch:end -->"


def settings(n: int, factor: int) -> dict[str, list[str]]:
    big = n * factor
    common = ["--batch", str(n), "--base-lr", "0.1", "--ref-batch", str(n)]
    return {
        f"baseline kn={n}": common + ["--accum", "1", "--warmup", "gradual"],  # (nothing to warm up)
        f"kn={big}, linear scaling + gradual warmup": common + ["--accum", str(factor), "--warmup", "gradual"],
        f"kn={big}, linear scaling + constant warmup": common + ["--accum", str(factor), "--warmup", "constant"],
        f"kn={big}, linear scaling, no warmup": common + ["--accum", str(factor), "--warmup", "none"],
        f"kn={big}, no lr scaling (lr 0.1)": common[:-1] + [str(big), "--accum", str(factor), "--warmup", "none"],
    }


def one_run(job) -> dict:
    label, argv, out = job
    from fastar.train.cli import run

    t0 = time.perf_counter()
    try:
        s = run(argv + ["--out", out])
        return {"label": label, "argv": argv, "diverged": False, "err": s["median_last5_val_top1_err"],
                "final_err": s["final_val_top1_err"], "history": s["history"],
                "target_lr": s["target_lr"], "iters_per_epoch": s["iters_per_epoch"],
                "wall_s": time.perf_counter() - t0}
    except FloatingPointError as e:
        return {"label": label, "argv": argv, "diverged": True, "err": None, "error": str(e),
                "history": [], "wall_s": time.perf_counter() - t0}


def sweep_settings(n: int, factors: list[int]) -> dict[str, list[str]]:
    common = ["--batch", str(n), "--base-lr", "0.1", "--ref-batch", str(n)]
    return {f"kn={n * f}": common + ["--accum", str(f), "--warmup", "gradual"] for f in factors}


def _mean_sd(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def table(results: dict, epochs: int) -> str:
    lines = ["| setting | lr | iters/epoch | top-1 error % (mean +- std) | final train loss (mean) | runs |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, runs in results.items():
        ok = [r["err"] for r in runs if not r["diverged"]]
        if ok:
            sd = statistics.stdev(ok) if len(ok) > 1 else 0.0
            cell = f"{statistics.mean(ok):.2f} +- {sd:.2f}"
        else:
            cell = "diverged"
        div = sum(r["diverged"] for r in runs)
        r0 = next((r for r in runs if not r["diverged"]), runs[0])
        loss = [r["history"][-1]["train_loss"] for r in runs if not r["diverged"]]
        loss_cell = f"{statistics.mean(loss):.4f}" if loss else "-"
        lines.append(f"| {label} | {r0.get('target_lr', float('nan')):g} | {r0.get('iters_per_epoch', '-')} | "
                     f"{cell} | {loss_cell} | {len(runs)}" + (f" ({div} diverged)" if div else "") + " |")
    return "\n".join(lines)


def plot_sweep(sweep: dict, path: str, model: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ms, sds = [], [], []
    for label, runs in sweep.items():
        ok = [r["err"] for r in runs if not r["diverged"]]
        if ok:
            m, sd = _mean_sd(ok)
            xs.append(int(label.split("=")[1]))
            ms.append(m)
            sds.append(sd)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("minibatch size kn")
    ax.set_ylabel("val top-1 error % (median of last 5 epochs)")
    ax.set_title(f"digits, {model}: error vs minibatch (scaling + gradual warmup)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def update_docs(md: str, path: str) -> None:
    update_docs_between(md, path, BEGIN, END)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--study" in argv or any(a.startswith("--study=") for a in argv):
        return tuned_main(argv)
    if "--docs-only" in argv:  # every generated block of the docs, from its committed JSON
        update_all_docs()
        return 0
    if "--dataset" in argv or any(a.startswith("--dataset=") for a in argv):
        return fashion_main(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=16, help="n: micro-batch (BN group) and baseline minibatch")
    p.add_argument("--factor", type=int, default=8, help="the large minibatch is factor*n (by accumulation)")
    p.add_argument("--model", default="resnet8")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--warmup-epochs", type=float, default=5)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (each one thread)")
    p.add_argument("--sweep", default="1,2,4,8,16,32",
                   help="minibatch factors for the error-vs-minibatch sweep (gradual warmup); '' for none")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--runs-dir", default=os.path.join(REPO, "runs", "large_batch"))
    p.add_argument("--no-docs", action="store_true", help="do not rewrite the table in docs/training.md")
    args = p.parse_args(argv)
    from fastar.train.recipe import default_milestones

    common = ["--data", "digits", "--model", args.model, "--image-size", str(args.image_size),
              "--epochs", str(args.epochs), "--warmup-epochs", str(args.warmup_epochs),
              "--threads", "1", "--no-progress", "--no-plots", "--quiet"]
    main_set = settings(args.batch, args.factor)
    factors = [int(f) for f in args.sweep.split(",") if f.strip()]
    sweep_set = sweep_settings(args.batch, factors)
    jobs, by_argv = [], {}
    for label, extra in list(main_set.items()) + list(sweep_set.items()):
        for seed in range(args.seeds):
            argv_ = common + extra + ["--seed", str(seed)]
            if tuple(argv_) in by_argv:  # the sweep's kn=n and kn=8n are runs of the main table
                continue
            slug = "".join(c if c.isalnum() else "_" for c in label)[:60]
            by_argv[tuple(argv_)] = None
            jobs.append((label, argv_, os.path.join(args.runs_dir, f"{slug}_s{seed}")))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(one_run, jobs):
            by_argv[tuple(r["argv"])] = r
            print(f"  {r['label']:48s} seed {r['argv'][-1]}: "
                  + ("diverged" if r["diverged"] else f"{r['err']:.2f}% ({r['wall_s']:.0f} s)"), flush=True)
    wall = time.perf_counter() - t0

    def collect(sets):
        return {label: [by_argv[tuple(common + extra + ["--seed", str(s)])] for s in range(args.seeds)]
                for label, extra in sets.items()}

    results, sweep = collect(main_set), collect(sweep_set)
    md = table(results, args.epochs)
    if sweep:
        md += ("\n\nError vs minibatch (linear scaling + gradual warmup, reference lr 0.1 at "
               f"kn={args.batch}; the paper's Figure 1 in miniature):\n\n" + table(sweep, args.epochs))
    header = (f"digits (1437 train / 360 val), {args.model} at {args.image_size}x{args.image_size}, "
              f"{args.epochs} epochs (lr /10 at {', '.join(str(m) for m in default_milestones(args.epochs))}), "
              f"warmup {args.warmup_epochs:g} epochs, {args.seeds} seeds, one process (workers simulated by "
              f"accumulation); error = median of the last 5 epochs' val top-1 error. "
              f"Measured by `python bench/large_batch.py` in {wall / 60:.1f} min.")
    md = header + "\n\n" + md
    print()
    print(md)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "large_batch.json"), "w") as f:
        json.dump({"args": vars(args), "wall_s": wall, "results": results, "sweep": sweep}, f, indent=1)
    from fastar.train.plots import plot_comparison

    png = plot_comparison({k: [r["history"] for r in v if not r["diverged"]] for k, v in results.items()
                           if any(not r["diverged"] for r in v)},
                          os.path.join(args.out, "large_batch.png"),
                          f"digits, {args.model}: minibatch {args.batch} vs {args.batch * args.factor}")
    if sweep:
        png += " and " + plot_sweep(sweep, os.path.join(args.out, "large_batch_sweep.png"), args.model)
    print(f"\nwrote {os.path.join(args.out, 'large_batch.json')} and {png}")
    if not args.no_docs:
        update_docs(md, os.path.join(REPO, "docs", "training.md"))
    return 0




# =============================================================================================
# Fashion-MNIST: the paper's Table 1 and Figures 2-4 in miniature (python bench/large_batch.py
# --dataset fashion-mnist). See docs/training.md for the scale chosen and why.

FASHION_RESULTS = os.path.join(REPO, "bench", "results", "large_batch")


def fashion_cells(a) -> list[dict]:
    """The study's cells: key, label, factor (kn / baseline kn), kind, extra fastar-train argv."""
    n = a.batch
    base = ["--batch", str(n), "--base-lr", str(a.base_lr), "--ref-batch", str(n)]
    cells = [{"key": "baseline", "label": f"baseline kn={n}", "factor": 1, "kind": "baseline",
              "argv": base + ["--accum", "1", "--warmup", "gradual"]}]
    for f in _ints(a.factors):
        cells.append({"key": f"gradual_x{f}", "label": f"kn={n * f}, gradual warmup", "factor": f,
                      "kind": "gradual", "argv": base + ["--accum", str(f), "--warmup", "gradual"]})
    for f in _ints(a.none_factors):
        cells.append({"key": f"none_x{f}", "label": f"kn={n * f}, no warmup", "factor": f, "kind": "none",
                      "argv": base + ["--accum", str(f), "--warmup", "none"]})
    f = a.table_factor
    cells.append({"key": f"constant_x{f}", "label": f"kn={n * f}, constant warmup", "factor": f,
                  "kind": "constant", "argv": base + ["--accum", str(f), "--warmup", "constant"]})
    cells.append({"key": f"noscale_x{f}", "label": f"kn={n * f}, no lr scaling (lr {a.base_lr:g})", "factor": f,
                  "kind": "noscale", "argv": ["--batch", str(n), "--base-lr", str(a.base_lr), "--ref-batch",
                                              str(n * f), "--accum", str(f), "--warmup", "none"]})
    fmax = a.lars_factor
    lars_factors = sorted(set(_ints(getattr(a, "lars_factors", "") or "")) | {fmax})
    for f in lars_factors:
        cells.append({"key": f"lars_x{f}", "label": f"kn={n * f}, LARS (eta {a.trust_coeff:g}) + gradual warmup",
                      "factor": f, "kind": "lars",
                      "argv": base + ["--accum", str(f), "--warmup", "gradual", "--optimizer", "lars",
                                      "--trust-coeff", str(a.trust_coeff)]})
    for f in lars_factors:
        # LAMB's lr is an Adam-scale relative step: --lamb-lr at the largest kn, square-root scaled to
        # smaller ones (You et al. 2019), gradual warmup from lr/f; not SGD's 0.1*f
        lr = a.lamb_lr * math.sqrt(f / fmax)
        cells.append({"key": f"lamb_x{f}", "label": f"kn={n * f}, LAMB (lr {lr:.3g}) + gradual warmup",
                      "factor": f, "kind": "lamb",
                      "argv": ["--batch", str(n), "--base-lr", str(lr), "--ref-batch", str(n * f),
                               "--warmup-start-lr", str(lr / f), "--accum", str(f), "--warmup", "gradual",
                               "--optimizer", "lamb"]})
    return cells


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def fashion_run(job) -> dict:
    key, seed, argv, out, err_last = job if len(job) == 5 else (*job, 5)
    from fastar.train.cli import run

    import resource

    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    rec = {"key": key, "seed": seed, "argv": argv, "err_last": err_last}
    try:
        s = run(argv + ["--out", out])
        hist = [{k: r[k] for k in ("epoch", "train_loss", "train_top1_err", "last_lr_used", "images_per_s",
                                   "epoch_time_s", "val_top1_err", "val_loss") if k in r} for r in s["history"]]
        errs = [r["val_top1_err"] for r in hist if r.get("val_top1_err") is not None]
        rec.update(diverged=False, err=statistics.median(errs[-err_last:]), final_err=s["final_val_top1_err"],
                   final_train_err=hist[-1]["train_top1_err"], history=hist, target_lr=s["target_lr"],
                   iters_per_epoch=s["iters_per_epoch"], warmup_iters=s["warmup_iters"],
                   images_per_s=statistics.median(r["images_per_s"] for r in hist))
    except FloatingPointError as e:
        rec.update(diverged=True, err=None, error=str(e), history=[])
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    rec["wall_s"] = time.perf_counter() - t0
    rec["cpu_s"] = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)  # this process: the run alone
    return rec


def _stats(runs: list[dict]) -> dict:
    ok = [r["err"] for r in runs if not r["diverged"]]
    out = {"n": len(runs), "diverged": sum(r["diverged"] for r in runs), "errs": ok}
    if ok:
        out["mean"], out["std"] = _mean_sd(ok)
        tr = [r["final_train_err"] for r in runs if not r["diverged"]]
        out["train_err_mean"] = statistics.mean(tr)
    return out


def _significant(a: dict, b: dict) -> tuple[float, float, bool]:
    """(b - a, the threshold, b worse than a by more than 2x the larger of the two seeds' std)."""
    d = b["mean"] - a["mean"]
    thr = 2 * max(a["std"], b["std"])
    return d, thr, d > thr


def fashion_analysis(cells: list[dict], stats: dict, n: int) -> dict:
    """The paper's findings, decided from the numbers alone (see docs/training.md for the rule)."""
    base = stats.get("baseline")
    out: dict = {"rule": "worse = mean difference > 2 x max(std of the two cells) over seeds; "
                         "diverged runs make a cell worse"}
    if not base or "mean" not in base:
        return out

    def worse(st):
        if st is None or st["n"] == 0:
            return None
        if st["diverged"] or "mean" not in st:
            return True
        return _significant(base, st)[2]

    grad = sorted((c["factor"], c["key"]) for c in cells if c["kind"] == "gradual" and c["key"] in stats)
    flat, tip = 1, None
    for f, k in grad:
        w = worse(stats[k])
        if w is None:
            continue
        if w:
            tip = f
            break
        flat = f
    out["finding1_flat_up_to_kn"] = n * flat
    out["finding1_appeared"] = flat > 1
    out["finding3_tipping_kn"] = n * tip if tip else None
    out["finding3_appeared"] = tip is not None
    f2 = []
    for c in cells:
        if c["kind"] != "none" or c["key"] not in stats:
            continue
        g = stats.get(f"gradual_x{c['factor']}")
        st = stats[c["key"]]
        if not g or "mean" not in g:
            continue
        if "mean" in st:
            d, thr, sig = _significant(g, st)
        else:
            d, thr, sig = float("inf"), 0.0, True
        f2.append({"kn": n * c["factor"], "none_minus_gradual": d, "threshold": thr, "worse": sig or bool(st["diverged"]),
                   "gradual_within_noise_of_baseline": not worse(g)})
    out["finding2"] = f2
    out["finding2_appeared"] = any(x["worse"] and x["gradual_within_noise_of_baseline"] for x in f2)
    # within 1 point of the baseline
    sgd_ok = [f for f, k in grad if "mean" in stats[k] and not stats[k]["diverged"]
              and stats[k]["mean"] - base["mean"] <= 1.0]
    out["sgd_largest_kn_within_1pt"] = n * max(sgd_ok) if sgd_ok else None
    for kind in ("lars", "lamb"):
        cs = sorted((c for c in cells if c["kind"] == kind and c["key"] in stats), key=lambda c: c["factor"])
        if not cs:
            continue
        per = {}
        for c in cs:
            st = stats[c["key"]]
            per[str(n * c["factor"])] = {
                "minus_baseline": st["mean"] - base["mean"] if "mean" in st else None,
                "within_1pt": "mean" in st and not st["diverged"] and st["mean"] - base["mean"] <= 1.0}
        good = [c["factor"] for c in cs if per[str(n * c["factor"])]["within_1pt"]]
        out[kind] = per
        out[f"{kind}_largest_kn_within_1pt"] = n * max(good) if good else None
        out[f"{kind}_claim_holds"] = bool(good and tip and max(good) >= 2 * tip)
    return out


def fashion_table(cells, stats, results, n) -> str:
    base = stats.get("baseline", {})
    lines = ["| setting | kn | lr | iters/epoch | val top-1 error % (mean ± std) | − baseline | final train error % | runs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        st = stats.get(c["key"])
        if st is None:
            continue
        runs = results[c["key"]]
        r0 = next((r for r in runs if not r["diverged"]), runs[0])
        if "mean" in st:
            cell = f"{st['mean']:.2f} ± {st['std']:.2f}"
            diff = "" if c["key"] == "baseline" or "mean" not in base else f"{st['mean'] - base['mean']:+.2f}"
            tr = f"{st['train_err_mean']:.2f}"
        else:
            cell, diff, tr = "diverged", "", "-"
        runs_cell = f"{st['n']}" + (f" ({st['diverged']} diverged)" if st["diverged"] else "")
        lr = r0.get("target_lr")
        lines.append(f"| {c['label']} | {n * c['factor']} | {lr:g} | {r0.get('iters_per_epoch', '-')} | {cell} | "
                     f"{diff} | {tr} | {runs_cell} |" if lr is not None else
                     f"| {c['label']} | {n * c['factor']} | - | - | {cell} | {diff} | {tr} | {runs_cell} |")
    return "\n".join(lines)


def fashion_plots(cells, results, stats, a, out_dir, name) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = a.batch
    by_key = {c["key"]: c for c in cells}

    def curve(key, field="train_top1_err"):
        hs = [r["history"] for r in results.get(key, []) if not r["diverged"] and r["history"]]
        if not hs:
            return None
        m = min(len(h) for h in hs)
        ys = [[h[i][field] for h in hs] for i in range(m)]
        mean = [statistics.mean(v) for v in ys]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]
        return list(range(1, m + 1)), mean, sd

    def draw(ax, keys, title):
        for k in keys:
            c = curve(k)
            if c is None:
                continue
            x, m, sd = c
            st = stats[k]
            lab = by_key[k]["label"] + (f": {st['mean']:.2f}±{st['std']:.2f}%" if "mean" in st else "")
            line, = ax.plot(x, m, label=lab, color="black" if k == "baseline" else None,
                            lw=2 if k == "baseline" else 1.3)
            ax.fill_between(x, [u - v for u, v in zip(m, sd)], [u + v for u, v in zip(m, sd)],
                            color=line.get_color(), alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training error % (mean ± std over seeds)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)

    t = a.table_factor
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    draw(axes[0], ["baseline"] + [k for k in (f"none_x{t}", f"constant_x{t}", f"gradual_x{t}") if k in stats],
         f"(Fig. 2) kn={n * t} vs baseline kn={n}: warmup strategies")
    draw(axes[1], ["baseline"] + [c["key"] for c in cells if c["kind"] == "gradual" and c["key"] in stats],
         f"(Fig. 4) gradual warmup at each kn vs baseline kn={n}")
    L = a.lars_factor
    draw(axes[2], ["baseline"] + [k for k in (f"gradual_x{L}", f"lars_x{L}", f"lamb_x{L}") if k in stats],
         f"kn={n * L}: SGD, LARS, LAMB vs baseline")
    fig.suptitle(f"Fashion-MNIST ({a.train_subset or 60000} train), {a.model} width {a.width} at {a.image_size}x{a.image_size}, "
                 f"{a.epochs} epochs", fontsize=10)
    fig.tight_layout()
    p1 = os.path.join(out_dir, f"{name}_train_error.png")
    fig.savefig(p1, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.3))
    for kind, mk in (("gradual", "o-"), ("none", "s--")):
        pts = sorted((c["factor"], stats[c["key"]]) for c in cells if c["kind"] == kind and c["key"] in stats)
        pts = [(1, stats["baseline"])] + pts if kind == "gradual" and "baseline" in stats else pts
        pts = [(f, st) for f, st in pts if "mean" in st]
        if pts:
            ax.errorbar([n * f for f, _ in pts], [st["mean"] for _, st in pts], yerr=[st["std"] for _, st in pts],
                        fmt=mk, capsize=3, label={"gradual": "SGD, linear scaling + gradual warmup",
                                                  "none": "SGD, linear scaling, no warmup"}[kind])
    for kind, mk in (("lars", "^:"), ("lamb", "v:")):
        pts = sorted((c["factor"], stats[c["key"]]) for c in cells if c["kind"] == kind and c["key"] in stats
                     and "mean" in stats[c["key"]])
        if pts:
            ax.errorbar([n * f for f, _ in pts], [st["mean"] for _, st in pts], yerr=[st["std"] for _, st in pts],
                        fmt=mk, ms=8, capsize=3, label=f"{kind.upper()} + gradual warmup")
    if "baseline" in stats and "mean" in stats["baseline"]:
        b = stats["baseline"]
        ax.axhspan(b["mean"] - 2 * b["std"], b["mean"] + 2 * b["std"], color="gray", alpha=0.2,
                   label="baseline ± 2 std")
        ax.axhline(b["mean"] + 1.0, color="gray", ls=":", lw=1, label="baseline + 1 point")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("minibatch size kn")
    ax.set_ylabel(getattr(a, "err_label", None) or f"val top-1 error % (median of last {getattr(a, 'err_last', 5)} epochs)")
    ax.set_title(f"(Fig. 3) Fashion-MNIST: error vs minibatch, {len(results.get('baseline', []))} seeds", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p2 = os.path.join(out_dir, f"{name}_error_vs_kn.png")
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


def fashion_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The paper's Table 1 and Figures 2-4 on Fashion-MNIST, in miniature")
    a = p.add_argument
    a("--dataset", choices=("fashion-mnist",), required=True)
    a("--data", default="fashion-mnist", help="--data of fastar-train (fashion-mnist[=PATH])")
    a("--seeds", type=int, default=3)
    a("--epochs", type=int, default=4)
    a("--train-subset", type=int, default=0, help="train on a fixed stratified subset of this many images (0: all 60,000)")
    a("--err-last", type=int, default=3,
      help="a run's error: the median of the last K epochs' val top-1 error (the paper: K = 5 of 90 epochs)")
    a("--image-size", type=int, default=28)
    a("--width", type=int, default=8)
    a("--model", default="resnet8")
    a("--batch", type=int, default=16, help="n: BN group / micro-batch, and the baseline minibatch kn")
    a("--base-lr", type=float, default=0.1, help="lr of the baseline minibatch (the reference)")
    a("--warmup-epochs", type=float, default=0.5)
    a("--milestones", default="2,3", help="epochs at which lr /= 10 (fastar-train --milestones; '' for the paper's "
                                          "30/60/80 of 90 scaled to --epochs)")
    a("--factors", default="4,8,16,32,64", help="kn/baseline for SGD + gradual warmup")
    a("--none-factors", default="16,32", help="kn/baseline for SGD without warmup")
    a("--table-factor", type=int, default=32, help="kn/baseline of constant warmup and no lr scaling (paper: 8k/256)")
    a("--lars-factor", type=int, default=64, help="kn/baseline of the LARS and LAMB runs")
    a("--trust-coeff", type=float, default=0.001)
    a("--lamb-lr", type=float, default=0.04, help="LAMB's lr at --lars-factor (square-root scaled below it)")
    a("--lars-factors", default="", help="more kn/baseline factors for LARS and LAMB (comma separated)")
    a("--only", default="", help="comma-separated cell keys to run (default all)")
    a("--jobs", type=int, default=2)
    a("--bf16-seeds", type=int, default=0, help="also run the baseline with --amp bf16 and fp32 side by side")
    a("--out", default=FASHION_RESULTS)
    a("--runs-dir", default=os.path.join(REPO, "runs", "large_batch_fashion"))
    a("--resume", action="store_true", help="reuse finished runs of the partial JSON in --out")
    a("--name", default="fashion_mnist_study",
      help="results: NAME.json, NAME.partial.json, NAME_*.png in --out; docs section between <!-- NAME:begin/end -->")
    a("--report-only", action="store_true", help="only redo the tables, JSON, plots and docs from NAME.partial.json")
    a("--merge", default="", help="with --report-only: also the cells and runs of these NAMEs' partial JSONs "
                                 "(comma separated; a study extended by a second process run alongside)")
    a("--no-docs", action="store_true")
    return p


def fashion_main(argv) -> int:
    a = fashion_parser().parse_args(argv)
    from fastar.train.data import build_datasets

    os.makedirs(a.out, exist_ok=True)
    json_path = os.path.join(a.out, f"{a.name}.json")
    partial_path = os.path.join(a.out, f"{a.name}.partial.json")
    if a.report_only:
        merge = [os.path.join(a.out, f"{m}.partial.json") for m in a.merge.split(",") if m]
        return fashion_report(partial_path, json_path, docs=not a.no_docs, name=a.name, merge=merge,
                              err_last=a.err_last if "--err-last" in " ".join(argv) else None)
    build_datasets(a.data, a.image_size)  # fails now, with the package's name, if the data is missing
    common = ["--data", a.data, "--model", a.model, "--width", str(a.width), "--image-size", str(a.image_size),
              *(["--train-subset", str(a.train_subset)] if a.train_subset else []), "--epochs", str(a.epochs),
              "--warmup-epochs", str(a.warmup_epochs), *(["--milestones", a.milestones] if a.milestones else []),
              "--threads", "1", "--eval-every", str(10 ** 6),
              "--eval-last", str(max(5, a.err_last)), "--no-progress", "--no-plots", "--quiet"]
    cells = fashion_cells(a)
    only = {k for k in a.only.split(",") if k}
    if only:
        cells = [c for c in cells if c["key"] in only]
    jobs = []
    for seed in range(a.seeds):  # seed-major: a cut-short study still has every cell
        for c in cells:
            argv_ = common + c["argv"] + ["--seed", str(seed)]
            jobs.append((c["key"], seed, argv_, os.path.join(a.runs_dir, f"{c['key']}_s{seed}"), a.err_last))
    if a.bf16_seeds:
        bc = {"key": "bf16_baseline", "label": f"baseline kn={a.batch}, --amp bf16", "factor": 1,
              "kind": "bf16", "argv": cells[0]["argv"] + ["--amp", "bf16"]}
        for seed in range(a.bf16_seeds):
            for c in (cells[0], bc):
                argv_ = common + c["argv"] + ["--seed", str(seed)]
                key = "fp32_baseline" if c is cells[0] else c["key"]
                jobs.append((key, seed, argv_, os.path.join(a.runs_dir, f"{key}_s{seed}"), a.err_last))
    done = []
    if a.resume and os.path.exists(partial_path):
        with open(partial_path) as f:
            prev = json.load(f)["runs"]
        want = {tuple(j[2]) for j in jobs}
        done = [r for r in prev if tuple(r["argv"]) in want]
        have = {tuple(r["argv"]) for r in done}
        jobs = [j for j in jobs if tuple(j[2]) not in have]
        print(f"resuming: {len(done)} runs reused, {len(jobs)} to go", flush=True)
    t0 = time.perf_counter()
    runs = list(done)

    def dump(final=False):
        doc = {"args": vars(a), "common_argv": common, "cells": cells, "wall_s": time.perf_counter() - t0,
               "complete": final, "runs": runs}
        tmp = partial_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, partial_path)

    from concurrent.futures import as_completed

    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        futs = [pool.submit(fashion_run, j) for j in jobs]
        for fut in as_completed(futs):
            r = fut.result()
            runs.append(r)
            dump()
            print(f"[{(time.perf_counter() - t0) / 60:5.1f} min] {r['key']:16s} seed {r['seed']}: "
                  + ("diverged" if r["diverged"] else f"{r['err']:.2f}% (train {r['final_train_err']:.2f}%, "
                                                      f"{r['images_per_s']:.0f} img/s, {r['wall_s']:.0f} s, "
                                                      f"{r.get('cpu_s', 0):.0f} CPU s)"),
                  flush=True)
    dump(final=True)
    return fashion_report(partial_path, json_path, docs=not a.no_docs, name=a.name)


def fashion_report(partial_path: str, json_path: str, docs: bool = True, name: str = "fashion_mnist_study",
                   merge=(), err_last: int | None = None) -> int:
    """Tables, analysis and plots from the runs in partial_path (and those of `merge`); writes
    json_path (the committed results), the PNGs next to it and the docs section. Every number comes
    from those runs."""
    from fastar.train.recipe import default_milestones

    with open(partial_path) as f:
        doc = json.load(f)
    doc["merged_from"] = []
    for m in merge:
        with open(m) as f:
            other = json.load(f)
        keys = {c["key"] for c in doc["cells"]}
        doc["cells"] += [c for c in other["cells"] if c["key"] not in keys]
        have = {(r["key"], r["seed"]) for r in doc["runs"]}
        doc["runs"] += [r for r in other["runs"] if (r["key"], r["seed"]) not in have]
        doc["wall_s"] = max(doc["wall_s"], other["wall_s"])
        doc["complete"] = doc.get("complete", False) and other.get("complete", False)
        doc["merged_from"].append({"path": os.path.relpath(m, REPO), "args": other["args"]})
    if merge:  # merged cells next to those of their kind (the table's and the plots' order)
        order = ["baseline", "gradual", "none", "constant", "noscale", "lars", "lamb"]
        doc["cells"].sort(key=lambda c: (order.index(c["kind"]) if c["kind"] in order else len(order), c["factor"]))
    a = argparse.Namespace(**doc["args"])
    planned = None
    if err_last and err_last != getattr(a, "err_last", 5):
        # the error re-read from each run's per-epoch validation history with another K; the
        # decisions under the measure the study was run with are kept next to them (analysis_planned)
        planned = {"err_last": getattr(a, "err_last", 5)}
        for r in doc["runs"]:
            if r["diverged"]:
                continue
            errs = [h["val_top1_err"] for h in r["history"] if h.get("val_top1_err") is not None]
            r.setdefault("err_as_run", r["err"])
            r["err"] = statistics.median(errs[-err_last:])
        a.err_last = err_last
    cells, n = doc["cells"], a.batch
    results: dict = {c["key"]: [] for c in cells}
    extra: dict = {}
    for r in sorted(doc["runs"], key=lambda r: (r["key"], r["seed"])):
        (results if r["key"] in results else extra).setdefault(r["key"], []).append(r)
    stats = {k: _stats(v) for k, v in results.items() if v}
    analysis = fashion_analysis(cells, stats, n)
    # complete when every cell has all its seeds, whichever process ran them (a process stopped
    # after its last needed run, with duplicates still queued, never writes complete=True itself)
    doc["complete"] = bool(doc.get("complete")) or (bool(cells) and all(
        len(results.get(c["key"], [])) >= getattr(a, "seeds", 3) for c in cells))
    if planned is not None:
        as_run = {k: _stats([dict(r, err=r.get("err_as_run", r["err"])) for r in v]) for k, v in results.items() if v}
        planned.update(stats=as_run, analysis=fashion_analysis(cells, as_run, n))
    out_dir = os.path.dirname(json_path)
    pngs = fashion_plots(cells, results, stats, a, out_dir, name) if len(stats) > 1 else []
    seeds_done = min((len(v) for v in results.values()), default=0)
    ms = [float(m) for m in a.milestones.split(",") if m.strip()] if getattr(a, "milestones", "") else \
        default_milestones(a.epochs)
    ms = [f"{m:g}" for m in ms]
    train_set = (f"a fixed stratified {a.train_subset}-image subset of the 60,000 training images"
                 if a.train_subset else "all 60,000 training images")
    err_last = getattr(a, "err_last", 5)
    cpu = [r["cpu_s"] for r in doc["runs"] if "cpu_s" in r]
    cpu_txt = (f" CPU time of the runs (getrusage, each run one thread): {sum(cpu) / 60:.0f} core-minutes in all, "
               f"{statistics.median(cpu):.0f} s per run (median), {min(cpu):.0f}-{max(cpu):.0f} s."
               if cpu and len(cpu) == len(doc["runs"]) else "")
    md = [f"Fashion-MNIST: {train_set}, the "
          f"whole 10,000-image test set for validation; {a.model} width {a.width} at {a.image_size}x{a.image_size} "
          f"(pad-{max(1, round(a.image_size / 7))} random crop + flip); n = {n} per (simulated) worker, kn = n x "
          f"--accum; lr {a.base_lr:g} at kn={n}, linear scaling; {a.epochs} epochs, lr /10 at epochs "
          f"{', '.join(map(str, ms))}; warmup {a.warmup_epochs:g} epochs; error = median of the last {err_last} epochs' "
          f"val top-1 error" + (f" (re-read from each run's history; the study was run with the median of the last "
                                f"{planned['err_last']}, kept in the JSON as as_run_measure)" if planned else "")
          + f"; mean ± std over {seeds_done}{'+' if any(len(v) > seeds_done for v in results.values()) else ''} "
          f"seeds. {len(doc['runs'])} runs, {a.jobs} at a time per process (one thread each); the last process ran "
          f"{doc['wall_s'] / 60:.0f} min" + (f" (runs merged from {len(doc['merged_from'])} more process(es))"
                                              if doc.get("merged_from") else "")
          + ("" if doc.get("complete") else " (INCOMPLETE: the study was cut short; cells list their runs)") + "."
          + cpu_txt,
          "", fashion_table(cells, stats, results, n)] if stats else [
        f"Fashion-MNIST, {a.train_subset}-image training subset, {a.model} width {a.width} at {a.image_size}x"
        f"{a.image_size}, {a.epochs} epochs, kn={n}: the study's baseline cell. Measured by `python "
        f"bench/large_batch.py --dataset fashion-mnist --name {name} --only baseline --seeds 0 --bf16-seeds "
        f"{getattr(a, 'bf16_seeds', 1)} ...` ({len(doc['runs'])} runs, {a.jobs} at a time, {doc['wall_s'] / 60:.0f} min wall)."]
    bf = extra.get("bf16_baseline"), extra.get("fp32_baseline")
    if bf[0] and bf[1]:
        rows = []
        for key, rs in (("fp32", bf[1]), ("bf16 autocast", bf[0])):
            ok = [r for r in rs if not r["diverged"]]
            e = [r["err"] for r in ok]
            ips = [r["images_per_s"] for r in ok]
            m, sd = _mean_sd(e)
            rows.append(f"| {key} | {m:.2f} ± {sd:.2f} | {statistics.mean(ips):.0f} | {len(ok)} |")
        md += ["", "bf16 vs fp32 (the baseline cell, run side by side, same seeds):", "",
               "| precision | val top-1 error % | training images/s (median epoch, mean over seeds) | runs |",
               "| --- | --- | --- | --- |"] + rows
    md = "\n".join(md)
    final = {"args": doc["args"], "merged_from": doc["merged_from"], "common_argv": doc["common_argv"],
             "complete": doc.get("complete", False),
             "wall_s": doc["wall_s"], "cells": cells, "stats": stats, "analysis": analysis,
             "err_last": getattr(a, "err_last", 5), "as_run_measure": planned,
             "extra_stats": {k: _stats(v) for k, v in extra.items()}, "runs": doc["runs"], "table_md": md}
    with open(json_path, "w") as f:
        json.dump(final, f, indent=1)
    print(md)
    print(json.dumps(analysis, indent=1))
    print(f"wrote {json_path}, {', '.join(pngs)}")
    if docs:
        update_docs_between(md, os.path.join(REPO, "docs", "training.md"), f"<!-- {name}:begin -->",
                            f"<!-- {name}:end -->")
        update_all_docs()  # and every other generated block, from its committed JSON
    return 0


def update_docs_between(md: str, path: str, begin: str, end: str) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + md + "\n" + end + tail)


# =============================================================================================
# The tuned study (issue 25): a held-out validation split for every choice, LARS and LAMB tuned as
# their authors did (global lr grid, eta grid, polynomial decay to 0, warmup), 5 seeds for the
# decisive cells, divergence counted, Welch t-tests, and two cells also through 2 fastar workers.
#   python bench/large_batch.py --dataset fashion-mnist --study tuned [--resume] [--jobs 2]

CHANCE_ERR = 89.0  # a run whose final error is >= this (10 classes: chance is 90 %) is at chance


def tuned_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="the tuned large-minibatch study on Fashion-MNIST (issue 25)")
    a = p.add_argument
    a("--dataset", choices=("fashion-mnist",), required=True)
    a("--study", choices=("tuned",), required=True)
    a("--data", default="fashion-mnist")
    a("--name", default="fashion_mnist_tuned")
    a("--holdout", type=int, default=5000, help="training images held out as the validation split")
    a("--train-subset", type=int, default=8000, help="training images (drawn from the rest; 0: all 55,000)")
    a("--image-size", type=int, default=12)
    a("--width", type=int, default=8)
    a("--model", default="resnet8")
    a("--epochs", type=int, default=3)
    a("--milestones", default="1.5,2.5", help="SGD's step decays (lr /10)")
    a("--warmup-epochs", type=float, default=0.375, help="every cell's warmup (1/8 of the run by default)")
    a("--batch", type=int, default=16)
    a("--base-lr", type=float, default=0.1)
    a("--decisive-seeds", type=int, default=5)
    a("--seeds", type=int, default=3, help="seeds of the other cells")
    a("--factors", default="4,8,16,32,64", help="SGD + gradual warmup")
    a("--decisive-factors", default="16,32", help="gradual-warmup cells with --decisive-seeds")
    a("--none-factors", default="16,32", help="SGD without warmup (the first with --decisive-seeds)")
    a("--table-factor", type=int, default=32, help="constant warmup and no lr scaling")
    a("--grid-factor", type=int, default=64, help="kn / n of the LARS and LAMB grid and tuned cells")
    a("--lars-lrs", default="2,4,8,20", help="LARS's global lr grid (>= 4 values spanning 10x)")
    a("--lars-etas", default="0.001,0.002,0.005")
    a("--lamb-lrs", default="0.01,0.02,0.05,0.1")
    a("--grid-extend", type=int, default=2, help="points added beyond an edge when the best is at one (each)")
    a("--trust-clip", action="store_true", help="LARS/LAMB with timm's trust-ratio clipping")
    a("--fastar-factors", default="2,16", help="cells also run as 2 fastar workers (--nproc 2, accum halved)")
    a("--jobs", type=int, default=2, help="CPU slots: one-process runs take 1, fastar runs 2")
    a("--out", default=FASHION_RESULTS)
    a("--runs-dir", default=os.path.join(REPO, "runs", "large_batch_tuned"))
    a("--resume", action="store_true", help="reuse the finished runs of NAME.partial.json")
    a("--report-only", action="store_true")
    a("--max-core-min", type=float, default=240.0, help="stop starting runs past this much CPU (getrusage)")
    a("--skip", default="", help="cell keys this process does not run (comma separated; they stay in the study)")
    a("--no-docs", action="store_true")
    return p


def _fl(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _g(v: float) -> str:
    return f"{v:g}"


def tuned_cells(a) -> dict[str, dict]:
    """The fixed cells (the grid's and the tuned LARS/LAMB cells are made by grid_cell/tuned_cell)."""
    n, cells = a.batch, {}
    base = ["--batch", str(n), "--base-lr", _g(a.base_lr), "--ref-batch", str(n)]
    dec = set(_ints(a.decisive_factors))
    nf = _ints(a.none_factors)

    def add(key, label, factor, kind, argv, seeds, **kw):
        cells[key] = dict(key=key, label=label, factor=factor, kind=kind, argv=argv, seeds=seeds, split="test", **kw)

    add("baseline", f"baseline kn={n}", 1, "baseline", base + ["--accum", "1", "--warmup", "gradual"],
        a.decisive_seeds)
    ff = set(_ints(a.fastar_factors))
    for f in sorted(set(_ints(a.factors)) | ff):
        add(f"gradual_x{f}", f"kn={n * f}, gradual warmup", f, "gradual",
            base + ["--accum", str(f), "--warmup", "gradual"], a.decisive_seeds if f in dec else a.seeds)
    for i, f in enumerate(nf):
        add(f"none_x{f}", f"kn={n * f}, no warmup", f, "none", base + ["--accum", str(f), "--warmup", "none"],
            a.decisive_seeds if i == 0 else a.seeds)
    t = a.table_factor
    add(f"constant_x{t}", f"kn={n * t}, constant warmup", t, "constant",
        base + ["--accum", str(t), "--warmup", "constant"], a.seeds)
    add(f"noscale_x{t}", f"kn={n * t}, no lr scaling (lr {a.base_lr:g})", t, "noscale",
        ["--batch", str(n), "--base-lr", _g(a.base_lr), "--ref-batch", str(n * t), "--accum", str(t),
         "--warmup", "none"], a.seeds)
    for f in sorted(ff):
        if f % 2:
            raise SystemExit(f"--fastar-factors: {f} is odd; 2 workers of n={n} need an even factor")
        add(f"fastar_x{f}", f"kn={n * f}, gradual warmup, 2 fastar workers x accum {f // 2}", f, "fastar",
            base + ["--nproc", "2", "--accum", str(f // 2), "--warmup", "gradual"],
            a.seeds, slots=2, twin=f"gradual_x{f}")
    return cells


def _opt_argv(a, kind: str, lr: float, eta: float | None) -> list[str]:
    f, n = a.grid_factor, a.batch
    argv = ["--batch", str(n), "--base-lr", _g(lr), "--ref-batch", str(n * f), "--accum", str(f),
            "--warmup", "gradual", "--warmup-start-lr", "0", "--decay", "poly", "--poly-power", "2",
            "--optimizer", kind]
    if kind == "lars":
        argv += ["--trust-coeff", _g(eta)]
    if a.trust_clip:
        argv += ["--trust-clip"]
    return argv


def grid_cell(a, kind: str, lr: float, eta: float | None) -> dict:
    key = f"grid_{kind}_lr{_g(lr)}" + (f"_eta{_g(eta)}" if eta is not None else "")
    return dict(key=key, label=f"{kind.upper()} lr {_g(lr)}" + (f", eta {_g(eta)}" if eta is not None else ""),
                factor=a.grid_factor, kind=f"grid_{kind}", argv=_opt_argv(a, kind, lr, eta), seeds=1,
                split="holdout", lr=lr, eta=eta)


def tuned_cell(a, kind: str, lr: float, eta: float | None) -> dict:
    return dict(key=f"{kind}_x{a.grid_factor}", factor=a.grid_factor, kind=kind,
                label=f"kn={a.batch * a.grid_factor}, {kind.upper()} (tuned: lr {_g(lr)}"
                      + (f", eta {_g(eta)}" if eta is not None else "") + "), poly decay",
                argv=_opt_argv(a, kind, lr, eta), seeds=a.decisive_seeds, split="test", lr=lr, eta=eta)


def tuned_common(a) -> list[str]:
    return ["--data", a.data, "--model", a.model, "--width", str(a.width), "--image-size", str(a.image_size),
            *(["--train-subset", str(a.train_subset)] if a.train_subset else []), "--holdout", str(a.holdout),
            "--epochs", str(a.epochs), "--warmup-epochs", _g(a.warmup_epochs),
            *(["--milestones", a.milestones] if a.milestones else []), "--threads", "1",
            "--eval-every", str(10 ** 6), "--eval-last", "1", "--no-progress", "--no-plots", "--quiet"]


def tuned_run(job) -> dict:
    """One run: err is the test error read once at the end (split test) or the held-out error (split
    holdout, the test set never read). Diverged: a non-finite loss, or a final error at chance."""
    import resource

    from fastar.train.cli import run

    key, seed, argv, out, split = job
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    rec = {"key": key, "seed": seed, "argv": argv, "split": split}
    try:
        s = run(argv + ["--out", out] + (["--no-test"] if split == "holdout" else []))
        hist = [{k: h[k] for k in ("epoch", "train_loss", "train_top1_err", "last_lr_used", "images_per_s",
                                   "val_top1_err", "test_top1_err") if k in h} for h in s["history"]]
        val = hist[-1].get("val_top1_err")
        test = s.get("test_top1_err")
        err = test if split == "test" else val
        rec.update(err=err, val_err=val, test_err=test, final_train_err=hist[-1]["train_top1_err"],
                   final_train_loss=hist[-1]["train_loss"], history=hist, target_lr=s["target_lr"],
                   iters_per_epoch=s["iters_per_epoch"], warmup_iters=s["warmup_iters"], impl=s["impl"],
                   world_size=s["world_size"], images_per_s=statistics.median(h["images_per_s"] for h in hist))
        rec["diverged"] = bool(err is None or not math.isfinite(err) or err >= CHANCE_ERR)
        if rec["diverged"]:
            rec["why"] = f"final error {err} at chance (>= {CHANCE_ERR})"
    except FloatingPointError as e:
        rec.update(diverged=True, err=None, why=str(e), history=[])
    except Exception as e:  # noqa: BLE001 - a run that could not run (not a training result): not counted
        rec.update(failed=f"{type(e).__name__}: {e}", diverged=None, err=None, history=[])
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    rec["wall_s"] = time.perf_counter() - t0
    # this process and its spawned workers (fastar runs): children's time once they are joined
    rec["cpu_s"] = sum(getattr(b, f) - getattr(a_, f) for a_, b in ((r0, r1), (c0, c1))
                       for f in ("ru_utime", "ru_stime"))
    return rec


def grid_best(a, kind: str, runs: list[dict]) -> dict | None:
    """The grid's best point by held-out error (diverged points: infinitely bad), and the points to
    add when it lies at an edge of its lr range (the next value beyond, x2 or /2, up to --grid-extend)."""
    pts = [r for r in runs if r["key"].startswith(f"grid_{kind}_")]
    if not pts:
        return None

    def score(r):
        return float("inf") if r["diverged"] else r["err"]

    best = min(pts, key=score)
    lrs = sorted({r["lr"] for r in pts if r.get("eta") == best.get("eta")})
    return {"best": best, "lrs": lrs, "at_low": best["lr"] == lrs[0], "at_high": best["lr"] == lrs[-1]}


def tuned_main(argv) -> int:
    a = tuned_parser().parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    partial = os.path.join(a.out, f"{a.name}.partial.json")
    final = os.path.join(a.out, f"{a.name}.json")
    if a.report_only:
        return tuned_report(partial, final, docs=not a.no_docs)
    from fastar.train.data import build_datasets

    build_datasets(a.data, a.image_size, holdout=a.holdout)  # fails now, naming the package, if missing
    from bench.stamp import git_state

    common = tuned_common(a)
    fixed = tuned_cells(a)
    cells: dict[str, dict] = dict(fixed)
    runs: list[dict] = []
    if a.resume and os.path.exists(partial):
        with open(partial) as f:
            prev = json.load(f)
        runs = [r for r in prev["runs"]]
        cells.update({k: c for k, c in prev["cells"].items() if k not in cells})
        print(f"resuming: {len(runs)} finished runs reused", flush=True)
    stamp0 = git_state()
    # every process that ran part of the study: its commit and how many runs were already there
    stamps = (prev.get("stamps") or [dict(prev["stamp"], runs_before=0)]) if runs and prev.get("stamp") else []
    stamps.append(dict(stamp0, runs_before=len(runs)))
    t0 = time.perf_counter()
    wall_before = 0.0
    if a.resume and os.path.exists(partial):
        wall_before = prev.get("wall_s", 0.0)

    def dump(complete=False, note=""):
        doc = {"args": vars(a), "common_argv": common, "cells": cells, "runs": runs, "complete": complete,
               "wall_s": wall_before + time.perf_counter() - t0, "stamp": stamp0, "stamps": stamps, "note": note}
        tmp = partial + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, partial)

    grid_cells = [grid_cell(a, "lars", lr, eta) for eta in _fl(a.lars_etas) for lr in _fl(a.lars_lrs)]
    grid_cells += [grid_cell(a, "lamb", lr, None) for lr in _fl(a.lamb_lrs)]
    for c in grid_cells:
        cells.setdefault(c["key"], c)
    extended = {"lars": 0, "lamb": 0}

    def pending() -> list[tuple[int, dict, int]]:
        """(priority, cell, seed) of the runs still to do, most urgent first."""
        have = {(r["key"], r["seed"]) for r in runs}
        out = []
        skip = {k for k in a.skip.split(",") if k}
        for c in cells.values():
            if c["key"] in skip:
                continue
            for s in range(c["seeds"]):
                if (c["key"], s) in have:
                    continue
                twins = {fixed[k].get("twin") for k in fixed}
                if c["kind"].startswith("grid_"):
                    pr = 0
                elif c["seeds"] == a.decisive_seeds and c["kind"] != "fastar":
                    pr = 0 if s < 3 else 2  # decisive cells: three seeds first, then the other two
                elif c["kind"] == "fastar" or c["key"] in twins:
                    pr = 1  # the fastar runs and their one-process twins
                elif c["kind"] == "gradual" and c["factor"] == a.grid_factor:
                    pr = 2  # SGD at the LARS/LAMB kn
                else:
                    pr = 4
                out.append((pr, c, s))
        return sorted(out, key=lambda t: (t[0], t[2], t[1]["key"]))

    def grid_update():
        """After each grid run: extend a grid whose best lies at an edge; once a grid is done (all
        its points, extensions included), add its tuned cell."""
        for kind in ("lars", "lamb"):
            pts = [r for r in runs if r["key"].startswith(f"grid_{kind}_")]
            want = [c for c in cells.values() if c["kind"] == f"grid_{kind}"]
            if len(pts) < len(want):
                continue
            for r in pts:
                c = cells[r["key"]]
                r.setdefault("lr", c["lr"])
                r.setdefault("eta", c["eta"])
            g = grid_best(a, kind, pts)
            if g is None:
                continue
            b = g["best"]
            edge_lr = (g["lrs"][0] / 2 if g["at_low"] else g["lrs"][-1] * 2) if (g["at_low"] or g["at_high"]) else None
            if b["diverged"]:  # every point diverged: try below the range
                edge_lr = min(r["lr"] for r in pts) / 2
            if edge_lr is not None and extended[kind] < a.grid_extend:
                extended[kind] += 1
                c = grid_cell(a, kind, edge_lr, b.get("eta"))
                c["added"] = f"the best point (lr {_g(b['lr'])}) was at an edge"
                cells.setdefault(c["key"], c)
                continue
            tc = tuned_cell(a, kind, b["lr"], b.get("eta"))
            if tc["key"] not in cells and not b["diverged"]:
                cells[tc["key"]] = tc
                print(f"  {kind}: best held-out point lr {_g(b['lr'])}"
                      + (f" eta {_g(b['eta'])}" if b.get("eta") is not None else "")
                      + f" ({b['err']:.2f} %): tuned cell {tc['key']}", flush=True)

    # extensions already made in an earlier (resumed) process
    for kind in extended:
        extended[kind] = sum(1 for c in cells.values() if c["kind"] == f"grid_{kind}" and c.get("added"))
    grid_update()
    from concurrent.futures import FIRST_COMPLETED, wait

    cpu_done = lambda: sum(r.get("cpu_s", 0.0) for r in runs) / 60  # noqa: E731
    running: dict = {}
    failed: set = set()
    used = 0
    stop_note = ""
    with ProcessPoolExecutor(max_workers=a.jobs) as pool:
        while True:
            busy = {(k, s_) for k, s_, _ in running.values()} | failed
            todo = [t for t in pending() if (t[1]["key"], t[2]) not in busy]
            if cpu_done() > a.max_core_min:
                stop_note = f"stopped starting runs at {cpu_done():.0f} core-minutes (--max-core-min)"
                todo = []
            for pr, c, s in todo:
                need = c.get("slots", 1)
                if used + need > a.jobs:
                    if used == 0:
                        need = a.jobs  # a 2-slot run on a 1-slot budget: run it alone
                    else:
                        break  # keep the order: wait for a slot rather than jump the queue
                job = (c["key"], s, common + c["argv"] + ["--seed", str(s)],
                       os.path.join(a.runs_dir, f"{c['key']}_s{s}"), c["split"])
                running[pool.submit(tuned_run, job)] = (c["key"], s, need)
                used += need
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                key, s, need = running.pop(fut)
                used -= need
                r = fut.result()
                if r.get("failed"):
                    failed.add((key, s))
                    print(f"  {key} seed {s} FAILED, not counted, not retried by this process: {r['failed']}",
                          flush=True)
                    continue
                r["commit"] = (stamp0.get("commit") or "")[:10] + ("+dirty" if stamp0.get("dirty") else "")
                c = cells[key]
                if c.get("lr") is not None:
                    r["lr"], r["eta"] = c["lr"], c.get("eta")
                runs.append(r)
                grid_update()
                dump(note=stop_note)
                print(f"[{(time.perf_counter() - t0) / 60:5.1f} min, {cpu_done():5.1f} core-min] {key:24s} seed {s}: "
                      + (f"DIVERGED ({r.get('why')})" if r["diverged"] else
                         f"{r['split']} {r['err']:.2f}% (train {r['final_train_err']:.2f}%, {r['wall_s']:.0f} s, "
                         f"{r['cpu_s']:.0f} CPU s)"), flush=True)
    if failed:
        stop_note += (" " if stop_note else "") + "failed (not counted): " + ", ".join(f"{k} seed {s_}" for k, s_ in sorted(failed))
    dump(complete=not pending(), note=stop_note)
    return tuned_report(partial, final, docs=not a.no_docs)


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value of mean(b) != mean(a); None with fewer than 2 values a side or
    no spread at all."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats as ss

    if statistics.pstdev(a) == 0 and statistics.pstdev(b) == 0:
        return 0.0 if statistics.mean(a) != statistics.mean(b) else 1.0
    return float(ss.ttest_ind(b, a, equal_var=False).pvalue)


def compare(ref: dict, other: dict, alpha: float = 0.05) -> dict:
    """Is `other` worse than `ref`? More diverged runs: worse (fewer: not worse). Otherwise, over the
    runs that did not diverge: worse when the mean is higher by more than 2 x the larger of the two
    cells' std (the threshold) and the Welch t-test gives p < alpha."""
    out = {"diverged_ref": ref["diverged"], "diverged_other": other["diverged"], "n_ref": ref["n"],
           "n_other": other["n"], "diff": None, "threshold": None, "p": None}
    if "mean" in ref and "mean" in other:
        out["diff"] = other["mean"] - ref["mean"]
        out["threshold"] = 2 * max(ref["std"], other["std"])
        out["p"] = welch(ref["errs"], other["errs"])
    if other["diverged"] != ref["diverged"]:
        out["worse"], out["by"] = other["diverged"] > ref["diverged"], "diverged runs"
    elif out["diff"] is None:
        out["worse"], out["by"] = None, "no runs to compare"
    elif out["p"] is None:
        out["worse"], out["by"] = None, "too few runs for a Welch test (2 a side needed)"
    else:
        out["worse"] = bool(out["diff"] > out["threshold"] and out["p"] is not None and out["p"] < alpha)
        out["by"] = "mean, threshold and Welch p"
    return out


def tuned_stats(runs: list[dict]) -> dict:
    ok = [r for r in runs if not r["diverged"]]
    out = {"n": len(runs), "diverged": len(runs) - len(ok), "errs": [r["err"] for r in ok],
           "seeds": [r["seed"] for r in ok]}
    if ok:
        out["mean"], out["std"] = _mean_sd(out["errs"])
        out["train_err_mean"] = statistics.mean(r["final_train_err"] for r in ok)
        vals = [r["val_err"] for r in ok if r.get("val_err") is not None]
        if vals:
            out["val_mean"] = statistics.mean(vals)
    return out


def tuned_analysis(a, cells: dict, stats: dict, runs: list[dict]) -> dict:
    n = a["batch"]
    out = {"rule": "B worse than A: more diverged runs; or, equal counts, mean(B) - mean(A) > 2 x max(std A, std B) "
                   "and Welch two-sided p < 0.05, over the runs that did not diverge; diverged: non-finite loss or "
                   f"final error >= {CHANCE_ERR} %"}
    base = stats.get("baseline")
    if not base:
        return out
    grad = sorted((c["factor"], k) for k, c in cells.items() if c["kind"] == "gradual" and k in stats)
    steps, flat, tip = [], 1, None
    undecided = None
    for f, k in grad:
        cmp_ = compare(base, stats[k])
        steps.append(dict(cmp_, kn=n * f))
        if cmp_["worse"] is None:  # the walk stops: nothing is claimed past an undecided cell
            undecided = n * f
            break
        if cmp_["worse"]:
            tip = f
            break
        flat = f
    out["finding1"] = {"steps": steps, "flat_up_to_kn": n * flat, "appeared": flat > 1, "undecided_at_kn": undecided}
    out["finding3"] = {"tipping_kn": n * tip if tip else None, "appeared": tip is not None}
    f2 = []
    for k, c in cells.items():
        if c["kind"] != "none" or k not in stats or f"gradual_x{c['factor']}" not in stats:
            continue
        g = stats[f"gradual_x{c['factor']}"]
        cg = compare(base, g)
        cn = compare(g, stats[k])
        f2.append(dict(cn, kn=n * c["factor"], gradual_within_noise=cg["worse"] is False,
                       none_vs_baseline=compare(base, stats[k])))
    f2.sort(key=lambda x: x["kn"])
    out["finding2"] = {"cells": f2, "appeared": any(x["worse"] and x["gradual_within_noise"] for x in f2)}
    # gradual_within_noise is True only when decided (not worse); an undecided cell never shows a finding
    t = a["table_factor"]
    out["table1"] = {k: dict(compare(stats[f"gradual_x{t}"], stats[k]), key=k)
                     for k in (f"none_x{t}", f"constant_x{t}", f"noscale_x{t}")
                     if k in stats and f"gradual_x{t}" in stats}
    L = a["grid_factor"]
    sgd_L = stats.get(f"gradual_x{L}")
    for kind in ("lars", "lamb"):
        pts = sorted((r for r in runs if r["key"].startswith(f"grid_{kind}_")),
                     key=lambda r: (r.get("eta") or 0, r["lr"]))
        if not pts:
            continue
        ok = [r for r in pts if not r["diverged"]]
        best = min(ok, key=lambda r: r["err"]) if ok else None
        grid = {"points": [{"lr": r["lr"], "eta": r.get("eta"), "holdout_err": None if r["diverged"] else r["err"],
                            "diverged": r["diverged"]} for r in pts],
                "best": {"lr": best["lr"], "eta": best.get("eta"), "holdout_err": best["err"]} if best else None}
        if best:
            same = sorted({r["lr"] for r in pts if r.get("eta") == best.get("eta")})
            grid["best_at_edge"] = best["lr"] in (same[0], same[-1])
            # the trend: the held-out error of each lr (at the best eta) and of each eta (at the best lr)
            grid["by_lr_at_best_eta"] = [(r["lr"], None if r["diverged"] else r["err"]) for r in pts
                                         if r.get("eta") == best.get("eta")]
            grid["by_eta_at_best_lr"] = [(r.get("eta"), None if r["diverged"] else r["err"]) for r in pts
                                         if r["lr"] == best["lr"]]
        res = {"grid": grid}
        st = stats.get(f"{kind}_x{L}")
        if st:
            res["vs_baseline"] = compare(base, st)
            res["minus_baseline"] = st["mean"] - base["mean"] if "mean" in st else None
            res["within_1pt_of_baseline"] = bool("mean" in st and not st["diverged"] and st["mean"] - base["mean"] <= 1.0)
            if sgd_L:
                res["vs_sgd_gradual"] = compare(sgd_L, st)  # worse than SGD at the same kn?
                res["sgd_vs_it"] = compare(st, sgd_L)  # SGD worse than it?
            if best:
                res["best_holdout_minus_baseline_holdout"] = (best["err"] - base["val_mean"]) if "val_mean" in base else None
        out[kind] = res
    fa = []
    for k, c in cells.items():
        if c["kind"] != "fastar" or k not in stats or c["twin"] not in stats:
            continue
        tw = stats[c["twin"]]
        st = stats[k]
        paired = {}
        for r in runs:
            if r["key"] == k and not r["diverged"]:
                tr = next((x for x in runs if x["key"] == c["twin"] and x["seed"] == r["seed"] and not x["diverged"]), None)
                if tr:
                    paired[r["seed"]] = r["err"] - tr["err"]
        d = st["mean"] - tw["mean"] if "mean" in st and "mean" in tw else None
        thr = 2 * max(st.get("std", 0), tw.get("std", 0))
        fa.append({"key": k, "twin": c["twin"], "kn": n * c["factor"], "diff": d, "threshold": thr,
                   "p": welch(tw["errs"], st["errs"]), "paired_diffs": paired,
                   "match": bool(d is not None and abs(d) <= thr and st["diverged"] == tw["diverged"]),
                   "impl": sorted({r.get("impl") for r in runs if r["key"] == k})})
    out["fastar"] = fa
    return out


def _f(x, nd=2, sign=False):
    if x is None:
        return "-"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _p(p):
    return "-" if p is None else (f"{p:.2g}" if p >= 1e-4 else "<1e-4")


def _cmp_txt(c: dict) -> str:
    d = f"{_f(c['diff'], sign=True)}, threshold {_f(c['threshold'])}, Welch p {_p(c['p'])}"
    if c["diverged_ref"] or c["diverged_other"]:
        d += f"; diverged {c['diverged_other']}/{c['n_other']} against {c['diverged_ref']}/{c['n_ref']}"
    return d + f": {'worse' if c['worse'] else ('not worse' if c['worse'] is False else 'undecided')}"


def trend(pairs: list) -> str:
    """How the held-out error moves along a grid axis: [(value, error or None if diverged), ...]."""
    pairs = sorted(pairs, key=lambda t: t[0])
    errs = [e if e is not None else float("inf") for _, e in pairs]
    if len(pairs) < 2:
        return "one point"
    i = errs.index(min(errs))
    down = all(errs[j] >= errs[j + 1] for j in range(i))
    up = all(errs[j] <= errs[j + 1] for j in range(i, len(errs) - 1))
    shape = ("falls across the whole range" if i == len(errs) - 1 and down else
             "rises across the whole range" if i == 0 and up else
             f"falls to {_g(pairs[i][0])} and rises beyond it" if down and up else
             f"is lowest at {_g(pairs[i][0])}, not monotonic around it")
    return shape + " (" + ", ".join(f"{_g(v)}: {'diverged' if e is None else f'{e:.2f}'}" for v, e in pairs) + ")"


def tuned_render(doc: dict) -> tuple[dict, dict, str]:
    """(stats, analysis, markdown) of a tuned study's JSON (partial or final): a pure function of
    the runs, so that the docs block can be checked against the committed JSON."""
    a, cells, runs = doc["args"], doc["cells"], doc["runs"]
    by: dict = {}
    for r in sorted(runs, key=lambda r: (r["key"], r["seed"])):
        by.setdefault(r["key"], []).append(r)
    stats = {k: tuned_stats(v) for k, v in by.items()}
    an = tuned_analysis(a, cells, stats, runs)
    n = a["batch"]
    cpu = sum(r.get("cpu_s", 0.0) for r in runs) / 60
    missing = [f"{k} ({len(by.get(k, []))}/{c['seeds']} seeds)" for k, c in cells.items()
               if len(by.get(k, [])) < c["seeds"]]
    st0 = doc.get("stamp") or {}
    sub = f"a fixed stratified {a['train_subset']}-image subset of the other 55,000" if a["train_subset"] else \
        "the other 55,000 images"
    md = [f"Fashion-MNIST: {a['holdout']} training images held out as the validation split (a fixed stratified "
          f"draw; every tuning choice is made on it), training on {sub}, the 10,000-image test set read once, "
          f"after the last epoch, by each final run (never by a grid run). {a['model']} width {a['width']} at "
          f"{a['image_size']}x{a['image_size']}; n = {n} per (simulated) worker; {a['epochs']} epochs; warmup "
          f"{a['warmup_epochs']:g} epoch(s) for every cell ({a['warmup_epochs'] / a['epochs']:.3g} of the run; the paper: "
          f"5 of 90 = 0.056); SGD: lr {a['base_lr']:g} at kn={n}, linear scaling, Nesterov, lr /10 at epochs "
          f"{a['milestones']}; LARS (plain momentum 0.9) and LAMB: the global lr and eta from the grid, warmup from 0, "
          f"polynomial (power 2) decay to 0" + (", trust-ratio clipping" if a.get("trust_clip") else ", no trust-ratio clipping")
          + f". Error: the final test top-1 error; mean ± std over the runs that did not diverge (diverged: non-finite "
          f"loss or final error >= {CHANCE_ERR:g} %). Ran on "
          + ", ".join(f"commit {str(x.get('commit'))[:10]}" + ("+dirty (" + ", ".join(x.get("changed", [])) + ")"
                                                                if x.get("dirty") else "")
                      + f" (from run {x.get('runs_before', 0) + 1})" for x in (doc.get("stamps") or [st0]))
          + f"; {len(runs)} runs, {cpu:.1f} core-minutes "
          f"(getrusage, runs and their workers), {doc['wall_s'] / 60:.0f} min wall."
          + ("" if not missing else f" PARTIAL: runs missing from {', '.join(missing)}."
             + (f" ({doc['note']})" if doc.get("note") else "")), ""]
    md += ["| setting | kn | lr | iters/epoch | test top-1 error % (mean ± std) | − baseline | diverged | runs |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = stats.get("baseline", {})
    order = ["baseline", "gradual", "none", "constant", "noscale", "lars", "lamb", "fastar"]
    for k, c in sorted(((k, c) for k, c in cells.items() if k in stats and c["split"] == "test"),
                       key=lambda kc: (order.index(kc[1]["kind"]), kc[1]["factor"])):
        st, rs = stats[k], by[k]
        r0 = next((r for r in rs if not r["diverged"]), rs[0])
        cell = f"{st['mean']:.2f} ± {st['std']:.2f}" if "mean" in st else "all diverged"
        diff = "" if k == "baseline" or "mean" not in st or "mean" not in base else f"{st['mean'] - base['mean']:+.2f}"
        lr = r0.get("target_lr")
        md.append(f"| {c['label']} | {n * c['factor']} | {_g(lr) if lr is not None else '-'} | "
                  f"{r0.get('iters_per_epoch', '-')} | {cell} | {diff} | {st['diverged']} | {st['n']} |")
    f1, f3, f2 = an.get("finding1"), an.get("finding3"), an.get("finding2")
    md += ["", "Findings (decided by `tuned_analysis` from the runs; " + an["rule"] + "):", ""]
    if f1:
        md.append(f"* Finding 1 (linear scaling + gradual warmup within noise of the baseline): "
                  f"{'appeared' if f1['appeared'] else 'did not appear'}, flat up to kn = {f1['flat_up_to_kn']}"
                  + (f" (undecided from kn = {f1['undecided_at_kn']}: too few runs)" if f1.get("undecided_at_kn") else "")
                  + ". "
                  + "; ".join(f"kn {s['kn']}: {_cmp_txt(s)}" for s in f1["steps"]) + ".")
        md.append(f"* Finding 3 (a tipping point where gradual warmup fails): "
                  + (f"appeared, at kn = {f3['tipping_kn']}." if f3["appeared"] else
                     ("undecided." if f1.get("undecided_at_kn") else "did not appear in the range run.")))
    if f2:
        md.append("* Finding 2 (no warmup worse than gradual warmup where gradual holds): "
                  + ("appeared" if f2["appeared"] else "did not appear") + ". "
                  + "; ".join(f"kn {x['kn']}: no warmup against gradual {_cmp_txt(x)} (gradual "
                              f"{'within noise of' if x['gradual_within_noise'] else 'worse than'} the baseline)"
                              for x in f2["cells"]) + ".")
    if an.get("table1"):
        md.append("* The paper's Table 1 rows against gradual warmup at kn = "
                  f"{n * a['table_factor']}: " + "; ".join(f"{cells[k]['label']}: {_cmp_txt(v)}"
                                                           for k, v in an["table1"].items()) + ".")
    for kind in ("lars", "lamb"):
        res = an.get(kind)
        if not res:
            continue
        g = res["grid"]
        if kind == "lars":
            etas = sorted({p["eta"] for p in g["points"]})
            lrs = sorted({p["lr"] for p in g["points"]})
            md += ["", f"LARS grid at kn = {n * a['grid_factor']} (held-out error %, one seed; x: diverged):", "",
                   "| eta \\ lr | " + " | ".join(_g(v) for v in lrs) + " |", "| --- |" + " --- |" * len(lrs)]
            for e in etas:
                row = []
                for v in lrs:
                    pt = next((p for p in g["points"] if p["eta"] == e and p["lr"] == v), None)
                    row.append("" if pt is None else ("x" if pt["diverged"] else f"{pt['holdout_err']:.2f}"))
                md.append(f"| {_g(e)} | " + " | ".join(row) + " |")
        else:
            md += ["", f"LAMB grid at kn = {n * a['grid_factor']} (held-out error %, one seed; x: diverged):", "",
                   "| lr | " + " | ".join(_g(p["lr"]) for p in g["points"]) + " |",
                   "| --- |" + " --- |" * len(g["points"]),
                   "| held-out error | " + " | ".join("x" if p["diverged"] else f"{p['holdout_err']:.2f}"
                                                     for p in g["points"]) + " |"]
        if g.get("best"):
            b = g["best"]
            md.append("")
            md.append(f"{kind.upper()}: best held-out point lr {_g(b['lr'])}" + (f", eta {_g(b['eta'])}" if b["eta"] else "")
                      + f" ({b['holdout_err']:.2f} %), " + ("at an edge of its lr range" if g["best_at_edge"] else
                                                            "inside its lr range") + "."
                      + f" Along lr" + (f" at eta {_g(b['eta'])}" if b["eta"] else "") + f" the held-out error "
                      + trend(g["by_lr_at_best_eta"]) + "."
                      + (f" Along eta at lr {_g(b['lr'])} it " + trend(g["by_eta_at_best_lr"]) + "."
                         + (" The best eta is at an edge of the eta set (not extended: the set is fixed)."
                            if b["eta"] in (min(p["eta"] for p in g["points"]), max(p["eta"] for p in g["points"]))
                            else "")
                         if b["eta"] and len(g["by_eta_at_best_lr"]) > 1 else "")
                      + (f" Its held-out error is {_f(res.get('best_holdout_minus_baseline_holdout'), sign=True)} "
                         "from the baseline's (mean held-out error of the baseline's runs)."
                         if res.get("best_holdout_minus_baseline_holdout") is not None else ""))
        if "vs_baseline" in res:
            md.append("")
            md.append(f"Tuned {kind.upper()} at kn = {n * a['grid_factor']} on the test set: against the baseline "
                      f"{_cmp_txt(res['vs_baseline'])}; "
                      + ("within 1 point of the baseline" if res["within_1pt_of_baseline"] else "not within 1 point of the baseline")
                      + (f"; against SGD + gradual warmup at the same kn: {_cmp_txt(res['vs_sgd_gradual'])} "
                         f"(SGD against it: {'worse' if res['sgd_vs_it']['worse'] else 'not worse'})" if "vs_sgd_gradual" in res else "")
                      + ".")
    if an.get("fastar"):
        md += ["", "Through fastar: 2 worker processes (`fastar-train --nproc 2`, gradients averaged by fastar.wrap, "
                   "micro-batches of 16 per worker, accumulation halved) against the one-process `--accum` cell of the same kn:", "",
               "| kn | 2 fastar workers | one process, --accum | difference | threshold (2 x max std) | Welch p | per-seed differences | match |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in an["fastar"]:
            s1, s2 = stats[x["key"]], stats[x["twin"]]
            md.append(f"| {x['kn']} | {_f(s1.get('mean'))} ± {_f(s1.get('std'))} ({s1['n']} runs, impl {','.join(map(str, x['impl']))}) | "
                      f"{_f(s2.get('mean'))} ± {_f(s2.get('std'))} ({s2['n']}) | {_f(x['diff'], sign=True)} | {_f(x['threshold'])} | "
                      f"{_p(x['p'])} | " + ", ".join(f"s{k}: {v:+.2f}" for k, v in sorted(x["paired_diffs"].items(), key=lambda t: int(t[0])))
                      + f" | {'yes' if x['match'] else 'no'} |")
    return stats, an, "\n".join(md)


def tuned_plots(doc: dict, stats: dict, out_dir: str, name: str) -> list[str]:
    a = doc["args"]
    cells = [c for c in doc["cells"].values() if c["split"] == "test" and c["key"] in stats]
    results: dict = {}
    for r in doc["runs"]:
        results.setdefault(r["key"], []).append(r)
    ns = argparse.Namespace(batch=a["batch"], table_factor=a["table_factor"], lars_factor=a["grid_factor"],
                            train_subset=a["train_subset"], model=a["model"], width=a["width"],
                            image_size=a["image_size"], epochs=a["epochs"],
                            err_label="test top-1 error % (final epoch, read once)")
    return fashion_plots(cells, results, stats, ns, out_dir, name)


def tuned_report(partial: str, final: str, docs: bool = True) -> int:
    with open(partial) as f:
        doc = json.load(f)
    stats, an, md = tuned_render(doc)
    name = os.path.basename(final)[:-len(".json")]
    pngs = tuned_plots(doc, stats, os.path.dirname(final), name) if "baseline" in stats else []
    out = dict(doc, stats=stats, analysis=an, table_md=md,
               core_minutes=sum(r.get("cpu_s", 0.0) for r in doc["runs"]) / 60)
    with open(final, "w") as f:
        json.dump(out, f, indent=1)
    print(md)
    print(f"wrote {final} {' '.join(pngs)}")
    if docs:
        update_all_docs()
    return 0


# ---------------------------------------------------------------------------------------------
# the generated blocks of the docs: each one a function of a committed JSON

def digits_md(doc: dict) -> str:
    """The large_batch (digits) block from bench/results/large_batch.json."""
    from fastar.train.recipe import default_milestones

    a = argparse.Namespace(**doc["args"])
    md = table(doc["results"], a.epochs)
    if doc.get("sweep"):
        md += ("\n\nError vs minibatch (linear scaling + gradual warmup, reference lr 0.1 at "
               f"kn={a.batch}; the paper's Figure 1 in miniature):\n\n" + table(doc["sweep"], a.epochs))
    header = (f"digits (1437 train / 360 val), {a.model} at {a.image_size}x{a.image_size}, "
              f"{a.epochs} epochs (lr /10 at {', '.join(str(m) for m in default_milestones(a.epochs))}), "
              f"warmup {a.warmup_epochs:g} epochs, {a.seeds} seeds, one process (workers simulated by "
              f"accumulation); error = median of the last 5 epochs' val top-1 error. "
              f"Measured by `python bench/large_batch.py` in {doc['wall_s'] / 60:.1f} min.")
    return header + "\n\n" + md


def generated_blocks() -> dict[str, tuple[str, str]]:
    """{block name: (doc path, markdown the committed JSON generates)} for every generated block."""
    res = os.path.join(REPO, "bench", "results")
    out = {}
    p = os.path.join(res, "large_batch.json")
    if os.path.exists(p):
        with open(p) as f:
            out["large_batch"] = (os.path.join(REPO, "docs", "training.md"), digits_md(json.load(f)))
    for name in ("fashion_mnist_study", "fashion_mnist_bf16"):  # their reports store the block as table_md
        p = os.path.join(FASHION_RESULTS, f"{name}.json")
        if os.path.exists(p):
            with open(p) as f:
                out[name] = (os.path.join(REPO, "docs", "training.md"), json.load(f)["table_md"])
    p = os.path.join(FASHION_RESULTS, "fashion_mnist_tuned.json")
    if os.path.exists(p):
        with open(p) as f:
            out["fashion_mnist_tuned"] = (os.path.join(REPO, "docs", "training.md"), tuned_render(json.load(f))[2])
    return out


def read_block(path: str, name: str) -> str | None:
    with open(path) as f:
        text = f.read()
    b, e = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if b not in text or e not in text:
        return None
    return text.split(b, 1)[1].split(e, 1)[0].strip("\n")


def update_all_docs() -> None:
    for name, (path, md) in generated_blocks().items():
        update_docs_between(md, path, f"<!-- {name}:begin -->", f"<!-- {name}:end -->")


if __name__ == "__main__":
    sys.exit(main())
