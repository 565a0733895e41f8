"""fastar.init / fastar.all_reduce: the Python boundary of the compiled communicator.

Input checks live here, once, with messages that say what was wrong and what to do; the C++ side
re-checks cheaply (TORCH_CHECK) but Python users should never see its text for a mistake of theirs.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import secrets
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from . import policy, settings
from . import topology as _topology

log = logging.getLogger("fastar")

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
from .policy import ALGORITHMS, HIERARCHIES  # noqa: E402,F401 - the public choices
# Gradient compression: the dtype on the wire; sums are accumulated in the tensor's own dtype.
COMPRESSIONS = {None: "", "none": "", "fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
# Staged-path chunk sizes tried in turn when /dev/shm cannot hold the arena at the configured one.
SHM_FALLBACK_CHUNKS = (1 << 20, 256 << 10)


def _C():
    from . import _C as ext  # noqa: PLC0415 - imported lazily so pure-Python parts load without it
    return ext


@dataclass
class _State:
    topo: _topology.Topology
    comm: object  # fastar._C.Communicator
    world_group: object
    cross_group: object
    timeout: timedelta
    choice_record: object = None  # a dict, or _LATENCY_PATH (see last_choice)
    group_comms: dict = field(default_factory=dict)
    device_groups: dict = field(default_factory=dict)  # "cuda"/"cpu" -> {"world": group, "desc": str}
    processes: list = field(default_factory=list)  # per rank: (host name, pid, start time) at init

    @property
    def last_choice(self) -> dict:
        """What the last fastar.all_reduce ran and why (fastar.explain()). The latency path leaves a
        marker instead of building this dict on every call; it is built here, when asked."""
        rec = self.choice_record
        if rec is _LATENCY_PATH:
            op = self.comm.last_op()
            algo, hier, why = policy.choose(op["bytes"], "auto", "auto", self.topo.size, self.topo.local_size)
            rec = {"bytes": op["bytes"], "algorithm": op["algorithm"], "hierarchy": op["hierarchy"],
                   "why": why + "; small CPU tensor on one node -> the latency path (shared memory, no header "
                   "exchange: the arena's descriptor check validates the call)",
                   "requested": ("auto", "auto"), "device": "cpu", "compression": ""}
        return rec or {}

    @last_choice.setter
    def last_choice(self, value: dict) -> None:
        self.choice_record = value


_LATENCY_PATH = object()


_state: _State | None = None
_lock = threading.Lock()
_warned: set = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def _require_dist() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fastar: torch.distributed is not initialised. Call torch.distributed.init_process_group('gloo') "
            "(or 'nccl' on GPUs) first, e.g. under torchrun, then fastar.init() or fastar.all_reduce(...).")


def _job_id() -> str:
    raw = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_ADDR", "") + os.environ.get("MASTER_PORT", "")
    return hashlib.sha1(raw.encode()).hexdigest()[:8]


def init(local_size: int | None = None, timeout: timedelta = timedelta(minutes=5)):
    """Creates fastar's own process groups (so its traffic never interleaves with the user's
    collectives) and the node's shared-memory arena. Collective: every rank calls it. Optional:
    all_reduce and wrap call it with defaults. Returns the topology."""
    global _state
    _require_dist()
    with _lock:
        if _state is not None:
            if local_size is not None and local_size != _state.topo.local_size:
                raise RuntimeError("fastar.init was already called with local_size="
                                   f"{_state.topo.local_size}; call fastar.shutdown() first to change it")
            return _state.topo
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=timeout)
        chunk = settings.shm_chunk_bytes()  # a bad FASTAR_SHM_CHUNK_MB fails here, on every rank alike
        topo = _topology.detect(local_size)
        world_ranks = list(range(topo.size))
        world = dist.new_group(ranks=world_ranks, backend="gloo", timeout=timeout)
        cross_groups = []
        for lr in range(topo.local_size):  # every rank creates every group, in the same order
            ranks = topo.rail_ranks(lr)
            cross_groups.append(dist.new_group(ranks=ranks, backend="gloo", timeout=timeout) if len(ranks) > 1 else None)
        cross = cross_groups[topo.local_rank]

        def maker(chunk_bytes):
            def make(shm_name, create):
                return _C().Communicator(
                    rank=topo.rank, size=topo.size, local_rank=topo.local_rank, local_size=topo.local_size,
                    node=topo.node, num_nodes=topo.num_nodes, world=world, world_ranks=world_ranks,
                    cross=cross, cross_ranks=topo.rail_ranks(topo.local_rank) if cross is not None else [],
                    shm_name=shm_name, shm_create=create, shm_chunk_bytes=chunk_bytes,
                    timeout_s=timeout.total_seconds())
            return make
        chunks = [chunk] + [c for c in SHM_FALLBACK_CHUNKS if c < chunk]
        for i, c in enumerate(chunks):
            try:
                comm = node_segment(topo, world, maker(c), "arena", lambda x: x.unlink_shm(), lambda x: x.close())
                break
            except ShmSpaceError as e:
                if i + 1 == len(chunks):
                    raise
                _warn_once(f"shm-chunk:{c}", f"fastar.init: {e}\nFalling back to the staged shared-memory path "
                           f"with {chunks[i + 1] >> 10} KiB chunks (slower for large tensors).")
        processes: list = [None] * topo.size
        dist.all_gather_object(processes, _this_process(), group=world)
        _state = _State(topo=topo, comm=comm, world_group=world, cross_group=cross, timeout=timeout,
                        processes=processes)
        _install_exit_hooks()
        log.debug("fastar.init: %s", topo)
        return topo


class ShmSpaceError(RuntimeError):
    """/dev/shm cannot hold a segment fastar needs (raised on every rank of the job alike)."""


def node_segment(topo: _topology.Topology, group, make, kind: str, unlink, discard=None):
    """Collective: make(name, create) builds an object over a shared-memory segment of this node.
    Local rank 0 creates the segment (O_EXCL, 0600, reserved in full, a random part in its name)
    before the others map it; once all have, unlink(obj) removes the name, before any rank returns,
    so that a crash can leave nothing behind. Without local peers, make("", False).
    Each step's outcome is gathered from every rank, so that a failure on any node (a full
    /dev/shm above all) raises the same error on every rank of the job instead of leaving the
    others to a Gloo timeout; discard(obj) releases what this rank had made. A full /dev/shm
    raises ShmSpaceError, so that callers can fall back to a smaller segment."""
    name = ""
    if topo.local_size > 1 and topo.local_rank == 0:
        _C().remove_stale_shm("fastar_")
        name = (f"/fastar_{os.getuid()}_{_job_id()}_{kind}_n{topo.node}_{secrets.token_hex(4)}"
                f"_ns{_C().pid_namespace()}_p{os.getpid()}")
    names: list = [None] * topo.size
    dist.all_gather_object(names, name, group=group)
    if topo.local_size == 1:
        return make("", False)
    name = names[topo.node * topo.local_size]
    obj = None

    def step(create: bool):
        nonlocal obj
        err = None
        if (topo.local_rank == 0) == create:
            try:
                obj = make(name, create)
            except RuntimeError as e:
                err = str(e)
        errors: list = [None] * topo.size
        dist.all_gather_object(errors, err, group=group)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            if obj is not None and discard is not None:
                discard(obj)
            r, e = failed[0]
            cls = ShmSpaceError if "/dev/shm is too small" in e else RuntimeError
            where = "this rank" if r == topo.rank else f"rank {r} (node {r // topo.local_size})"
            raise cls(f"fastar: the node's shared-memory segment ({kind}) could not be set up on {where}: {e}")
    step(True)
    step(False)
    unlink(obj)  # a no-op except on the creator
    dist.barrier(group=group)
    return obj


def _install_exit_hooks() -> None:
    """fastar's threads and retained Gloo works must be released before torch destroys its process
    groups and before the interpreter finalizes: scripts end with dist.destroy_process_group() and
    often without fastar.shutdown(). An atexit handler and a wrapper around
    torch.distributed.destroy_process_group call fastar.shutdown() first."""
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(shutdown)
    import torch.distributed.distributed_c10d as c10d  # noqa: PLC0415

    original = c10d.destroy_process_group
    if getattr(original, "_fastar_wrapped", False):
        return

    def destroy_process_group(group=None):
        try:
            if group is None or group is dist.group.WORLD:
                shutdown()  # fastar's groups go with the default one: close what uses them first
            else:
                _forget_group(group)
        except Exception:  # noqa: BLE001 - torch's teardown must go on
            log.exception("fastar: releasing its communicators before destroy_process_group failed")
        return original(group) if group is not None else original()
    destroy_process_group.__doc__ = original.__doc__
    destroy_process_group._fastar_wrapped = True
    c10d.destroy_process_group = destroy_process_group
    dist.destroy_process_group = destroy_process_group


_hooks_installed = False


def _forget_group(group) -> None:
    """Closes the communicator fastar made over a user's group that is being destroyed."""
    st = _state
    if st is None:
        return
    name = dist.distributed_c10d._get_process_group_name(group)
    for key in [k for k in st.group_comms if k[0] == name]:
        st.group_comms.pop(key).close()


