"""What a benchmark or test result ran on: the git commit of the tree (and whether it had uncommitted
changes), the Python/torch/CUDA/driver versions and the device. Every GPU JSON carries one, so that
docs/results.md can say which code a figure came from.

    from bench.stamp import stamp          # {"commit": ..., "dirty": ..., "torch": ..., ...}
    python bench/stamp.py                  # prints the stamp as JSON
    python bench/stamp.py out.json ...     # adds {"stamp": ...} to existing JSON objects, in place
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def git_state() -> dict:
    """commit (full hash; None outside a git checkout), dirty (tracked files changed, or untracked
    files git does not ignore) and the changed paths when dirty."""
    commit = _run(["git", "rev-parse", "HEAD"])
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _run(["git", "status", "--porcelain"]) or ""
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
    except ImportError:
        out["fastar_cuda_built"] = None
    return out


def stamp() -> dict:
    return {**git_state(), **device_state(), "python": platform.python_version(), "host": platform.node(),
            "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


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
        data["stamp"] = s
        with open(p, "w") as f:
            json.dump(data, f, indent=1)
        print(f"{p}: {short(s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
