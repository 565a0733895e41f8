"""Where users run fastar (issue 13): a container's small /dev/shm, scripts that end without
fastar.shutdown(), DDP's buffer broadcast, dropped and doubled wrappers, zombie and foreign pids,
bad environment values, an iteration that failed for a missing gradient, subgroups, and segments
that are not fastar's. docs/reliability.md maps each promise to its test here.
"""
from __future__ import annotations

import copy
import gc
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from datetime import timedelta

import pytest
import torch
from torch import nn

from mp_utils import run_workers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fastar_entries() -> list:
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("fastar_"))


# --- /dev/shm too small ------------------------------------------------------------------------

def _big_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 8))  # 32 MiB of weights


def _grads_after_one_step(model, rank):
    torch.manual_seed(100 + rank)
    x = torch.randn(4, 2048)
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _small_shm_worker(rank, n, limit):
    import fastar
    from fastar import _C

    if limit is not None:
        _C._set_shm_reserve_limit(limit)  # as a 64 MiB /dev/shm would refuse the buckets
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastar.init(local_size=n, timeout=timedelta(seconds=30))
        model = fastar.wrap(_big_model(), bucket_cap_mb=8)
    arena = model._engine.has_arena()
    got = _grads_after_one_step(model, rank)
    # the expected average, computed locally from every rank's data
    ref = _big_model()
    want = [torch.zeros_like(p) for p in ref.parameters()]
    for r in range(n):
        ref.zero_grad()
        for w, g in zip(want, _grads_after_one_step(ref, r)):
            w += g / n
    err = max((a - b).abs().max().item() for a, b in zip(got, want))
    return arena, err, [str(w.message) for w in caught]


def test_small_shm_falls_back_for_buckets_with_a_warning():
    """The buckets' segment does not fit (fault injection: reservations above 40 MiB fail): every rank
    warns, keeps its buckets in private memory, and the averaged gradients are still right."""
    before = fastar_entries()
    for arena, err, msgs in run_workers(_small_shm_worker, 2, 40 << 20, timeout=180):
        assert not arena
        assert err < 1e-5
        text = "\n".join(msgs)
        assert "/dev/shm is too small" in text and "--shm-size" in text and "private memory" in text, text
    assert fastar_entries() == before


def _no_shm_at_all_worker(rank, n):
    import fastar
    from fastar import _C

    _C._set_shm_reserve_limit(64 << 10)  # not even the smallest staged arena fits
    t0 = time.monotonic()
    try:
        fastar.init(local_size=n, timeout=timedelta(seconds=30))
    except RuntimeError as e:
        return type(e).__name__, str(e), time.monotonic() - t0
    return None, "", time.monotonic() - t0


def test_shm_too_small_for_anything_is_an_error_on_every_rank():
    before = fastar_entries()
    for kind, msg, took in run_workers(_no_shm_at_all_worker, 2, timeout=120):
        assert kind == "ShmSpaceError", msg
        assert "/dev/shm is too small" in msg and "MiB of /dev/shm is free" in msg and "--shm-size" in msg, msg
        assert took < 30 + 15, took  # within init's timeout (30 s) + 15 s: a fail-fast bound
    assert fastar_entries() == before


CONTAINER_SCRIPT = textwrap.dedent("""
    import os, sys, warnings
    sys.path.insert(0, {tests!r})
    os.environ["FASTAR_SHM_CHUNK_MB"] = "1"
    from mp_utils import run_workers
    from test_user_environments import _small_shm_worker
    res = run_workers(_small_shm_worker, 2, None, timeout=240)
    for arena, err, msgs in res:
        print("RESULT", arena, err, any("/dev/shm is too small" in m for m in msgs))
    print("LEFT", sorted(n for n in os.listdir("/dev/shm") if n.startswith("fastar_")))
""")


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a private mount namespace (CI runs as root); the fault-injection tests cover the rest"
    if not shutil.which("unshare"):
        return "unshare(1) not found"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare --mount is not allowed here: {probe.stderr.decode().strip()}"
    return None


