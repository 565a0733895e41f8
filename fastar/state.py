"""fastar's per-process state: the communicator that fastar.init makes over its own process groups
and the node's arena (or adopts from the "fastar" torch.distributed backend of the default group),
its timeout, and its end (fastar.shutdown, and the hooks that call it before torch tears its process
groups down or the interpreter exits)."""
from __future__ import annotations

import atexit
import logging
import threading
import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from . import policy, settings, topology
from .groups import PlanCache, ShmSpaceError, extension, native_plan, node_segment

log = logging.getLogger("fastar")

# Staged-path chunk sizes tried in turn when /dev/shm cannot hold the arena at the configured one.
SHM_FALLBACK_CHUNKS = (1 << 20, 256 << 10)


def shm_chunks(chunk: int) -> list:
    """The staged chunk sizes a node's arena is tried with, in turn: the configured one, then the
    smaller ones of SHM_FALLBACK_CHUNKS (fastar.init and the "fastar" backend alike)."""
    return [chunk] + [c for c in SHM_FALLBACK_CHUNKS if c < chunk]


def warn_shm_fallback(who: str, err: Exception, chunk: int) -> None:
    """The warning (once per process) of a retry with `chunk`-byte chunks, after /dev/shm could not
    hold the arena with larger ones (err, a ShmSpaceError, says how much was needed and what is free)."""
    warn_once(f"shm-chunk:{who}:{chunk}", f"{who}: {err}\nFalling back to the staged shared-memory path "
              f"with {chunk >> 10} KiB chunks (slower for large tensors).")


@dataclass
class State:
    topo: topology.Topology
    comm: object  # fastar._C.Communicator
    world_group: object  # for torch.distributed calls (broadcasts, object gathers, node_segment)
    inter_group: object  # this rank's rail group (None on one node, or when adopted: see comm_groups)
    timeout: timedelta
    choice_record: object = None  # a dict, or LATENCY_PATH (see last_choice)
    group_comms: dict = field(default_factory=dict)
    device_groups: dict = field(default_factory=dict)  # "cuda"/"cpu" -> {"world": group, "desc": str}
    processes: list = field(default_factory=list)  # per rank: (host name, pid, start time) at init
    # The FastarBackend whose communicator this is (fastar.init adopted the "fastar" default group's):
    # fastar.shutdown() leaves it open, and the backend's shutdown ends this state. None: fastar's own.
    owner: object = None
    # (world, rail) the communicator sends over, when they are not world_group/inter_group (the
    # backend's, which torch.distributed does not know): the CPU tensor path's groups.
    comm_groups: tuple | None = None
    # fastar.all_reduce's fast entry: (the tuning it was made for, the latency limit in bytes, the one
    # latency plan as fastar._C.Plan); remade when policy.set_tuning replaced the tuning.
    fast: tuple = (None, -1, None)
    # The plans of fastar.reduce_scatter_single / all_gather_single on this communicator, by size.
    halves: PlanCache = field(init=False)

    def __post_init__(self) -> None:
        self.halves = PlanCache(lambda: self.node)

    @property
    def node(self) -> policy.Node:
        """What a plan needs to know of this communicator (fastar.policy.plan)."""
        return policy.Node(self.topo.size, self.topo.local_size,
                           self.comm.shm_chunk_bytes() if self.comm.has_shm() else 0, self.comm.single_copy())

    def refresh_fast(self) -> tuple:
        t = policy.tuning()
        limit = policy.latency_limit(self.node, t)
        native = None
        if limit >= 0:
            native = native_plan(policy.plan(0, 1, self.node, t=t))
        self.fast = (t, limit, native)
        return self.fast

    def transport(self) -> tuple:
        """(world, rail): the process groups the communicator sends over."""
        return self.comm_groups or (self.world_group, self.inter_group)

    @property
    def last_choice(self) -> dict:
        """What the last fastar.all_reduce ran and why (fastar.explain()). The latency path leaves a
        marker instead of building this dict on every call; it is built here, when asked."""
        rec = self.choice_record
        if rec is LATENCY_PATH:
            op = self.comm.last_op()
            why = policy.plan(op["bytes"], 1, self.node).why
            rec = {"bytes": op["bytes"], "algorithm": op["algorithm"], "hierarchy": op["hierarchy"],
                   "protocol": op["protocol"], "why": why + "; small CPU tensor on one node -> the latency path "
                   "(shared memory, no header exchange: the arena's descriptor check validates the call)",
                   "requested": ("auto", "auto"), "device": "cpu", "compression": ""}
        return rec or {}

    @last_choice.setter
    def last_choice(self, value: dict) -> None:
        self.choice_record = value


