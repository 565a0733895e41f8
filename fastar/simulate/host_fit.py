"""This host as a cluster: bench/allreduce_bw.py's processes of one 2-core machine, loopback TCP,
the shared-memory arena and the cores they all share (HostModel, host_time), fitted on some
configurations' rows and predicting the others (calibrate_host; docs/scaling.md, "Calibration")."""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from .. import policy
from .calibration import bench_label, merge_runs
from .cost_model import KiB
from .schedules import schedule_rounds

# bench/allreduce_bw.py runs every rank as a process of one machine and groups them into "nodes" of
# local_size ranks. Its rows are fitted with the model below, whose parts follow what the code does
# on such a host (an alpha-beta fit per impl, calibration.calibrate(), cannot tell the links apart):
#   tcp: every message of "flat", the inter-node phase of "leader"/"rail", and torch's own Gloo
#        allreduce go through Gloo send/recv over loopback TCP, also between ranks of one "node";
#   shm: the local phases of "leader"/"rail" go through the node's shared-memory arena, in chunks of
#        the arena's size (copy in, sum a 1/L slice of all slots, copy out), each chunk's inter-node
#        phase on a worker thread;
#   cores: all ranks of all "nodes" share the machine's cores (and memory bus), which do every copy
#        and sum, loopback TCP's included. So an allreduce lasts at least its critical path (each rank
#        on a core of its own) and at least the work of all ranks spread over the cores:
#        T = max(T_path, work / cores).

@dataclass(frozen=True)
class HostModel:
    tcp_alpha: float   # s per schedule step over Gloo send/recv
    tcp_beta: float    # s per byte a rank sends plus receives, on its critical path (they take turns)
    tcp_cpu: float     # core-s per byte sent + received (kernel copies on both ends, sums included)
    shm_alpha: float   # s per arena phase (a barrier among the local ranks)
    shm_beta: float    # core-s per buffer byte per rank for copy-in, slice sum and copy-out
    gloo_alpha: float  # s per step of torch.distributed's Gloo allreduce (modelled as a ring)
    cache_ratio: float = 1.0     # TCP's per-byte costs when the ranks' buffers fit in the cache, vs DRAM
    shm_cache_ratio: float = 1.0  # the same for the arena's copies and sums
    cache_bytes: float = 32 << 20  # how much of the ranks' buffers the cache holds (W * nbytes)
    step_cpu: float = 0.0   # core-s a rank spends per TCP step (syscalls, thread wake-ups)
    cores: int = 2
    chunk_bytes: int = 4 << 20   # fastar.settings.shm_chunk_bytes(): the arena's pipeline chunk
    small_bytes: int = 64 << 10  # hierarchical.h: one-phase path for a single small chunk


HOST_PARAMS = ("tcp_alpha", "tcp_beta", "tcp_cpu", "shm_alpha", "shm_beta", "gloo_alpha", "cache_ratio",
               "shm_cache_ratio", "cache_bytes", "step_cpu")


def auto_choice(nbytes, world_size, local_size):
    """(hierarchy, algorithm) that fastar picks for algorithm=hierarchy="auto" (fastar.policy, the
    library's own choice, imported rather than copied)."""
    a, h, _ = policy.choose(int(nbytes), "auto", "auto", world_size, local_size)
    return h, a


def cache_factor(m: HostModel, world_size, nbytes, ratio=None) -> float:
    """Per-byte costs relative to streaming from DRAM: the share of the W buffers of nbytes that
    the cache holds moves at `ratio` (default cache_ratio) times the DRAM cost."""
    hit = min(1.0, m.cache_bytes / max(1.0, world_size * float(nbytes)))
    return 1.0 - (1.0 - min(1.0, m.cache_ratio if ratio is None else ratio)) * hit


@functools.lru_cache(maxsize=None)
def _round_summary(algorithm: str, p: int):
    """Per round of the schedule on p ranks, for a 1-byte buffer: (repeat, ranks taking part, the most
    bytes one rank sends plus receives, bytes sent by all ranks)."""
    out = []
    for src, dst, size, _, repeat in schedule_rounds(algorithm, p, 1.0):
        moved = np.bincount(src, size, p) + np.bincount(dst, size, p)
        out.append((repeat, len(np.union1d(src, dst)), float(moved.max()), float(size.sum())))
    return tuple(out)