@pytest.mark.skipif(_can_unshare() is not None, reason=str(_can_unshare()))
def test_container_sized_dev_shm_in_a_private_mount_namespace():
    """A real 64 MiB tmpfs on /dev/shm (Docker's default), in a private mount namespace: no SIGBUS,
    the buckets fall back with a warning, the gradients are right and nothing is left behind."""
    script = CONTAINER_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
           f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} -c \"$0\"", script]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    results = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2, p.stdout + p.stderr
    for arena, err, warned in results:
        assert arena == "False" and float(err) < 1e-5 and warned == "True", p.stdout
    assert "LEFT []" in p.stdout, p.stdout


# --- script exit without fastar.shutdown() ---------------------------------------------------------

sys.path.insert(0, os.path.join(REPO, "bench"))
from exit_stress import BACKEND_SCRIPT, EXIT_SCRIPT, run_exit_script  # noqa: E402 - the stress script's jobs


@pytest.mark.parametrize("mode,api", [("destroy", "fastar"), ("plain-exit", "fastar"), ("plain-exit", "backend")])
def test_script_may_end_without_fastar_shutdown(mode, api):
    """bench/exit_stress.py runs this 200 times; here a few: every process exits with 0 (never
    SIGABRT), and nothing is left in /dev/shm. "backend": DDP on dist.init_process_group("fastar")."""
    before = fastar_entries()
    for _ in range(3):
        codes, errors = run_exit_script(mode, script=EXIT_SCRIPT if api == "fastar" else BACKEND_SCRIPT)
        assert codes == [0, 0], errors
    assert fastar_entries() == before


# --- BN buffers as DDP -------------------------------------------------------------------------------

class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


def _buffers_worker(rank, n, impl, broadcast):
    import torch.distributed as dist

    import fastar

    fastar.init(local_size=1, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    net = _BNNet()
    if impl == "ddp":
        model = nn.parallel.DistributedDataParallel(net, **({} if broadcast else {"broadcast_buffers": False}))
    else:
        model = fastar.wrap(net, broadcast_buffers=broadcast)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(6, 3, 8, 8, generator=g) * (1 + rank)  # different statistics per rank
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))  # an eval-style forward after the last step
    state = {k: v.clone() for k, v in net.state_dict().items()}
    dist.barrier()
    return state


@pytest.mark.parametrize("broadcast", [True, False])
def test_wrap_buffers_match_ddp(broadcast):
    """3 ranks with a BatchNorm model: fastar.wrap(broadcast_buffers=...) leaves the same parameters
    and the same BN running statistics as DDP with the same flag (DDP's default is True)."""
    ddp = run_workers(_buffers_worker, 3, "ddp", broadcast, timeout=180)
    ours = run_workers(_buffers_worker, 3, "fastar", broadcast, timeout=180)
    for rank in range(3):
        for k in ddp[rank]:
            a, b = ddp[rank][k].double(), ours[rank][k].double()
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (rank, k, (a - b).abs().max())
    same = torch.equal(ours[0]["bn.running_mean"], ours[1]["bn.running_mean"])
    assert same == broadcast  # per-worker statistics differ when not broadcast