def shutdown() -> None:
    """Closes fastar's communicator (not torch.distributed). fastar.init may be called again.
    Call it before dist.destroy_process_group(), which shuts down the process groups that the
    communicator's threads use."""
    global _state
    with _lock:
        if _state is not None:
            _state.comm.close()
            for c in _state.group_comms.values():
                c.close()
            _state = None


def is_initialized() -> bool:
    return _state is not None


def get_state() -> _State:
    if _state is None:
        init()
    return _state


def set_timeout(timeout: timedelta) -> None:
    """The timeout of every fastar wait from now on, queued work and fastar.wrap's buckets included."""
    if isinstance(timeout, (int, float)):
        timeout = timedelta(seconds=timeout)
    st = get_state()
    st.timeout = timeout
    st.comm.set_timeout(timeout.total_seconds())
    for c in st.group_comms.values():
        c.set_timeout(timeout.total_seconds())


def choose(nbytes: int, algorithm: str, hierarchy: str, topo: _topology.Topology) -> tuple[str, str, str]:
    """Resolves "auto" (fastar.policy.choose) for this job's topology and says why."""
    return policy.choose(nbytes, algorithm, hierarchy, topo.size, topo.local_size)


_REDUCE_OPS = {"sum": False, "avg": True, "mean": True}
# op -> avg, for the latency path (anything else takes the general path and its checks)
_FAST_OPS = {"sum": False, "avg": True, "mean": True, "SUM": False, "AVG": True,
             dist.ReduceOp.SUM: False, dist.ReduceOp.AVG: True}


