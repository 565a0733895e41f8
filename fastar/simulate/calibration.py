"""bench/allreduce_bw.py's JSON as the models read it: one alpha-beta pair fitted per impl (or one
for all) on a run's rows, rows made from known parameters (for tests), and several runs of one
configuration merged into their medians."""
from __future__ import annotations

import math

import numpy as np

from .cost_model import HIERARCHIES, KiB, Topo, allreduce_time
from .schedules import ALGORITHMS


def parse_impl(impl: str):
    """'fastar:<hierarchy>:<algorithm>' -> (hierarchy, algorithm); baselines ('torch:gloo',
    'torch:nccl') are modelled as a flat ring, what both use for large buffers."""
    parts = impl.split(":")
    if parts[0] == "fastar" and len(parts) == 3 and parts[1] in HIERARCHIES and parts[2] in ALGORITHMS:
        return parts[1], parts[2]
    return "flat", "ring"


def features(impl, nbytes, world_size, local_size):
    """(steps, bytes on the critical path): the model's time is alpha*steps + beta*bytes exactly
    when every link has the same alpha and beta and gamma is folded into beta; unpipelined."""
    h, a = parse_impl(impl)
    L = max(1, local_size)
    unit = lambda al, be: Topo(world_size // L, L, L, al, be, 0.0, al, be, 0.0)
    return (allreduce_time(nbytes, h, a, unit(1.0, 0.0), pipelined=False),
            allreduce_time(nbytes, h, a, unit(0.0, 1.0), pipelined=False))


def _fit(X, y):
    """Least squares of relative error (rows weighted by 1/y), alpha and beta kept >= 0."""
    w = 1 / y
    best = None
    for cols in ([0, 1], [0], [1]):
        coef = np.zeros(2)
        coef[cols] = np.linalg.lstsq(X[:, cols] * w[:, None], y * w, rcond=None)[0]
        if (coef >= 0).all():
            err = float(np.sum(((X @ coef - y) * w) ** 2))
            if best is None or err < best[0]:
                best = (err, coef)
    return best[1]


def calibrate(bench: dict, shared=False, min_bytes=256 * KiB):
    """Fit alpha (s per step) and beta (s per byte) per impl (or one pair for all), predict every row."""
    W, L = int(bench["world_size"]), int(bench.get("local_size") or 1)
    rows = [r for r in bench["rows"] if r.get("time_us", 0) > 0]
    X = np.array([features(r["impl"], r["bytes"], W, L) for r in rows], float)
    y = np.array([r["time_us"] * 1e-6 for r in rows])
    impls = sorted({r["impl"] for r in rows})
    groups = {"*": np.arange(len(rows))} if shared else \
        {i: np.array([k for k, r in enumerate(rows) if r["impl"] == i]) for i in impls}
    fits, pred = {}, np.zeros(len(rows))
    for key, idx in groups.items():
        alpha, beta = _fit(X[idx], y[idx])
        pred[idx] = X[idx] @ np.array([alpha, beta])
        fits[key] = {"alpha_us": alpha * 1e6, "beta_s_per_byte": beta,
                     "GBps": (1 / beta / 1e9) if beta > 0 else math.inf}
    out_rows, max_err = [], {}
    for k, r in enumerate(rows):
        err = float(pred[k] / y[k] - 1)
        out_rows.append({"impl": r["impl"], "bytes": r["bytes"], "time_us": r["time_us"],
                         "pred_us": float(pred[k] * 1e6), "rel_err": err})
        if r["bytes"] >= min_bytes:
            for key in (r["impl"], "all"):
                max_err[key] = max(max_err.get(key, 0.0), abs(err))
    return {"world_size": W, "local_size": L, "shared": shared, "fits": fits, "rows": out_rows,
            "max_rel_err_ge_256KiB": max_err}


def synthetic_bench(alpha_beta: dict, sizes, world_size, local_size, noise=0.0, seed=0):
    """Rows as allreduce_bw.py writes them, from known (alpha s, beta s/B) per impl: for tests."""
    rng = np.random.default_rng(seed)
    rows = []
    for impl, (alpha, beta) in alpha_beta.items():
        for b in sizes:
            s, by = features(impl, b, world_size, local_size)
            t = (alpha * s + beta * by) * (1 + noise * rng.standard_normal())
            rows.append({"impl": impl, "bytes": b, "dtype": "float32", "time_us": t * 1e6,
                         "algbw_GBps": b / t / 1e9, "busbw_GBps": b / t / 1e9 * 2 * (world_size - 1) / world_size,
                         "wrong": 0})
    return {"world_size": world_size, "local_size": local_size, "memcpy_GBps": 0.0, "rows": rows}


def bench_label(bench: dict) -> str:
    """'<nodes>x<local_size>' of an allreduce_bw.py JSON (or of calibrate()'s result)."""
    W, L = int(bench["world_size"]), int(bench.get("local_size") or 1)
    return f"{W // L}x{L}"


def merge_runs(benches):
    """Several runs of one configuration ('<nodes>x<local>') become one: each (impl, bytes) row's time is
    the median over the runs that have it (a single run on this shared host strays by up to ~40% at
    some sizes; the median of three is what the model is fitted to and judged on)."""
    groups = {}
    for b in benches:
        groups.setdefault(bench_label(b), []).append(b)
    out = []
    for label, runs in groups.items():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        times = {}
        for b in runs:
            for r in b["rows"]:
                if r.get("time_us", 0) > 0:
                    times.setdefault((r["impl"], int(r["bytes"])), []).append(float(r["time_us"]))
        rows = [{"impl": i, "bytes": n, "time_us": float(np.median(ts)), "time_us_runs": ts}
                for (i, n), ts in times.items()]
        out.append({**{k: v for k, v in runs[0].items() if k != "rows"}, "runs": len(runs), "rows": rows})
    return out
