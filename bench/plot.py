"""Plotting helpers shared by the benchmarks (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations


def _fmt_bytes(b: float) -> str:
    for unit, div in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if b >= div:
            v = b / div
            return f"{v:g}{unit}"
    return f"{int(b)}"


def plot_allreduce(data: dict, path: str, title: str | None = None) -> str:
    """busbw (left, log x) and time per allreduce (right, log-log) against size, one line per impl,
    from allreduce_bw.py's JSON. torch:* baselines are drawn dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, (ax_bw, ax_t) = plt.subplots(1, 2, figsize=(13, 5))
    for impl in impls:
        pts = sorted((r["bytes"], r["busbw_GBps"], r["time_us"]) for r in rows if r["impl"] == impl)
        xs = [p[0] for p in pts]
        style = dict(ls="--", lw=2.2, color="black") if impl.startswith("torch:") else dict(ls="-", lw=1.4)
        marker = "x" if any(r["wrong"] for r in rows if r["impl"] == impl) else "o"
        ax_bw.plot(xs, [p[1] for p in pts], marker=marker, ms=4, label=impl, **style)
        ax_t.plot(xs, [p[2] for p in pts], marker=marker, ms=4, label=impl, **style)
    mc = data.get("memcpy_GBps")
    if mc:
        ax_bw.axhline(mc, color="grey", ls=":", lw=1)
        ax_bw.annotate(f" memcpy {mc:.1f} GB/s (1 process)", xy=(0.0, mc), xycoords=("axes fraction", "data"),
                       va="bottom", fontsize=8, color="grey")
    for ax in (ax_bw, ax_t):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
        ticks = sorted({r["bytes"] for r in rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([_fmt_bytes(t) for t in ticks], fontsize=8)
    ax_bw.set_yscale("log")
    ax_bw.set_ylabel("bus bandwidth (GB/s), log")
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time per allreduce (us)")
    ax_t.legend(fontsize=7, loc="upper left")
    ws, ls = data.get("world_size"), data.get("local_size")
    fig.suptitle(title or f"allreduce, {ws} processes, local_size {ls} ({data.get('dtype', 'float32')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- markdown tables for docs/results.md

def _fastar_rows(rows, b, prefix="fastar:"):
    return [r for r in rows if r["bytes"] == b and r["impl"].startswith(prefix) and r["impl"] != "fastar:auto:auto"]


def markdown_summary(data: dict) -> str:
    """Per size: Gloo's time, the best fastar impl and its time, time ratio, busbw of both."""
    rows = data["rows"]
    out = ["| size | torch:gloo us | best fastar | fastar us | fastar/gloo time | speedup (gloo/fastar) | "
           "gloo busbw GB/s | fastar busbw GB/s | flat:hd/gloo time | #wrong (all impls) |",
           "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in sorted({r["bytes"] for r in rows}):
        g = next(r for r in rows if r["bytes"] == b and r["impl"] == "torch:gloo")
        fs = _fastar_rows(rows, b)
        best = min(fs, key=lambda r: r["time_us"])
        hd = next((r for r in fs if r["impl"] == "fastar:flat:halving_doubling"), None)
        wrong = sum(r["wrong"] for r in rows if r["bytes"] == b)
        out.append(f"| {_fmt_bytes(b)} | {g['time_us']:.0f} | {best['impl'][7:]} | {best['time_us']:.0f} | "
                   f"{best['time_us'] / g['time_us']:.2f} | {g['time_us'] / best['time_us']:.2f} | {g['busbw_GBps']:.3f} | {best['busbw_GBps']:.3f} | "
                   f"{(hd['time_us'] / g['time_us']) if hd else float('nan'):.2f} | {wrong} |")
    return "\n".join(out)


def markdown_matrix(data: dict) -> str:
    """Time per allreduce (us) of every impl at every size."""
    rows = data["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    short = [i.replace("fastar:", "").replace("halving_doubling", "hd") for i in impls]
    out = ["| size | " + " | ".join(short) + " |", "|---:|" + "---:|" * len(impls)]
    for b in sorted({r["bytes"] for r in rows}):
        cells = []
        for i in impls:
            r = next((r for r in rows if r["bytes"] == b and r["impl"] == i), None)
            cells.append(f"{r['time_us']:.0f}" if r else "")
        out.append(f"| {_fmt_bytes(b)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="plot / tabulate allreduce_bw.py JSON")
    ap.add_argument("json")
    ap.add_argument("--png", help="write the plot here")
    ap.add_argument("--markdown", action="store_true", help="print the docs/results.md tables")
    a = ap.parse_args()
    with open(a.json) as f:
        d = json.load(f)
    if a.png:
        plot_allreduce(d, a.png)
    if a.markdown:
        print(markdown_summary(d))
        print()
        print(markdown_matrix(d))