def _parse_op(op):
    if isinstance(op, str):
        key = op.lower()
        if key in _REDUCE_OPS:
            return _REDUCE_OPS[key]
        raise ValueError(f"fastar.all_reduce: op={op!r} is not supported; use 'sum' or 'avg' "
                         "(or torch.distributed.all_reduce for max/min/product)")
    if op == dist.ReduceOp.SUM:
        return False
    if op == dist.ReduceOp.AVG:
        return True
    return None  # another ReduceOp: fall back


def check_tensor(tensor, where: str = "fastar.all_reduce") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{where}: the tensor is {tensor.layout} (sparse); fastar reduces dense tensors: "
                         "call .to_dense() first, or use torch.distributed.all_reduce for sparse ones")
    if not tensor.is_contiguous():
        raise ValueError(f"{where}: the tensor is not contiguous (shape {tuple(tensor.shape)}, strides "
                         f"{tensor.stride()}); reduce a contiguous tensor (t = t.contiguous(), then copy back)")


_ERR_KEY = "fastar/error/{}"
# How the communicator's errors begin once it has failed (csrc/torch/communicator.cpp)
EARLIER_FAILURE = "fastar: an earlier collective failed"


def _store_call(fn, seconds: float = 2.0):
    """Runs a store operation on a daemon thread, bounded: the store may live in a dead process."""
    out: list = []

    def call():
        try:
            out.append(fn())
        except Exception:  # noqa: BLE001 - a dead store is an answer too: nothing
            pass
    th = threading.Thread(target=call, daemon=True)
    th.start()
    th.join(seconds)
    return out[0] if out else None