def tcp_time(algorithm, p, nbytes, m: HostModel, alpha=None, copies=1, step_cpu=None):
    """(seconds, core-s of work) of a schedule on p ranks over loopback TCP, `copies` such schedules
    running at once on disjoint ranks (rail). Each round lasts at least its critical path (every rank
    on a core of its own; sends and receives take turns, both being CPU copies on loopback) and at
    least the work of all its ranks spread over the cores: step_cpu per rank and step, tcp_cpu per
    byte sent and received. With more ranks than cores the second bound is what makes small
    messages slower (4 ranks: about twice the latency of 2 on this host)."""
    alpha = m.tcp_alpha if alpha is None else alpha
    step_cpu = m.step_cpu if step_cpu is None else step_cpu
    total = work = 0.0
    for repeat, busy, moved, sent in _round_summary(algorithm, p):
        w = (m.tcp_cpu * 2 * sent * nbytes + step_cpu * busy) * copies  # all ranks of all copies
        total += repeat * max(alpha + m.tcp_beta * moved * nbytes, w / m.cores)
        work += repeat * w
    return total, work


def host_time(impl, nbytes, world_size, local_size, m: HostModel) -> float:
    """Seconds for one allreduce row of bench/allreduce_bw.py on this host."""
    W, L = world_size, max(1, local_size)
    N = W // L
    b = float(nbytes)
    extra = 0.0
    f, fs = cache_factor(m, W, b), cache_factor(m, W, b, m.shm_cache_ratio)
    m = replace(m, tcp_beta=m.tcp_beta * f, tcp_cpu=m.tcp_cpu * f, shm_beta=m.shm_beta * fs)
    if impl.startswith("torch:"):  # Gloo's allreduce: a ring over loopback, with its own step latency
        return tcp_time("ring", W, b, m, alpha=m.gloo_alpha, step_cpu=0.0)[0]
    parts = impl.split(":")
    h, a = parts[1], parts[2]
    if h == "auto" or a == "auto":
        h, a = auto_choice(nbytes, W, L)
        if N > 1 or h == "flat":
            extra = m.tcp_alpha  # validate=True: one 32-byte header exchange with the peers first
    if h == "flat" or L == 1 or W == 1:
        return tcp_time(a, W, b, m)[0] + extra
    # leader / rail: the arena's chunks. Per chunk every local rank copies in and sums its slice and
    # copies out on its calling thread; a worker thread runs the inter-node schedule. All W ranks do
    # their local phases at once, on the same cores. hierarchical.h overlaps a chunk's network phase
    # with the next chunk's local phase, but on this host the two compete for the same two cores: at
    # 2x2 a 4 MiB chunk took 3.2-5.1 ms in a run of 16 (64 MiB) and 4.2-6.4 ms alone, so the phases
    # are added, chunk after chunk (the shared-core bound still applies).
    k = max(1, math.ceil(b / m.chunk_bytes))
    c = b / k
    if N == 1 and k == 1 and b <= m.small_bytes:  # one phase: every rank sums all slots itself
        return max(m.shm_alpha + m.shm_beta * b, W * m.shm_beta * b / m.cores)
    local_work = W * m.shm_beta * c
    local = max(2 * m.shm_alpha + m.shm_beta * c, local_work / m.cores)
    if N == 1:  # one node: no network phase, the chunks go one after the other
        return k * local
    if h == "leader":  # the leaders allreduce the whole chunk, one per node
        net, net_work = tcp_time(a, N, c, m)
    else:  # rail: every local rank allreduces its 1/L slice with its peers on the other nodes
        net, net_work = tcp_time(a, N, c / L, m, copies=L)
    # Each chunk also goes from the calling thread to the worker thread and back, and the ranks that
    # wait for it sleep on a flag: one more thread wake-up per chunk, taken to cost what waking a
    # peer for a TCP step costs (an assumption: no separate parameter).
    net += m.tcp_alpha
    return max(k * (local + net), k * (local_work + net_work) / m.cores) + extra


def _host_rows(benches):
    rows = []
    for f, bench in enumerate(benches):
        W, L = int(bench["world_size"]), int(bench.get("local_size") or 1)
        for r in bench["rows"]:
            if r.get("time_us", 0) > 0:
                rows.append({"file": f, "label": bench_label(bench), "impl": r["impl"], "bytes": int(r["bytes"]),
                             "world_size": W, "local_size": L, "time_us": float(r["time_us"]),
                             **({"time_us_runs": r["time_us_runs"]} if "time_us_runs" in r else {})})
    return rows


def _log_err(m: HostModel, rows) -> np.ndarray:
    return np.array([math.log(host_time(r["impl"], r["bytes"], r["world_size"], r["local_size"], m)
                              / (r["time_us"] * 1e-6)) for r in rows])


