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
    ax.set_ylabel(f"val top-1 error % (median of last {getattr(a, 'err_last', 5)} epochs)")
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


if __name__ == "__main__":
    sys.exit(main())
