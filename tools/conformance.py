"""PyTorch's distributed conformance suite on the "fastar" backend, against Gloo (`make conformance`).

Runs torch's own torch/testing/_internal/distributed/distributed_test.py (the tests PyTorch's
test/distributed/test_distributed_spawn.py runs, shipped in the wheel) in three modes per world size:

  gloo     torch's Gloo backend: the anchor
  fastar   BACKEND=fastar, fastar declared in the suite's feature table (DDP, subgroups, GPU, plugin)
  standin  BACKEND=gloo, every init_process_group/new_group asked for "gloo" answered with "fastar":
           the tests the suite gates on the name "gloo" (timeouts, sparse tensors, ...) run on fastar

and writes one JSON (every test's status and reason per run, stamped with the git commit) and a
markdown table of the counts and of every difference from Gloo:

    python tools/conformance.py --world-sizes 2,3 --json bench/results/conformance.json
    python tools/conformance.py --world-sizes 2 --modes gloo,standin -k 'all_reduce' --json /tmp/c.json
    python tools/conformance.py --table bench/results/conformance.json     # the table again, from the JSON

Each (mode, world size) runs in its own process (tools/conformance_suite.py), so a crash or a hang
costs one run's remaining tests, not the others. With --merge, runs already in the JSON are kept
unless run again (a long run can be done in pieces). Exit status 1 when fastar fails a test that
Gloo does not fail.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "tools", "conformance_suite.py")
MODES = ("gloo", "fastar", "standin")

# Tests skipped for fastar alone, with the reason (none today). A test listed here is not run in the
# fastar modes and is reported in the table with this reason.
FASTAR_SKIPS: dict[str, str] = {}

# Failures that are not fastar's: (mode, test) -> (text the failure must contain, the reason). A failure
# of that test in that mode with another message is still a fastar-only failure. The table lists these
# apart, with the reason, and they do not count as fastar-only failures (nor in the exit status).
CUSTOM_NAME = ("torch 2.14's ProcessGroup::getBackendName() is the name of its BackendType enum, \"custom\" for "
               "every backend registered with register_backend (torch's own \"fake\" backend too), and DDP's "
               "logger records that name; the backend's own name, pg._get_backend(cpu).name(), is \"fastar\"")
EXPECTED_DIFFERENCES: dict[tuple[str, str], tuple[str, str]] = {
    ("fastar", "test_ddp_logging_data_cpu"): ("'custom' != 'fastar'", CUSTOM_NAME),
    ("standin", "test_ddp_logging_data_cpu"): ("'custom' != 'fastar'", CUSTOM_NAME),
    ("standin", "test_get_backend"): (
        "'fastar' != 'gloo'",
        "the stand-in mode's artifact: the suite expects its BACKEND variable, \"gloo\", while the groups were "
        "asked for \"fastar\" (what a user who changes the string gets, and must get, from get_backend)"),
}


def expected(d: dict) -> str | None:
    """The reason a fastar failure is not fastar's (EXPECTED_DIFFERENCES), or None."""
    want = EXPECTED_DIFFERENCES.get((d["mode"], d["test"]))
    if want is None or d["fastar"] != "failed" or want[0] not in d["full_reason"]:
        return None
    return want[1]


def run_one(mode: str, world_size: int, patterns: list[str], timeout_s: float, log_dir: str) -> dict:
    """One (mode, world size): the suite in its own process; returns its results (partial when it died)."""
    env = dict(os.environ, FASTAR_CONFORMANCE_MODE=mode, WORLD_SIZE=str(world_size),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("BACKEND", None)
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)
    with tempfile.TemporaryDirectory(prefix=f"conformance_{mode}{world_size}_") as tmp:
        env["TEMP_DIR"] = tmp
        out = os.path.join(tmp, "results.json")
        log_path = os.path.join(log_dir, f"conformance_{mode}_{world_size}.log")
        cmd = [sys.executable, SUITE, out, *patterns]
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            try:
                p = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   timeout=timeout_s)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        doc = {"results": {}}
        if os.path.exists(out):
            with open(out) as f:
                doc = json.load(f)
    results = doc["results"]
    for name, reason in FASTAR_SKIPS.items():
        if mode != "gloo" and name in results:
            results[name] = {"status": "skipped", "reason": f"fastar: {reason}", "seconds": 0.0}
    return {"mode": mode, "world_size": world_size, "patterns": patterns, "exit": rc, "start": doc.get("start"),
            "seconds": round(time.monotonic() - t0, 1), "log": log_path, "results": results}


def counts(results: dict) -> dict:
    c = {"passed": 0, "failed": 0, "skipped": 0}
    for r in results.values():
        c[r["status"]] += 1
    return c


def first_line(reason: str) -> str:
    """The line of a failure that says what went wrong (the last exception line), or a skip's reason."""
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln or "assert" in ln.lower():
            return ln[:300]
    return (lines[-1] if lines else "")[:300]


def differences(runs: dict) -> list[dict]:
    """Every test whose outcome on fastar (either mode) differs from Gloo's at the same world size."""
    out = []
    for key, run in sorted(runs.items()):
        if run["mode"] == "gloo":
            continue
        anchor = runs.get(f"gloo/{run['world_size']}")
        if anchor is None:
            continue
        for name, r in sorted(run["results"].items()):
            g = anchor["results"].get(name)
            if g is None or g["status"] == r["status"]:
                continue
            reason = r["reason"] if r["status"] != "passed" else g["reason"]
            out.append({"mode": run["mode"], "world_size": run["world_size"], "test": name,
                        "gloo": g["status"], "fastar": r["status"], "reason": first_line(reason),
                        "full_reason": reason})
    return out