def _start_time(pid: int):
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie has exited
    except (OSError, IndexError, ValueError):
        return None


def _this_process():
    return socket.gethostname(), os.getpid(), _start_time(os.getpid())


def _exited_peers() -> list[tuple[int, int]]:
    """(rank, pid) of the ranks on this host whose process has exited since fastar.init: a collective
    that breaks cannot say which member broke it; a dead process on this host is the likely cause."""
    return [(r, pid) for r, pid, started in _same_host_peers()
            if started is not None and _start_time(pid) != started]


def _same_host_peers() -> list[tuple[int, int, int | None]]:
    """(rank, pid, start time at fastar.init) of the other ranks on this host."""
    st = _state
    if st is None or not st.processes:
        return []
    host = socket.gethostname()
    return [(r, proc[1], proc[2]) for r, proc in enumerate(st.processes)
            if r != st.topo.rank and proc and proc[0] == host]


def _exited_peers_settled(settle_s: float = 1.0) -> list[tuple[int, int]]:
    """_exited_peers, asked again for up to settle_s while it finds none. A killed process closes
    its sockets before the kernel marks it exited: the peer that saw the connection reset (and the
    ranks it woke) can look at /proc inside that window and still see the process running."""
    same_host = bool(_same_host_peers())
    gone = _exited_peers()
    deadline = time.monotonic() + settle_s
    while same_host and not gone and time.monotonic() < deadline:
        time.sleep(0.02)
        gone = _exited_peers()
    return gone


def _exchange_reports(msg: str) -> list[tuple[int, str]]:
    """Publishes this rank's error in the job's store; returns the errors other ranks published."""
    rank, size = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    _store_call(lambda: store.set(_ERR_KEY.format(rank), msg[:4000]))

    def others():
        found = []
        for r in range(size):
            k = _ERR_KEY.format(r)
            if r != rank and store.check([k]):
                found.append((r, store.get(k).decode(errors="replace")))
        return found
    return _store_call(others) or []


def _with_cause(err: BaseException) -> BaseException:
    """A rank whose peer failed only sees that peer go away; the rank that saw the real cause (the
    dead or disagreeing rank) published it in the job's store, and a dead process on this host is
    visible directly. Adds both to this rank's error and publishes this one, so that every rank's
    error names the rank that failed."""
    msg = str(err)
    if msg.startswith(EARLIER_FAILURE):
        return err  # an echo of the first error, which was annotated when it was raised
    try:
        gone = _exited_peers_settled()
        # Without torchrun's agent (which hosts the store itself), the store lived in rank 0's
        # process: asking a dead one would only print torch's connection errors.
        store_gone = any(r == 0 for r, _ in gone) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        reports = [] if store_gone else _exchange_reports(msg)
    except Exception:  # noqa: BLE001 - the original error matters more than its annotation
        return err
    if not reports and not gone:
        return err
    lines = [msg]
    lines += [f"rank {r} (pid {pid} on this host) has exited since fastar.init: the likely cause."
              for r, pid in gone]
    if reports:
        lines.append("Errors reported by other ranks (the first cause is usually among them):")
        lines += [f"  rank {r}: {m.splitlines()[0] if m else ''}" for r, m in reports]
    return RuntimeError("\n".join(lines))