def _nelder_mead(f, x0, step=0.5, iters=600, tol=1e-10):
    """Minimises f over R^n (here log-parameters): the textbook simplex method, deterministic."""
    n = len(x0)
    pts = [np.array(x0, float)] + [np.array(x0, float) + step * np.eye(n)[i] for i in range(n)]
    vals = [f(x) for x in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        cen = np.mean(pts[:-1], axis=0)
        xr = cen + (cen - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = cen + 2 * (cen - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = cen + 0.5 * (pts[-1] - cen)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best
                pts = [pts[0]] + [pts[0] + 0.5 * (x - pts[0]) for x in pts[1:]]
                vals = [vals[0]] + [f(x) for x in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


# The configurations fitted by default: one node (the arena alone; flat over loopback TCP) and one
# rank per node (TCP alone, 2, 3 and 4 ranks on the 2 cores). Several nodes of several ranks, where
# arena and network phases combine (every leader/rail impl with a network phase), are predicted.
DEFAULT_FIT_LABELS = ("1x2", "2x1", "3x1", "4x1")


def fit_host(rows, cores=2, x0=None) -> HostModel:
    """Least squares of log(predicted / measured) over the rows, every size weighted alike, all the
    HOST_PARAMS at once (Nelder-Mead in log space from a rough start, restarted until it settles)."""
    start = x0 or {"tcp_alpha": 200e-6, "tcp_beta": 1 / 1.5e9, "tcp_cpu": 1 / 6e9, "shm_alpha": 10e-6,
                   "shm_beta": 1 / 5e9, "gloo_alpha": 600e-6, "cache_ratio": 0.6, "shm_cache_ratio": 0.6,
                   "cache_bytes": 8 << 20, "step_cpu": 100e-6}
    base = HostModel(**start, cores=cores)
    used = [k for k in HOST_PARAMS if k != "gloo_alpha" or any(r["impl"].startswith("torch:") for r in rows)]
    if not any(r["local_size"] > 1 and ":flat:" not in r["impl"] and not r["impl"].startswith("torch:")
               for r in rows):
        used = [k for k in used if not k.startswith("shm_")]

    def model_of(x):
        return replace(base, **{k: float(math.exp(min(v, 0.0) if k.endswith("cache_ratio") else v))
                                for k, v in zip(used, x)})

    def loss(x):
        return float(np.sum(_log_err(model_of(x), rows) ** 2))

    x = np.log([getattr(base, k) for k in used])
    best = math.inf
    for _ in range(6):  # restarts: the max() makes the surface piecewise smooth
        x, val = _nelder_mead(loss, x)
        if best - val < 1e-9:
            break
        best = val
    return model_of(x)


def calibrate_host(benches, fit_labels=DEFAULT_FIT_LABELS, min_bytes=256 * KiB, cores=None, fit_min_bytes=None):
    """Fits a HostModel on the rows of the files whose '<nodes>x<local>' label is in fit_labels and
    predicts every row of every file. Returns the parameters, every row with its prediction and
    whether it was fitted ("fit") or predicted ("held_out"), and the largest |relative error| at
    sizes >= min_bytes per group (fit / held_out / all, per label, per impl)."""
    singles = list(benches)
    benches = merge_runs(singles)
    rows = _host_rows(benches)
    fit_min_bytes = min_bytes if fit_min_bytes is None else fit_min_bytes
    if cores is None:
        cores = int(min(b.get("cpus") or 2 for b in benches))
    train = [r for r in rows if r["label"] in fit_labels and r["bytes"] >= fit_min_bytes]
    if not train:
        raise ValueError(f"no rows to fit: no file is one of {fit_labels} (labels: "
                         f"{sorted({r['label'] for r in rows})})")
    m = fit_host(train, cores=cores)
    out, max_err = [], {}
    for r in rows:
        pred = host_time(r["impl"], r["bytes"], r["world_size"], r["local_size"], m)
        err = pred / (r["time_us"] * 1e-6) - 1
        role = "fit" if r["label"] in fit_labels else "held_out"
        out.append({**r, "pred_us": pred * 1e6, "rel_err": err, "role": role})
        if r["bytes"] >= min_bytes:
            for key in ("all", role, f"{r['label']}", f"{r['label']} {r['impl']}"):
                max_err[key] = max(max_err.get(key, 0.0), abs(err))
    # each single run against the model fitted to the medians: how far one run alone strays
    per_run = []
    for b in singles:
        errs = [abs(host_time(r["impl"], r["bytes"], int(b["world_size"]), int(b.get("local_size") or 1), m)
                    / (r["time_us"] * 1e-6) - 1) for r in b["rows"] if r.get("time_us", 0) > 0 and r["bytes"] >= min_bytes]
        per_run.append({"label": bench_label(b), "command": b.get("command", ""), "max_rel_err": max(errs, default=0.0)})
    return {"model": "host", "params": asdict(m), "fit_labels": list(fit_labels), "fit_min_bytes": fit_min_bytes,
            "runs": {lab: sum(bench_label(b) == lab for b in singles) for lab in sorted({bench_label(b) for b in singles})},
            "single_run_max_rel_err": per_run,
            "n_fit_rows": len(train), "labels": sorted({r["label"] for r in rows}), "rows": out,
            "max_rel_err_ge_256KiB": max_err, "min_bytes": min_bytes}