def fastar_only_failures(runs: dict) -> list[dict]:
    return [d for d in differences(runs) if d["fastar"] == "failed" and expected(d) is None]


def table(doc: dict) -> str:
    runs = doc["runs"]
    sizes = sorted({r["world_size"] for r in runs.values()})
    lines = ["| world size | mode | tests | passed | failed | skipped | fastar-only failures |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    only = fastar_only_failures(runs)
    for ws in sizes:
        for mode in MODES:
            run = runs.get(f"{mode}/{ws}")
            if run is None:
                continue
            c = counts(run["results"])
            n_only = "-" if mode == "gloo" else str(sum(1 for d in only if d["mode"] == mode
                                                        and d["world_size"] == ws))
            label = {"gloo": "Gloo (anchor)", "fastar": '"fastar" (its own name)',
                     "standin": 'fastar standing in for "gloo"'}[mode]
            lines.append(f"| {ws} | {label} | {len(run['results'])} | {c['passed']} | {c['failed']} | "
                         f"{c['skipped']} | {n_only} |")
    diffs = differences(runs)
    fails = fastar_only_failures(runs)
    known = [d for d in diffs if d["fastar"] == "failed" and expected(d) is not None]
    if fails:  # one row per test and mode, with the world sizes where it failed
        lines += ["", "Tests that fail on fastar and pass on Gloo:", "",
                  "| mode | test | world sizes | Gloo | fastar | error |", "|---|---|---|---|---|---|"]
        rows: dict = {}
        for d in fails:
            reason = d["reason"].replace("|", "\\|")
            if "Connection closed by peer" in reason:  # the port differs per run
                reason = "Connection closed by peer (the other rank failed first)"
            rows.setdefault((d["mode"], d["test"], d["gloo"], d["fastar"], reason), []).append(str(d["world_size"]))
        for (mode, test, g, f, reason), ws in sorted(rows.items()):
            lines.append(f"| {mode} | `{test}` | {', '.join(ws)} | {g} | {f} | {reason} |")
    if known:  # failures that are not fastar's, with the reason
        lines += ["", "Expected differences (failures that are not fastar's; tools/conformance.py "
                  "EXPECTED_DIFFERENCES):", "", "| mode | test | world sizes | error | why |", "|---|---|---|---|---|"]
        rows = {}
        for d in known:
            rows.setdefault((d["mode"], d["test"], d["reason"].replace("|", "\\|"), expected(d)),
                            []).append(str(d["world_size"]))
        for (mode, test, reason, why), ws in sorted(rows.items()):
            lines.append(f"| {mode} | `{test}` | {', '.join(ws)} | {reason} | {why} |")
    others = [d for d in diffs if d["fastar"] != "failed"]
    if others:  # skipped on fastar, run on Gloo: the suite's own gates, by reason
        lines += ["", "Tests that run on Gloo and are skipped on fastar (the suite's reason; number of tests per "
                  "world size):", "", "| mode | reason | tests |", "|---|---|---:|"]
        by: dict = {}
        for d in others:
            by.setdefault((d["mode"], d["reason"]), set()).add((d["world_size"], d["test"]))
        for (mode, reason), tests in sorted(by.items()):
            per_ws = {}
            for ws, _ in tests:
                per_ws[ws] = per_ws.get(ws, 0) + 1
            lines.append(f"| {mode} | {reason} | {' / '.join(str(per_ws[w]) for w in sorted(per_ws))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-sizes", default="2,3")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("-k", dest="patterns", action="append", default=[],
                    help="run only the tests whose name matches this regex (repeatable)")
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "conformance.json"))
    ap.add_argument("--merge", action="store_true", help="keep the runs already in --json that are not rerun")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per (mode, world size)")
    ap.add_argument("--log-dir", default=tempfile.gettempdir())
    ap.add_argument("--table", metavar="JSON", help="print the table of an existing JSON and exit")
    ap.add_argument("--combine", nargs="+", metavar="JSON",
                    help="write --json from the runs of these JSONs (later files win) and print the table")
    args = ap.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return 0
    if args.combine:
        doc = {"runs": {}, "fastar_skips": FASTAR_SKIPS,
               "expected_differences": {f"{m}/{t}": list(v) for (m, t), v in EXPECTED_DIFFERENCES.items()}}
        for path in args.combine:
            with open(path) as f:
                doc["runs"].update(json.load(f)["runs"])
        doc["stamp"] = {"runs_from": sorted({r["stamp"]["commit"] for r in doc["runs"].values()})}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        print(table(doc))
        return 1 if fastar_only_failures(doc["runs"]) else 0
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: {m!r} is not one of {MODES}")
    sys.path.insert(0, ROOT)
    from bench.stamp import stamp
    doc = {"runs": {}}
    if args.merge and os.path.exists(args.json):
        with open(args.json) as f:
            doc = json.load(f)
    for ws in [int(w) for w in args.world_sizes.split(",") if w]:
        for mode in modes:
            print(f"conformance: {mode} at world size {ws} ...", flush=True)
            ran_on = stamp()  # the tree this run ran on (a long run may be merged from pieces)
            run = run_one(mode, ws, args.patterns, args.timeout, args.log_dir)
            run["stamp"] = ran_on
            c = counts(run["results"])
            print(f"  {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped in {run['seconds']} s "
                  f"(exit {run['exit']}; log {run['log']})", flush=True)
            doc["runs"][f"{mode}/{ws}"] = run
            doc["stamp"] = stamp()
            doc["fastar_skips"] = FASTAR_SKIPS
            doc["expected_differences"] = {f"{m}/{t}": list(v) for (m, t), v in EXPECTED_DIFFERENCES.items()}
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
    print(table(doc))
    return 1 if fastar_only_failures(doc["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
