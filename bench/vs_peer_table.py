"""The table of docs/results.md "Against Open MPI and DeepSpeed": fastar's default against a peer
impl over repeated bench/allreduce_bw.py runs (each run times both in the same invocation).

    python bench/vs_peer_table.py bench/results/allreduce_1x2_vs_mpi_run*.json [--impl fastar:auto:auto]
        [--peer mpi:openmpi]

Prints a markdown table: per size, each run's time of both and the ratio peer time / fastar time
(above 1: fastar takes less time), and the median ratio over the runs; and, where the runs recorded
it, the host's core-to-core round trip before and after each run (about 60-100 ns: the two cores
share a cache; about 500 ns: they do not).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import fmt_bytes as fmt_size  # noqa: E402


def table(paths: list[str], impl: str, peer: str) -> str:
    runs, hosts = [], []
    for p in paths:
        with open(p) as f:
            out = json.load(f)
        runs.append({(r["impl"], r["bytes"]): r["time_us"] for r in out["rows"]})
        ext = out.get("external", {}).get(peer, {})
        hosts.append(out.get("core_round_trip_ns") and dict(out["core_round_trip_ns"],
                                                           state=out.get("host_states", {}).get("workers"),
                                                           same=ext.get("same_state")))
    sizes = sorted({b for run in runs for (i, b) in run if i == impl and (peer, b) in run})
    head = ["size"] + [f"run {k + 1}: {impl} / {peer} µs (ratio)" for k in range(len(runs))] + ["median ratio"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for b in sizes:
        cells, ratios = [fmt_size(b)], []
        for run in runs:
            mine, theirs = run[(impl, b)], run[(peer, b)]
            ratios.append(theirs / mine)
            cells.append(f"{mine:.1f} / {theirs:.1f} ({theirs / mine:.2f})")
        med = statistics.median(ratios)
        cells.append(f"**{med:.2f}**" if med >= 1 else f"**{med:.2f}** (slower)")
        lines.append("| " + " | ".join(cells) + " |")
    if any(hosts):  # allreduce_bw records it from session 8 on
        def cell(h):
            if not (h and h.get("before") and h.get("after")):
                return "-"
            s = f"{h['before']:.0f} / {h['after']:.0f}"
            if h.get("state"):
                s += f" ({h['state']}" + ("" if h.get("same") in (True, None) else "; peer: other placement") + ")"
            return s
        cells = ["fastar's phase: core round trip, ns (before / after)"] + [cell(h) for h in hosts]
        lines.append("| " + " | ".join(cells + [""]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--impl", default="fastar:auto:auto")
    ap.add_argument("--peer", default="mpi:openmpi")
    args = ap.parse_args(argv)
    print(table(args.json, args.impl, args.peer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