def _reraise(e: RuntimeError):
    new = _with_cause(e)
    if new is e:
        raise e
    raise new from e


class Work:
    """Handle of an asynchronous fastar.all_reduce, like torch.distributed's Work."""

    def __init__(self, native, tensor, timeout_s: float):
        self._native, self._tensor, self._timeout = native, tensor, timeout_s

    def wait(self, timeout: timedelta | None = None) -> bool:
        t = timeout.total_seconds() if timeout is not None else self._timeout
        try:
            self._native.wait(t)
        except RuntimeError as e:
            _reraise(e)
        return True

    def is_completed(self) -> bool:
        return self._native.is_completed()

    def result(self):
        return [self._tensor]


class _DoneWork:
    def __init__(self, tensor, inner=None):
        self._tensor, self._inner = tensor, inner

    def wait(self, timeout=None) -> bool:
        if self._inner is not None:
            self._inner.wait()
        return True

    def is_completed(self) -> bool:
        return self._inner is None or self._inner.is_completed()

    def result(self):
        return [self._tensor]


def nothing_to_compress(wire: str, device_type: str, topo: _topology.Topology, hierarchy: str) -> bool:
    return policy.nothing_to_compress(wire, device_type, topo.size, topo.num_nodes, hierarchy)


def parse_compression(compression, where: str = "fastar.all_reduce") -> str:
    key = compression.lower() if isinstance(compression, str) else compression
    if key not in COMPRESSIONS:
        raise ValueError(f"{where}: compression={compression!r}; expected None, 'fp16' or 'bf16'")
    return COMPRESSIONS[key]


def _backend_of(group) -> str:
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # noqa: BLE001
        return ""


def _check_cuda_path(device: torch.device) -> None:
    """CUDA tensors need fastar's CUDA build and torch's NCCL: a clear error otherwise."""
    if not _C().cuda_built():
        raise RuntimeError(f"fastar: the tensor is on {device}, but this fastar build has no CUDA support; "
                           "rebuild it where a CUDA toolkit is found (FASTAR_CUDA=1 pip install "
                           "--no-build-isolation -e .) or move the tensor to the CPU")
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise RuntimeError(f"fastar: the tensor is on {device}, but NCCL is not available in this torch "
                           "build, and fastar's GPU path moves CUDA tensors over NCCL")


def ensure_device_groups(st: _State, device: torch.device) -> None:
    """Collective on first use: fastar's process groups for the TensorAllreduce path on `device`'s
    type: NCCL groups (world, each node's local ranks, each rail) for CUDA tensors; Gloo groups for
    CPU tensors sent compressed. Every rank creates every group, in the same order."""
    kind = device.type
    if kind in st.device_groups:
        return
    topo, timeout = st.topo, st.timeout
    if kind == "cuda":
        _check_cuda_path(device)
        backend = "nccl"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"fastar: tensors on {device} are not supported; use CPU or CUDA tensors")
    if kind == "cuda":
        world = dist.new_group(ranks=list(range(topo.size)), backend=backend, timeout=timeout)
        rails = [dist.new_group(ranks=topo.rail_ranks(lr), backend=backend, timeout=timeout)
                 if topo.num_nodes > 1 else None for lr in range(topo.local_size)]
        cross = rails[topo.local_rank]
    else:
        world, cross = st.world_group, st.cross_group
    local = None
    if topo.local_size > 1:
        locals_ = [dist.new_group(ranks=topo.node_ranks(n), backend=backend, timeout=timeout)
                   for n in range(topo.num_nodes)]
        local = locals_[topo.node]
    if kind == "cuda":
        # NCCL makes a communicator on a group's first collective, which every member must join:
        # do it now, together, so that later batched sends and receives find it ready.
        with torch.cuda.device(device):
            for g in (world, local, cross):
                if g is not None:
                    dist.all_reduce(torch.zeros(1, device=device), group=g)
            torch.cuda.synchronize(device)
    st.comm.set_tensor_groups(kind, world, local, cross, list(range(topo.size)),
                              topo.rail_ranks(topo.local_rank) if cross is not None else [])
    st.device_groups[kind] = {
        "world": world,
        "desc": f"{backend} groups: world {topo.size}, local {topo.local_size if local else '-'}, "
                f"rails {topo.num_nodes if cross is not None else '-'}"}