def _train_bn_worker(rank, n):
    """fastar.train's wrap_model (both wrappers) on a model whose BN comes first, so that its running
    statistics depend only on the inputs: each rank trains on its own data, and its statistics must be
    those of a bare BN fed the same batches (a broadcast of rank 0's buffers would overwrite them)."""
    from types import SimpleNamespace

    from fastar.train import loop
    out = {}
    for how in ("fastar", "ddp"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 3))
        args = SimpleNamespace(wrap=how, bucket_mb=None, algorithm=None, hierarchy=None, compression=None)
        model, impl = loop.wrap_model(net, args, n, torch.device("cpu"))
        ref = nn.BatchNorm1d(8)  # the statistics this rank's own batches give
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(4):
            x = torch.randn(16, 8, generator=g) * (rank + 1) + 3 * rank  # ranks' data differ in mean and spread
            y = torch.randint(0, 3, (16,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            ref(x)
        bn = net[0]
        stats = {"mean": bn.running_mean.clone(), "var": bn.running_var.clone(), "ref_mean": ref.running_mean.clone(),
                 "ref_var": ref.running_var.clone(), "weight": net[1].weight.detach().clone(), "impl": impl}
        loop.average_bn_statistics(net)  # before validation and checkpoints: every rank the same model
        stats["avg_mean"], stats["avg_var"] = bn.running_mean.clone(), bn.running_var.clone()
        out[how] = stats
        if how == "fastar":
            import fastar
            fastar.shutdown()
    return out


def test_train_keeps_per_worker_bn():
    """fastar.train promises the paper's per-worker BN (loop.wrap_model, docs/training.md): on 2 workers
    with different data, each worker's running statistics are its own batches' (not rank 0's), while the
    gradients are still averaged (the weights agree); average_bn_statistics then makes them equal."""
    out = run_workers(_train_bn_worker, 2, timeout=180)
    for how, impl in (("fastar", "fastar"), ("ddp", "torch:ddp")):
        got = [o[how] for o in out]
        for r, s in enumerate(got):
            assert s["impl"] == impl, (how, s["impl"])
            torch.testing.assert_close(s["mean"], s["ref_mean"], msg=lambda m: f"{how} rank {r} running_mean: {m}")
            torch.testing.assert_close(s["var"], s["ref_var"], msg=lambda m: f"{how} rank {r} running_var: {m}")
        assert (got[0]["mean"] - got[1]["mean"]).abs().min() > 0.5, (how, got[0]["mean"], got[1]["mean"])
        assert torch.equal(got[0]["weight"], got[1]["weight"]), f"{how}: weights differ: gradients not averaged"
        for r, s in enumerate(got):
            torch.testing.assert_close(s["avg_mean"], (got[0]["mean"] + got[1]["mean"]) / 2)
            torch.testing.assert_close(s["avg_var"], (got[0]["var"] + got[1]["var"]) / 2)


# --- wrapper lifetime ------------------------------------------------------------------------------

def _lifetime_worker(rank, n):
    import fastar

    fastar.init(local_size=1, timeout=timedelta(seconds=5))
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    wrapped = fastar.wrap(model)
    wrapped(torch.randn(3, 8)).sum().backward()
    errors = []
    for target in (model, wrapped):
        try:
            fastar.wrap(target)
        except RuntimeError as e:
            errors.append(str(e))
    del wrapped, target
    gc.collect()
    hooks_left = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    # only rank 1 runs a backward of the bare model: no collective may start (rank 0 would never join
    # it: it would fail after the 5 s timeout), and the gradients are autograd's own, untouched
    bare_err, bare_same = None, None
    if rank == 1:
        model.zero_grad()
        ref = copy.deepcopy(model)  # never wrapped: plain autograd
        x = torch.randn(3, 8)
        try:
            model(x).sum().backward()
        except Exception as e:  # noqa: BLE001 - reported to the parent
            bare_err = f"{type(e).__name__}: {e}"
        ref(x).sum().backward()
        bare_same = all(torch.equal(a.grad, b.grad) for a, b in zip(model.parameters(), ref.parameters()))
    rewrapped = fastar.wrap(model)  # the bare model can be wrapped again, and its communicator is in step
    torch.manual_seed(7)
    x = torch.randn(3, 8) + rank
    rewrapped.zero_grad()
    rewrapped(x).sum().backward()
    return errors, hooks_left, bare_err, bare_same, [p.grad.clone() for p in model.parameters()]


def test_dropped_wrapper_takes_its_hooks_and_double_wrap_is_refused():
    out = run_workers(_lifetime_worker, 2, timeout=120)
    for errors, hooks_left, bare_err, bare_same, _ in out:
        assert len(errors) == 2 and all("already belongs to a fastar.wrap wrapper" in e for e in errors), errors
        assert hooks_left == 0
    assert out[1][2] is None, f"rank 1's backward of the bare model started a collective: {out[1][2]}"
    assert out[1][3] is True, "the bare model's gradients are not autograd's own"
    for a, b in zip(out[0][4], out[1][4]):  # the rewrapped model averaged the two ranks' gradients
        assert torch.equal(a, b)


# --- zombies and pid namespaces --------------------------------------------------------------------

def test_peer_liveness_uses_pid_start_time_and_namespace():
    from fastar import _C

    ns = _C.pid_namespace()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        start = _C._start_ticks(p.pid)
        assert start > 0
        assert _C._peer_alive(p.pid, start, ns)
        assert not _C._peer_alive(p.pid, start + 1, ns)  # a reused pid: another process
        assert _C._peer_alive(p.pid, start, ns + 1)  # another namespace: cannot tell, counts as alive
    finally:
        p.kill()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _C._start_ticks(p.pid) != 0:
        time.sleep(0.05)
    # not reaped yet: a zombie, which kill(pid, 0) would still call alive
    with open(f"/proc/{p.pid}/stat") as f:
        assert f.read().rsplit(")", 1)[1].split()[0] == "Z"
    os.kill(p.pid, 0)
    assert not _C._peer_alive(p.pid, start, ns)
    p.wait()
    assert not _C._peer_alive(p.pid, start, ns)


# --- environment values ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,value", [("FASTAR_SHM_CHUNK_MB", "0"), ("FASTAR_SHM_CHUNK_MB", "-4"),
                                        ("FASTAR_SHM_CHUNK_MB", "four"), ("FASTAR_SHM_CHUNK_MB", "nan"),
                                        ("FASTAR_LOCAL_SIZE", "0"), ("FASTAR_LOCAL_SIZE", "2.5"),
                                        ("FASTAR_TRAIN_WRAP", "horovod"), ("FASTAR_BACKEND_VALIDATE", "yes"),
                                        ("FASTAR_BACKEND_VALIDATE", "2")])
