"""Script exits without fastar.shutdown(), repeated: a 2-rank job that wraps a model, trains three
steps, runs a blocking and an async fastar.all_reduce and then ends, either after
dist.destroy_process_group() (as DDP scripts end) or with nothing at all. Every process must exit
with status 0: before fastar released its threads and Gloo works on exit, 3 of 60 processes died
with SIGABRT ("terminate called without an active exception").

  python bench/exit_stress.py --runs 100 [--local-size 2] [--api fastar|backend] [--json bench/results/exit_stress.json]

Each run alternates the two endings; the JSON holds the exit codes of every process.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import free_port, rank_env  # noqa: E402
from stamp import write_result  # noqa: E402

EXIT_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import fastar
    dist.init_process_group("gloo")
    model = fastar.wrap(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)), bucket_cap_mb=0.01)
    for _ in range(3):
        model(torch.randn(8, 64)).sum().backward()
    fastar.all_reduce(torch.ones(1000))
    fastar.all_reduce(torch.ones(10), async_op=True).wait()
    if sys.argv[1] == "destroy":
        dist.destroy_process_group()
    # the script ends here: no fastar.shutdown()
""")

# The same for a DDP script on the "fastar" torch.distributed backend (no fastar.init at all).
BACKEND_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import fastar
    dist.init_process_group("fastar")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4)))
    for _ in range(3):
        model(torch.randn(8, 64)).sum().backward()
    dist.all_reduce(torch.ones(1000))
    if sys.argv[1] == "destroy":
        dist.destroy_process_group()
""")


def run_exit_script(mode: str, local_size: int = 2, timeout: float = 120, script: str = EXIT_SCRIPT
                    ) -> tuple[list[int], list[str]]:
    """One 2-rank job; returns each rank's exit status (negative: killed by that signal) and the
    tail of the stderr of every rank that did not exit with 0. Each rank is a script of its own
    (python -c), not a common.launch worker: what is tested is how the interpreter exits."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, **rank_env(rank, 2, port, local_size), "PYTHONPATH": REPO}
        procs.append(subprocess.Popen([sys.executable, "-c", script, mode], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    codes, errors = [], []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        codes.append(p.returncode)
        if p.returncode != 0:
            errors.append(err.decode(errors="replace")[-2000:])
    return codes, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100, help="jobs (2 processes each)")
    ap.add_argument("--local-size", type=int, default=2, help="2: one node (shared memory); 1: two nodes")
    ap.add_argument("--api", choices=("fastar", "backend"), default="fastar",
                    help="fastar: fastar.wrap + fastar.all_reduce; backend: DDP on dist.init_process_group('fastar')")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    modes = ["destroy", "plain-exit"]
    codes: dict = {m: [] for m in modes}
    t0 = time.monotonic()
    it = range(args.runs)
    for i in (tqdm(it, desc="exits") if tqdm else it):
        mode = modes[i % 2]
        c, errs = run_exit_script(mode, args.local_size, script=EXIT_SCRIPT if args.api == "fastar" else BACKEND_SCRIPT)
        codes[mode] += c
        for e in errs:
            print(f"--- run {i} ({mode}): abnormal exit ---\n{e}", file=sys.stderr)
    summary = {m: dict(collections.Counter(c)) for m, c in codes.items()}
    abnormal = sum(1 for c in codes.values() for x in c if x != 0)
    out = {"api": args.api, "runs": args.runs, "processes": 2 * args.runs, "local_size": args.local_size,
           "abnormal": abnormal,
           "exit_codes": summary, "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(out))
    if args.json:
        write_result(out, args.json, cpu=True)
    sys.exit(1 if abnormal else 0)


if __name__ == "__main__":
    main()
