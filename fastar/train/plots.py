"""PNG plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lr_curve(schedule, epochs: int, max_points: int = 4000) -> tuple[list[float], list[float]]:
    """(epoch, lr) at every iteration of the schedule (subsampled to at most max_points, keeping
    the iterations where the lr jumps)."""
    total = epochs * schedule.iters_per_epoch
    step = max(1, total // max_points)
    ts = set(range(0, total, step))
    for m in schedule.milestones:
        t = int(round(m * schedule.iters_per_epoch))
        ts.update(t2 for t2 in (t - 1, t) if 0 <= t2 < total)
    ts.update({schedule.warmup_iters - 1, schedule.warmup_iters, total - 1} & set(range(total)))
    ts = sorted(ts)
    return [t / schedule.iters_per_epoch for t in ts], [schedule.lr(t) for t in ts]


def plot_run(out: str, schedule, epochs: int, history: list[dict]) -> list[str]:
    plt = _plt()
    paths = []
    x, y = lr_curve(schedule, epochs)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, y)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(f"lr per iteration ({schedule.warmup} warmup, target {schedule.target_lr:g})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.abspath(os.path.join(out, "lr.png")))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    ep = [r["epoch"] + 1 for r in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    ax1.plot(ep, [r["train_loss"] for r in history], label="train loss", color="tab:blue")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ev = [(r["epoch"] + 1, r["val_top1_err"]) for r in history if "val_top1_err" in r]
    if ev:
        ax2.plot([e for e, _ in ev], [v for _, v in ev], label="val top-1 error", color="tab:red")
    ax2.set_ylabel("val top-1 error (%)", color="tab:red")
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(os.path.abspath(os.path.join(out, "curves.png")))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_comparison(runs: dict[str, list[list[dict]]], path: str, title: str = "") -> str:
    """runs: label -> a list (one per seed) of per-epoch histories; plots the mean training loss and
    validation error per epoch for each label (the paper's Figure 3 in miniature)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, seeds in runs.items():
        n_ep = min(len(h) for h in seeds)
        ep = list(range(1, n_ep + 1))
        loss = [sum(h[i]["train_loss"] for h in seeds) / len(seeds) for i in range(n_ep)]
        err = [sum(h[i]["val_top1_err"] for h in seeds) / len(seeds) for i in range(n_ep)]
        ax1.plot(ep, loss, label=label)
        ax2.plot(ep, err, label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss (mean over seeds)")
    ax1.set_yscale("log")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("val top-1 error % (mean over seeds)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