def test_bad_environment_values_are_clear_errors(monkeypatch, name, value):
    from fastar import settings

    monkeypatch.setenv(name, value)
    fn = {"FASTAR_SHM_CHUNK_MB": settings.shm_chunk_bytes, "FASTAR_LOCAL_SIZE": settings.local_size,
          "FASTAR_TRAIN_WRAP": settings.train_wrap, "FASTAR_BACKEND_VALIDATE": settings.backend_validate}[name]
    with pytest.raises(ValueError, match=f"{name}='{value}' is not valid"):
        fn()


def _bad_chunk_worker(rank, n):
    import fastar

    try:
        fastar.init(local_size=n)
    except ValueError as e:
        return str(e)
    return "no error"


def test_zero_chunk_size_fails_init_on_every_rank_not_sigfpe():
    for msg in run_workers(_bad_chunk_worker, 2, env={"FASTAR_SHM_CHUNK_MB": "0"}, timeout=120):
        assert "FASTAR_SHM_CHUNK_MB='0' is not valid" in msg, msg


# --- a failed iteration resets the engine --------------------------------------------------------------

class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x, use_b=True):
        h = self.body(x)
        return self.a(h) + (self.b(h) if use_b else 0)


def _reset_worker(rank, n):
    import fastar

    fastar.init(local_size=n, timeout=timedelta(seconds=30))
    torch.manual_seed(0)
    model = fastar.wrap(_TwoHeads())
    x = torch.full((2, 4), float(rank + 1))
    try:
        model(x, use_b=False).sum().backward()
        first = "no error"
    except RuntimeError as e:
        first = str(e)
    model.zero_grad()
    model(x).sum().backward()  # a full iteration must now work
    grads = [p.grad.clone() for p in model.module.parameters()]
    torch.manual_seed(0)
    ref = _TwoHeads()
    want = [torch.zeros_like(p) for p in ref.parameters()]
    for r in range(n):
        ref.zero_grad()
        ref(torch.full((2, 4), float(r + 1))).sum().backward()
        for w, p in zip(want, ref.parameters()):
            w += p.grad / n
    return first, max((a - b).abs().max().item() for a, b in zip(grads, want))


