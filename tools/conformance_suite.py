"""One configuration of PyTorch's distributed conformance suite (torch's own
torch/testing/_internal/distributed/distributed_test.py), run by tools/conformance.py.

The configuration comes from the environment, read at import (the suite reads BACKEND and WORLD_SIZE at
import too, and every spawned rank imports this module again):

  FASTAR_CONFORMANCE_MODE  gloo     the suite on torch's Gloo: the anchor
                           fastar   BACKEND=fastar: the suite under fastar's own name, with fastar
                                    declared in the suite's feature table for what it has (DDP,
                                    subgroups, CPU and CUDA tensors, a plugin backend)
                           standin  BACKEND=gloo, and every init_process_group / new_group asked for
                                    "gloo" gets "fastar" instead: the suite's Gloo-gated tests
                                    (timeouts, sparse tensors, ...) run on fastar
  WORLD_SIZE               the number of ranks of each test
  FASTAR_CONFORMANCE_START fork (default) or spawn: how each test's ranks start

    python tools/conformance_suite.py OUT.json [NAME_REGEX ...]

runs every test whose name matches one of the regexes (all of them when none is given) and writes,
after each test, {"mode", "world_size", "results": {test: {"status", "reason", "seconds"}}} to OUT.json.
status is "passed", "failed" (an assertion or an error) or "skipped" (with the suite's reason).
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import unittest

MODE = os.environ.setdefault("FASTAR_CONFORMANCE_MODE", "gloo")
if MODE not in ("gloo", "fastar", "standin"):
    raise SystemExit(f"FASTAR_CONFORMANCE_MODE={MODE!r}: expected gloo, fastar or standin")
os.environ["BACKEND"] = "fastar" if MODE == "fastar" else "gloo"
os.environ.setdefault("WORLD_SIZE", "2")
os.environ.setdefault("TEMP_DIR", tempfile.gettempdir())  # replaced per test by the suite's setUp
# spawn: each rank a fresh interpreter, as test_distributed_spawn.py runs it (it imports torch and the
# suite again for every test: ~50 s a test on 2 loaded cores); fork: the ranks are forked from the
# runner (a few seconds a test), as PyTorch's former test_distributed_fork.py ran the same tests.
START = os.environ.setdefault("FASTAR_CONFORMANCE_START", "fork")
if START not in ("fork", "spawn"):
    raise SystemExit(f"FASTAR_CONFORMANCE_START={START!r}: expected fork or spawn")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402
from torch.testing._internal.common_distributed import DistTestCases  # noqa: E402

import fastar  # noqa: E402,F401 - registers the "fastar" backend (in every spawned rank too)

if MODE == "fastar":
    # The suite's feature table names the backends that have each feature; fastar has these.
    for feature in ("gpu", "cuda", "ddp", "subgroup", "plugin"):
        DistTestCases.backend_feature[feature].add("fastar")


def _to_fastar(backend):
    """"gloo" (any spelling, alone or as "cpu:gloo,...") -> the same with "fastar"; anything else as is."""
    if backend is None:
        return None
    text = str(backend)
    new = re.sub(r"(?i)\bgloo\b", "fastar", text)
    return new if new != text else backend


if MODE == "standin":
    def _patch(module, name, backend_pos):
        orig = getattr(module, name)

        def call(*args, **kwargs):
            if "backend" in kwargs:
                kwargs["backend"] = _to_fastar(kwargs["backend"])
            elif len(args) > backend_pos:
                args = list(args)
                args[backend_pos] = _to_fastar(args[backend_pos])
            return orig(*args, **kwargs)
        call.__wrapped__ = orig
        call.__name__ = name
        setattr(module, name, call)
        if getattr(dist, name, None) is orig:
            setattr(dist, name, call)

    _patch(c10d, "init_process_group", 0)  # init_process_group(backend, ...)
    _patch(c10d, "new_group", 2)  # new_group(ranks, timeout, backend, ...)
    _patch(c10d, "_new_group_with_tag", 2)  # (ranks, timeout, backend, ...): new_subgroups and friends

from torch.testing._internal.distributed.distributed_test import (  # noqa: E402
    DistributedTest, TestDistBackend)


class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
    """What PyTorch's test/distributed/test_distributed_spawn.py runs: each test in WORLD_SIZE spawned
    processes."""

    def setUp(self):
        super().setUp()
        if START == "fork":
            self._start_processes(torch.multiprocessing.get_context("fork").Process)
        else:
            self._spawn_processes()


class _Recorder(unittest.TextTestResult):
    def __init__(self, *args, out_path: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_path = out_path
        self.results: dict = {}
        self._t0 = 0.0

    def startTest(self, test):  # noqa: N802 - unittest's name
        self._t0 = time.monotonic()
        super().startTest(test)

    def _put(self, test, status, reason=""):
        name = test.id().rsplit(".", 1)[-1]
        self.results[name] = {"status": status, "reason": reason.strip()[-4000:],
                              "seconds": round(time.monotonic() - self._t0, 2)}
        doc = {"mode": MODE, "world_size": int(os.environ["WORLD_SIZE"]), "start": START,
               "results": self.results}
        tmp = self.out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
        os.replace(tmp, self.out_path)

    def addSuccess(self, test):  # noqa: N802
        super().addSuccess(test)
        self._put(test, "passed")

    def addFailure(self, test, err):  # noqa: N802
        super().addFailure(test, err)
        self._put(test, "failed", self._exc_info_to_string(err, test))

    def addError(self, test, err):  # noqa: N802
        super().addError(test, err)
        self._put(test, "failed", self._exc_info_to_string(err, test))

    def addSkip(self, test, reason):  # noqa: N802
        super().addSkip(test, reason)
        self._put(test, "skipped", reason)

    def addExpectedFailure(self, test, err):  # noqa: N802
        super().addExpectedFailure(test, err)
        self._put(test, "passed", "expected failure")

    def addUnexpectedSuccess(self, test):  # noqa: N802
        super().addUnexpectedSuccess(test)
        self._put(test, "failed", "unexpected success")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out_path, patterns = argv[0], [re.compile(p) for p in argv[1:]]
    names = unittest.TestLoader().getTestCaseNames(TestDistBackendWithSpawn)
    if patterns:
        names = [n for n in names if any(p.search(n) for p in patterns)]
    suite = unittest.TestSuite(TestDistBackendWithSpawn(n) for n in names)
    runner = unittest.TextTestRunner(
        verbosity=2, stream=sys.stderr,
        resultclass=lambda *a, **k: _Recorder(*a, out_path=out_path, **k))
    print(f"conformance: mode={MODE} world_size={os.environ['WORLD_SIZE']} tests={len(names)}", file=sys.stderr)
    runner.run(suite)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
