"""Chrome trace (Perfetto, chrome://tracing) export of fastar's communication records, like
Horovod's timeline: one row per rank for backward, one for the buckets' allreduces.

    stats = [model.comm_stats() for each iteration]         # fastar.wrap's FastarModule
    fastar.trace.export_chrome_trace(stats, "comm.json")    # open in https://ui.perfetto.dev

    fastar.trace.export_chrome_trace(fastar.backend.get_backend().records(), "backend.json")
"""
from __future__ import annotations

import json
import os

_GAP_US = 1000.0  # between consecutive iterations laid end to end (comm_stats times are per iteration)


def _us(seconds: float) -> float:
    return seconds * 1e6


def chrome_trace_events(stats_list, rank: int = 0) -> list[dict]:
    """Trace events for one rank. stats_list holds FastarModule.comm_stats() dicts (times relative
    to each iteration's first gradient: iterations are laid end to end) and/or backend records
    (dicts with name, bytes, plan, start_s, end_s on one steady clock)."""
    if isinstance(stats_list, dict):
        stats_list = [stats_list]
    events: list[dict] = [
        {"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": f"rank {rank}"}},
        {"name": "thread_name", "ph": "M", "pid": rank, "tid": 0, "args": {"name": "backward"}},
        {"name": "thread_name", "ph": "M", "pid": rank, "tid": 1, "args": {"name": "fastar allreduce"}},
    ]
    offset = 0.0
    records = [s for s in stats_list if "start_s" in s and "buckets" not in s]
    base = min((r["start_s"] for r in records), default=0.0)
    for r in records:
        events.append({"name": r.get("name", "allreduce"), "ph": "X", "ts": _us(r["start_s"] - base),
                       "dur": max(0.0, _us(r["end_s"] - r["start_s"])), "pid": rank, "tid": 1,
                       "args": {"bytes": r.get("bytes"), "plan": r.get("plan")}})
        offset = max(offset, _us(r["end_s"] - base) + _GAP_US)
    for st in stats_list:
        if "buckets" not in st:
            continue
        it = st.get("iteration")
        end = max([st.get("backward_s", 0.0)] + [b["end_s"] for b in st["buckets"]])
        events.append({"name": f"backward (iteration {it})", "ph": "X", "ts": offset,
                       "dur": _us(st.get("backward_s", 0.0)), "pid": rank, "tid": 0,
                       "args": {"comm_s": st.get("comm_s"), "overlap": st.get("overlap")}})
        for i, b in enumerate(st["buckets"]):
            params = st.get("bucket_params") or []
            events.append({"name": f"bucket {i} allreduce {b['bytes']} B", "ph": "X",
                           "ts": offset + _us(b["start_s"]), "dur": max(0.0, _us(b["end_s"] - b["start_s"])),
                           "pid": rank, "tid": 1,
                           "args": {"bytes": b["bytes"], "algorithm": b.get("algorithm"), "iteration": it,
                                    "ready_s": b["ready_s"], "wait_before_start_s": b["start_s"] - b["ready_s"],
                                    "params": len(params[i]) if i < len(params) else None}})
            events.append({"name": f"bucket {i} ready", "ph": "i", "s": "t", "ts": offset + _us(b["ready_s"]),
                           "pid": rank, "tid": 0, "args": {"bytes": b["bytes"]}})
        offset += _us(end) + _GAP_US
    return events


def export_chrome_trace(stats_list, path: str | os.PathLike, rank: int | None = None) -> str:
    """Writes {"traceEvents": [...]} to path and returns it. rank: the trace's process id (default:
    torch.distributed's rank, or 0). To merge ranks, gather each rank's chrome_trace_events and
    write their concatenation."""
    if rank is None:
        try:
            import torch.distributed as dist
            rank = dist.get_rank() if dist.is_initialized() else 0
        except Exception:  # noqa: BLE001
            rank = 0
    trace = {"traceEvents": chrome_trace_events(stats_list, rank), "displayTimeUnit": "ms"}
    with open(path, "w") as f:
        json.dump(trace, f)
    return str(path)