# What fastar.all_reduce's latency path leaves in State.choice_record.
LATENCY_PATH = object()


_state: State | None = None
_lock = threading.Lock()
_warned: set = set()
_hooks_installed = False


def warn_once(key: str, msg: str) -> None:
    """warnings.warn(msg) the first time this process meets `key`, and never again."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def require_dist() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fastar: torch.distributed is not initialised. Call torch.distributed.init_process_group('gloo') "
            "(or 'nccl' on GPUs) first, e.g. under torchrun, then fastar.init() or fastar.all_reduce(...).")


def init(local_size: int | None = None, timeout: timedelta | None = None):
    """Creates fastar's own process groups (so its traffic never interleaves with the user's
    collectives) and the node's shared-memory arena. Collective: every rank calls it. Optional:
    all_reduce and wrap call it with defaults. Returns the topology.

    When the default process group is "fastar" (dist.init_process_group("fastar"), or a CPU half
    "cpu:fastar"), its backend already owns a communicator, Gloo transport and arena for the whole
    job: fastar.init adopts them instead of building a second set (fastar.all_reduce, fastar.wrap
    and the group's dist.* calls then share one communicator, in one submission order), and uses
    the default group itself for its broadcasts. Unless local_size asks for another node size than
    the backend's: then fastar builds its own, as beside any other default group (a log line says
    so). timeout: default 5 minutes; an adopted communicator keeps the group's timeout
    (init_process_group(timeout=...)); fastar.set_timeout changes it for both."""
    global _state
    require_dist()
    with _lock:
        if _state is not None:
            if local_size is not None and local_size != _state.topo.local_size:
                raise RuntimeError("fastar.init was already called with local_size="
                                   f"{_state.topo.local_size}; call fastar.shutdown() first to change it")
            return _state.topo
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=timeout)
        be = _default_fastar_backend()
        if be is not None:
            if local_size is None or local_size == be.topology.local_size:
                _state = _adopt(be, timeout)
                _install_exit_hooks()
                return _state.topo
            log.info("fastar.init(local_size=%d): the \"fastar\" default group's communicator has local_size %d; "
                     "fastar makes its own process groups, arena and communicator beside it", local_size,
                     be.topology.local_size)
        if timeout is None:
            timeout = timedelta(minutes=5)
        chunk = settings.shm_chunk_bytes()  # a bad FASTAR_SHM_CHUNK_MB fails here, on every rank alike
        topo = topology.detect(local_size)
        world_ranks = list(range(topo.size))
        world = dist.new_group(ranks=world_ranks, backend="gloo", timeout=timeout)
        inter_groups = []
        for lr in range(topo.local_size):  # every rank creates every group, in the same order
            ranks = topo.inter_ranks(lr)
            inter_groups.append(dist.new_group(ranks=ranks, backend="gloo", timeout=timeout) if len(ranks) > 1 else None)
        inter = inter_groups[topo.local_rank]

        def maker(chunk_bytes):
            def make(shm_name, create):
                return extension().Communicator(
                    rank=topo.rank, size=topo.size, local_rank=topo.local_rank, local_size=topo.local_size,
                    node=topo.node, num_nodes=topo.num_nodes, world=world, world_ranks=world_ranks,
                    inter=inter, inter_ranks=topo.inter_ranks(topo.local_rank) if inter is not None else [],
                    shm_name=shm_name, shm_create=create, shm_chunk_bytes=chunk_bytes,
                    timeout_s=timeout.total_seconds())
            return make
        chunks = shm_chunks(chunk)
        for i, c in enumerate(chunks):
            try:
                comm = node_segment(topo, world, maker(c), "arena", lambda x: x.unlink_shm(), lambda x: x.close())
                break
            except ShmSpaceError as e:
                if i + 1 == len(chunks):
                    raise
                warn_shm_fallback("fastar.init", e, chunks[i + 1])
        if comm.has_shm():
            comm.probe_single_copy(settings.single_copy())  # the node's ranks together, after all mapped it
        processes: list = [None] * topo.size
        dist.all_gather_object(processes, topology.this_process(), group=world)
        _state = State(topo=topo, comm=comm, world_group=world, inter_group=inter, timeout=timeout,
                       processes=processes)
        _install_exit_hooks()
        log.debug("fastar.init: %s", topo)
        return topo


# The "fastar" backend of the default group, or None: fastar.backend (a layer above this module)
# installs its lookup when it is imported, which `import fastar` does.
_default_backend_lookup = None


def set_default_backend_lookup(lookup) -> None:
    """lookup() -> the default group's open FastarBackend or None (fastar.backend calls this)."""
    global _default_backend_lookup
    _default_backend_lookup = lookup


