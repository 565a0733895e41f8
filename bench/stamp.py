"""What a benchmark or test result ran on: the git commit of the tree (and whether it had uncommitted
changes), the Python/torch/CUDA/driver versions, the device, the host (name, cores, CPU model, load)
and, for CPU runs, a cache line's round trip between two cores (the host's placement of its cores).
Every JSON the bench scripts write carries one under "stamp" (write_result), so that the docs can
say which code a figure came from; python_tests/test_results_manifest.py checks every file under
bench/results for it.

    from bench.stamp import write_result   # write_result(out, path, cpu=True): out + {"stamp": ...}
    python bench/stamp.py                  # prints the stamp as JSON
    python bench/stamp.py out.json ...     # adds {"stamp": ...} to JSON objects another tool has just
                                           # written (never to an old result: the stamp is today's tree)
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], strip: bool = True) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    return p.stdout.strip() if strip else p.stdout


def git_state() -> dict:
    """commit (full hash; None outside a git checkout), dirty (tracked files changed, or untracked
    files git does not ignore) and the changed paths when dirty."""
    commit = _run(["git", "rev-parse", "HEAD"])
    if commit is None:
        return {"commit": None, "dirty": None}
    # not stripped: each line is "XY path", and X is a space for a change not yet staged
    status = _run(["git", "status", "--porcelain"], strip=False) or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    out = {"commit": commit, "commit_date": _run(["git", "show", "-s", "--format=%cI", "HEAD"]),
           "dirty": bool(changed)}
    if changed:
        out["changed"] = changed[:50]
    return out


def device_state() -> dict:
    """torch, its CUDA, the driver and the device (None where there is no GPU)."""
    import torch
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "device": None, "device_count": 0,
           "driver": None, "capability": None}
    if torch.cuda.is_available():
        out["device_count"] = torch.cuda.device_count()
        out["device"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi:
        out["driver"] = smi.splitlines()[0].strip()
    try:
        import fastar._C as C
        out["fastar_cuda_built"] = bool(C.cuda_built())
        out["fastar_ext_built"] = datetime.datetime.fromtimestamp(
            os.path.getmtime(C.__file__), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ImportError:
        out["fastar_cuda_built"] = None
    return out


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def host_facts() -> dict:
    """The host: name, cores (all, and the ones this process may run on), CPU model, OS, load."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)),
            "cpu_model": _cpu_model(), "platform": platform.platform(), "loadavg": load}


def core_round_trip_ns() -> float | None:
    """A cache line's round trip between the first two cores this process may run on (ns), or None
    with fewer than two (or without fastar._C). This host moves its two vCPUs between a placement
    where they share a cache (about 60-100 ns) and one where they do not (about 500 ns): every flag
    and slot line fastar (and any shared-memory collective) passes between ranks costs that much
    more in the second."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    try:
        from fastar import _C  # noqa: PLC0415
        probe = _C.core_round_trip_ns
    except (ImportError, AttributeError):
        return None
    ns = probe(cpus[0], cpus[1], 100000)
    return round(ns, 1) if ns >= 0 else None


def stamp(cpu: bool = False) -> dict:
    """The stamp of a result measured now; cpu: a CPU run, with the core round trip."""
    out = {**git_state(), **device_state(), **host_facts(), "python": platform.python_version(),
           "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if cpu:
        out["core_round_trip_ns"] = core_round_trip_ns()
    return out


def write_result(out: dict, path: str, cpu: bool = True) -> dict:
    """The one writer of the bench scripts' JSON: out with {"stamp": stamp(cpu)} added (an existing
    "stamp" is kept: gpu_bench stamps before it measures), indented, folders made. Returns the
    object written."""
    out = dict(out)
    out.setdefault("stamp", stamp(cpu=cpu))
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def short(s: dict) -> str:
    """One line for a table or a log: commit[+dirty], torch/CUDA/driver, device."""
    commit = (s.get("commit") or "no-git")[:10] + ("+dirty" if s.get("dirty") else "")
    return (f"commit {commit}, torch {s.get('torch')} (CUDA {s.get('torch_cuda')}), driver {s.get('driver')}, "
            f"{s.get('device') or 'no GPU'}")


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    s = stamp()
    if not paths:
        print(json.dumps(s, indent=1))
        return 0
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        if "stamp" in data:
            raise SystemExit(f"{p} has a stamp already")
        data["stamp"] = dict(s, added_after_the_run=True)
        with open(p, "w") as f:
            json.dump(data, f, indent=1)
        print(f"{p}: {short(s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