@pytest.mark.parametrize("n", [1, 2])
def test_missing_gradient_error_leaves_the_engine_usable(n):
    for first, err in run_workers(_reset_worker, n, timeout=120):
        assert "got no gradient in this iteration" in first and "b.weight" in first, first
        assert err < 1e-6


# --- subgroups ---------------------------------------------------------------------------------------

def _subgroup_worker(rank, n):
    import torch.distributed as dist

    import fastar
    from fastar import state

    fastar.init(local_size=1, timeout=timedelta(seconds=30))
    sums = []
    for _ in range(2):
        g = dist.new_group([0, 1])
        t = torch.full((5,), float(rank + 1))
        if rank < 2:
            fastar.all_reduce(t, group=g)
            sums.append(t[0].item())
        dist.destroy_process_group(g)  # its fastar communicator goes with it
        sums.append(len(state.get_state().group_comms))
    return sums


def test_subgroup_communicators_are_keyed_by_group_and_released_with_it():
    res = run_workers(_subgroup_worker, 3, timeout=120)
    assert res[0] == [3.0, 0, 3.0, 0] and res[1] == [3.0, 0, 3.0, 0]
    assert res[2] == [0, 0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: an NCCL-only subgroup with CUDA tensors")
def test_cuda_tensor_on_an_nccl_subgroup():
    def worker(rank, n):  # pragma: no cover - GPU only
        import torch.distributed as dist

        import fastar
        torch.cuda.set_device(rank)
        g = dist.new_group([0, 1], backend="nccl")
        t = torch.full((7,), float(rank + 1), device="cuda")
        fastar.all_reduce(t, group=g)
        return t.cpu().tolist()
    for out in run_workers(worker, 2, timeout=300):
        assert out == [3.0] * 7


# --- segments that are not fastar's ----------------------------------------------------------------------

def _segment_bytes(local_size, chunk):
    # control pages, two buffers of slots and a result area, the latency path's small regions (shm.h)
    return 4096 * local_size + 2 * (local_size + 1) * chunk + 2 * local_size * (17 * 64 + (64 << 10))


@pytest.mark.parametrize("case", ["mode", "magic", "size"])
def test_opening_a_segment_checks_mode_owner_size_and_magic(case):
    from fastar import _C

    name = f"/fastar_test_{os.getpid()}_{case}"
    path = "/dev/shm" + name
    chunk = 64 << 10
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644 if case == "mode" else 0o600)
    try:
        os.fchmod(fd, 0o644 if case == "mode" else 0o600)
        os.ftruncate(fd, _segment_bytes(2, chunk) + (4096 if case == "size" else 0))
        with pytest.raises(RuntimeError) as e:
            _C._open_segment(name, False, 1, 2, chunk)
        want = {"mode": "mode 0600", "magic": "magic word", "size": "wrong size"}[case]
        assert want in str(e.value), str(e.value)
    finally:
        os.close(fd)
        os.unlink(path)


def test_created_segment_is_reserved_and_unlinked():
    """The creating side of the test above: the segment is made, reserved and removed by its owner."""
    from fastar import _C

    _C._open_segment(f"/fastar_test_{os.getpid()}_ok", True, 0, 2, 64 << 10)  # creates, then unlinks
    assert not os.path.exists(f"/dev/shm/fastar_test_{os.getpid()}_ok")