def all_reduce(tensor, op="sum", group=None, algorithm="auto", hierarchy="auto", async_op=False, validate=True,
               compression=None):
    """In-place allreduce of `tensor` across ranks, like torch.distributed.all_reduce.

    op: "sum" or "avg" (or dist.ReduceOp.SUM / AVG). algorithm: "auto" | "halving_doubling" | "ring".
    hierarchy: "auto" | "flat" | "leader" | "rail". validate: exchange a small header first so that
    ranks passing different shapes or dtypes get an error instead of a wrong result.
    compression: None | "fp16" | "bf16": the dtype of the data on the wire between nodes (sums stay in
    the tensor's dtype; the result is rounded to the wire dtype, identically on every rank).
    CUDA tensors go over NCCL groups fastar creates on first use, ordered on fastar's own CUDA
    stream against the caller's stream (the call returns without waiting for the GPU, like NCCL).
    """
    st = _state
    if st is not None and group is None and algorithm == "auto" and hierarchy == "auto" and not async_op \
            and compression is None and isinstance(tensor, torch.Tensor):
        # The latency path: the C++ side takes the call only if it is a small dense CPU tensor of a
        # supported dtype on one node with nothing queued; otherwise it does nothing and returns
        # False, and the general path below runs it (with its checks and messages).
        try:
            avg = _FAST_OPS.get(op)
        except TypeError:  # an unhashable op
            avg = None
        if avg is not None:
            try:
                if st.comm.allreduce_fast(tensor, avg):
                    st.choice_record = _LATENCY_PATH
                    return None
            except RuntimeError as e:
                _reraise(e)
    _require_dist()
    check_tensor(tensor)
    wire = parse_compression(compression)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"fastar.all_reduce: algorithm={algorithm!r}; expected one of {ALGORITHMS}")
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"fastar.all_reduce: hierarchy={hierarchy!r}; expected one of {HIERARCHIES}")
    avg = _parse_op(op)
    if avg is None or tensor.dtype not in SUPPORTED_DTYPES:
        what = f"op {op}" if avg is None else f"dtype {tensor.dtype}"
        _warn_once(f"fallback:{what}", f"fastar reduces float32/float64/float16/bfloat16 with sum or avg; "
                   f"{what} goes through torch.distributed.all_reduce instead")
        dop = op if avg is None else (dist.ReduceOp.SUM if not avg else dist.ReduceOp.AVG)
        if dop == dist.ReduceOp.AVG and dist.get_backend(group) == "gloo":
            w = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=True)
            w.wait()
            if tensor.is_floating_point():
                tensor.div_(dist.get_world_size(group))
            else:
                tensor.floor_divide_(dist.get_world_size(group))
            return _DoneWork(tensor) if async_op else None
        w = dist.all_reduce(tensor, op=dop, group=group, async_op=async_op)
        return _DoneWork(tensor, w) if async_op else None
    st = get_state()
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"fastar.all_reduce: the tensor is on {tensor.device}; fastar reduces CPU tensors "
                         "(over Gloo and shared memory) and CUDA tensors (over NCCL)")
    if wire and tensor.dtype not in (torch.float32, torch.float64):
        wire = ""  # already a 16-bit dtype: nothing to compress
    comm, topo = st.comm, st.topo
    user_group = group is not None and group is not dist.group.WORLD and dist.get_world_size(group) != topo.size
    if tensor.device.type == "cuda" and group is not None and group is not dist.group.WORLD \
            and "nccl" not in _backend_of(group):
        raise ValueError(f"fastar.all_reduce: the tensor is on {tensor.device} but the group is a CPU-only "
                         f"({_backend_of(group) or 'unknown'}) group; pass an NCCL group "
                         "(dist.new_group(ranks, backend='nccl')) or group=None, or move the tensor to the CPU")
    if user_group:
        comm, topo, hierarchy = _group_comm(st, group, tensor.device, wire), None, "flat"
    elif tensor.device.type == "cuda" or wire:
        ensure_device_groups(st, tensor.device)
    nbytes = tensor.numel() * tensor.element_size()
    if topo is None:
        size = dist.get_world_size(group)
        topo = _topology.Topology(rank=dist.get_rank(group), size=size, local_rank=0, local_size=1,
                                  node=0, num_nodes=size, source="user group")
    algo, hier, why = choose(nbytes, algorithm, hierarchy, topo)
    if not user_group and nothing_to_compress(wire, tensor.device.type, topo, hier):
        wire = ""
        why += "; one node: no network to compress for, summed in shared memory in full precision"
    if tensor.device.type == "cuda" or wire:
        why += f"; {tensor.device.type} tensor" + (f", {wire} on the wire" if wire else "") + \
            " -> torch ops and c10d collectives on fastar's groups"
    st.last_choice = {"bytes": nbytes, "algorithm": algo, "hierarchy": hier, "why": why,
                      "requested": (algorithm, hierarchy), "device": str(tensor.device), "compression": wire}
    if log.isEnabledFor(logging.DEBUG):
        log.debug("fastar.all_reduce %d B: %s:%s (%s)", nbytes, hier, algo, why)
    if async_op:
        return Work(comm.allreduce_async(tensor, algo, hier, avg, validate, wire), tensor,
                    st.timeout.total_seconds() + 30)
    try:
        comm.allreduce(tensor, algo, hier, avg, validate, wire)
    except RuntimeError as e:
        _reraise(e)
    return None


