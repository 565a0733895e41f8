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
"""
from __future__ import annotations

import argparse
import json
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
    if not os.path.exists(path):
        return
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        return
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + md + "\n" + END + tail)


def main(argv=None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