def _default_fastar_backend():
    """The default group's FastarBackend (its CPU backend), if it is one and still open; else None."""
    return _default_backend_lookup() if _default_backend_lookup is not None else None


def _adopt(be, timeout: timedelta | None) -> State:
    """fastar's state over the backend's communicator: no process group, arena or communicator of its own."""
    if timeout is not None and timeout != be.timeout:
        log.info("fastar.init(timeout=%s): the \"fastar\" default group's communicator keeps the group's "
                 "timeout (%s); fastar.set_timeout changes it for both", timeout, be.timeout)
    world = dist.distributed_c10d._get_default_group()
    processes: list = [None] * be.topology.size
    dist.all_gather_object(processes, topology.this_process(), group=world)
    log.debug("fastar.init: adopted the \"fastar\" default group's communicator: %s", be.topology)
    return State(topo=be.topology, comm=be.communicator, world_group=world, inter_group=None,
                 timeout=be.timeout, processes=processes, owner=be, comm_groups=be.transport_groups)


def backend_closing(be) -> None:
    """The backend `be` shuts down (dist.destroy_process_group, abort, exit): if fastar adopted its
    communicator, fastar's state ends first, so that later fastar calls meet "not initialised"
    (or a new init) rather than a closed communicator."""
    global _state
    with _lock:
        st = _state
        if st is not None and st.owner is be:
            _state = None
            for c in st.group_comms.values():
                c.close()


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
    communicator's threads use. A communicator adopted from the "fastar" default group stays open
    (the backend owns it; destroying the group closes it): only fastar's state is dropped."""
    global _state
    with _lock:
        if _state is not None:
            if _state.owner is None:  # an adopted communicator stays with its backend
                _state.comm.close()
            for c in _state.group_comms.values():
                c.close()
            _state = None


def is_initialized() -> bool:
    return _state is not None


def current() -> State | None:
    """The state if fastar.init has run (and no shutdown since), else None; never initialises."""
    return _state


def get_state() -> State:
    if _state is None:
        init()
    return _state


MAX_TIMEOUT_S = 365 * 24 * 3600  # the C++ side's limit (core/failure.h, Timeout::kMaxSeconds)


def check_timeout(seconds: float, where: str) -> None:
    """A timeout must be a positive, finite number of seconds, at most 365 days."""
    if not (0 < seconds <= MAX_TIMEOUT_S):  # also rejects NaN
        raise ValueError(f"{where}: the timeout must be more than 0 s and at most 365 days, got {seconds!r} s")


def set_timeout(timeout: timedelta) -> None:
    """The timeout of every fastar wait from now on, queued work and fastar.wrap's buckets included.
    It reaches a collective already waiting: one stuck under a longer timeout then raises within
    the new one (measured from the start of its wait). Never waits for a running collective."""
    if isinstance(timeout, (int, float)):
        check_timeout(float(timeout), "fastar.set_timeout")
        timeout = timedelta(seconds=timeout)
    if not isinstance(timeout, timedelta):
        raise TypeError(f"fastar.set_timeout: expected a datetime.timedelta or seconds, got {type(timeout).__name__}")
    check_timeout(timeout.total_seconds(), "fastar.set_timeout")
    st = get_state()
    st.timeout = timeout
    if st.owner is not None:
        st.owner.set_timeout(timeout)  # the backend's own waits follow the communicator's
    else:
        st.comm.set_timeout(timeout.total_seconds())
    for c in st.group_comms.values():
        c.set_timeout(timeout.total_seconds())