def _group_comm(st: _State, group, device: torch.device, wire: str):
    """A flat communicator over a user's process group (its traffic shares that group)."""
    ranks = dist.get_process_group_ranks(group)
    # Keyed by torch's unique group name: id() of a destroyed group is reused by Python.
    key = (dist.distributed_c10d._get_process_group_name(group), tuple(ranks))
    if key not in st.group_comms:
        r, n = dist.get_rank(group), len(ranks)
        st.group_comms[key] = _C().Communicator(
            rank=r, size=n, local_rank=0, local_size=1, node=r, num_nodes=n, world=group, world_ranks=ranks,
            cross=None, cross_ranks=[], shm_name="", shm_create=False, shm_chunk_bytes=1 << 20,
            timeout_s=st.timeout.total_seconds())
    comm = st.group_comms[key]
    if (device.type == "cuda" or wire) and not comm.has_tensor_groups(device.type):
        if device.type == "cuda":
            _check_cuda_path(device)
        comm.set_tensor_groups(device.type, group, None, None, ranks, [])
    return comm


def explain() -> str:
    """What fastar knows about the job and what it chose for the last allreduce, and why."""
    if _state is None:
        return "fastar is not initialised (fastar.init() or any fastar.all_reduce does it)"
    t = _state.topo
    lines = [f"rank {t.rank} of {t.size}: node {t.node} of {t.num_nodes}, local rank {t.local_rank} of "
             f"{t.local_size} (local size from {t.source})",
             f"intra-node phase: {'shared memory arena' if _state.comm.has_shm() else 'none (one rank per node)'}"]
    for kind, g in _state.device_groups.items():
        lines.append(f"{kind} tensor path: {g['desc']}")
    if _state.last_choice:
        c = _state.last_choice
        lines.append(f"last allreduce: {c['bytes']} B -> {c['hierarchy']}:{c['algorithm']} because {c['why']}")
    return "\n".join(lines)
