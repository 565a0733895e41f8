"""fastar as a torch.distributed backend: `import fastar; dist.init_process_group("fastar")`.

The backend is a Python c10d Backend (torch's PyBackend trampoline) that owns one fastar
Communicator per process group, over Gloo process groups of its own (never the user's), with the
node's shared-memory arena for the world group. What runs where (docs/backend.md has the table):

  native     allreduce (sum, avg; fp32/fp64/fp16/bf16), allreduce_coalesced: fastar's hierarchical
             schedule, exactly the engine behind fastar.all_reduce.
  native     reduce_scatter (list and tensor forms; sum, avg; the four float dtypes) and allgather
             (list and into-tensor forms, any dtype) of CPU tensors: the two halves of fastar's
             allreduce (Communicator.reduce_scatter / .allgather): every local rank sums or copies its
             shard through the node's shared memory, and the rail runs the schedule's half between
             nodes. They move the bytes of a reduce-scatter or an allgather, not of an allreduce.
  delegated  broadcast, barrier, gather, scatter, reduce, alltoall, send/recv, the coalesced
             allgathers, CUDA reduce-scatter and allgather, and allreduce with other ops or dtypes:
             an internal Gloo backend (CPU tensors) or NCCL backend (CUDA tensors) of the same ranks.

Every collective returns a Work whose future completes when the result is in place, so DDP's
reducer and comm hooks chain on it. One completion thread per backend waits on fastar's native
works in submission order (the communicator runs them in that order too) and completes the
futures that were asked for; Work.wait() completes its own work in the caller's thread.

Every call, whatever its path, is counted in path_counts() ({(method, path): calls}; path "latency",
"native" or "delegated") and, while the profiler runs, is one torch.profiler range (_profiled) that
lasts until its Work completes; the path taken is the same with the profiler on or off.

torch holds each backend inside fastar._C.BackendShim (csrc/torch/backend_shim.cpp), a C++ Backend
that forwards every call here and hands torch the returned Works whole: torch's own trampoline for
Python backends wraps them in a holder that answers only wait() and get_future() (is_completed() stayed
False, a recv from any source had no source rank).
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import secrets
import socket
import threading
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as _C10dBackend
from torch._C._distributed_c10d import PrefixStore, ProcessGroup, ProcessGroupGloo
from torch._C._distributed_c10d import Work as _C10dWork

from . import collectives, diagnose, groups, policy, settings, state
from . import topology as _topology

log = logging.getLogger("fastar")

NAME = "fastar"

_SUM_AVG = {int(dist.ReduceOp.SUM): False, int(dist.ReduceOp.AVG): True}


def _op_kind(reduce_op) -> bool | None:
    """False for SUM, True for AVG, None for any other op (a fallback)."""
    try:
        return _SUM_AVG.get(int(reduce_op))
    except (TypeError, ValueError):
        pass
    for op, avg in ((dist.ReduceOp.SUM, False), (dist.ReduceOp.AVG, True)):
        try:
            if reduce_op == op:
                return avg
        except Exception:  # noqa: BLE001 - a premul-sum op compares with nothing
            pass
    return None


class _Pending:
    """One native collective in flight: completed (post-processing run, future set) exactly once,
    by whichever comes first: the completion thread, or a caller of Work.wait()."""

    __slots__ = ("native", "fut", "result", "post", "record", "backend", "done", "lock", "queued")

    def __init__(self, backend, native, fut, result, post, record):
        self.backend, self.native, self.fut, self.result, self.post, self.record = \
            backend, native, fut, result, post, record
        self.done = self.queued = False
        self.lock = threading.Lock()

    def complete(self, timeout_s: float) -> None:
        err = None
        try:
            self.native.wait(timeout_s)  # releases the GIL
        except Exception as e:  # noqa: BLE001 - handed to every waiter through the future
            err = e
        with self.lock:
            if self.done:
                return
            self.done = True
            if err is None and self.post is not None:
                try:
                    self.post()
                except Exception as e:  # noqa: BLE001
                    err = e
        if err is not None:
            self.fut.set_exception(self.backend._annotate(err))
            return
        self.backend._record(self.record, self.native)
        self.fut.set_result(self.result)


class FastarWork(_C10dWork):
    """A Work over a torch Future: wait() raises the collective's error, get_future() chains.
    fut None: a collective that succeeded inline (complete when returned); its future is made only
    when someone asks for it."""

    def __init__(self, fut: torch.futures.Future | None, result, pending: _Pending | None = None):
        super().__init__()
        self._fut, self._result, self._pending = fut, result, pending

    def wait(self, timeout: timedelta | None = None) -> bool:
        if self._fut is None:
            return True
        p = self._pending
        if p is not None and not p.done:  # wait here rather than for the completion thread's wake-up
            p.complete(p.backend._wait_s)
        self._fut.wait()  # raises the collective's error
        return True

    def is_completed(self) -> bool:
        if self._fut is None:
            return True
        p = self._pending
        if p is not None and not p.done and p.native.is_completed():
            p.complete(p.backend._wait_s)
        return self._fut.done()

    def is_success(self) -> bool:
        if self._fut is None:
            return True
        if not self._fut.done():
            return False
        try:
            self._fut.value()
            return True
        except Exception:  # noqa: BLE001
            return False

    def exception(self):
        if self._fut is None:
            return None
        try:
            self._fut.value()
        except Exception as e:  # noqa: BLE001
            return e
        return None

    def result(self):
        return self._result

    def get_future(self) -> torch.futures.Future:
        if self._fut is None:
            self._fut = torch.futures.Future()
            self._fut.set_result(self._result)
            return self._fut
        p = self._pending
        if p is not None and not p.queued:  # someone will chain on it: the completion thread completes it
            p.backend._enqueue(p)
        return self._fut


def _wrap_gloo(backend, store, rank: int, size: int) -> ProcessGroup:
    """A c10d ProcessGroup holding one Gloo backend: what fastar's Communicator sends over."""
    pg = ProcessGroup(store, rank, size)
    pg._set_default_backend(ProcessGroup.BackendType.GLOO)
    pg._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, backend)
    return pg


class FastarBackend(_C10dBackend):
    """The "fastar" torch.distributed backend of one process group."""

    def __init__(self, store, rank: int, size: int, timeout: timedelta, global_ranks: list[int],
                 group_id: str = ""):
        super().__init__(rank, size)
        # A header exchanged before each native collective so that ranks passing different shapes or
        # dtypes get an error instead of a wrong answer (as fastar.all_reduce does).
        # FASTAR_BACKEND_VALIDATE=0 drops it; a bad value fails here, before any connection is made.
        self._validate = settings.backend_validate()
        self._store, self._rank, self._size = store, rank, size
        self._timeout = timeout if isinstance(timeout, timedelta) else timedelta(seconds=float(timeout))
        self._default = not global_ranks  # torch passes no ranks for the default (world) group
        self._global_ranks = list(global_ranks) if global_ranks else list(range(size))
        self._group_id = group_id
        self._closed = False
        self._seq = 0  # collectives issued on this group (_get_sequence_number_for_group)
        # Everything this backend delegates (user send/recv included) goes to this Gloo backend; the
        # communicator sends over another one, so that its tags never meet the user's.
        self._gloo = ProcessGroupGloo(PrefixStore("fastar/gloo/", store), rank, size, self._timeout)
        self._nccl = None
        self._lock = threading.Lock()
        self._topo = self._detect_topology()
        self._comm = self._make_communicator()
        # What the plans (fastar.policy.plan) need to know of this communicator.
        self._node = policy.Node(self._topo.size, self._topo.local_size,
                                 self._comm.shm_chunk_bytes() if self._comm.has_shm() else 0,
                                 self._comm.single_copy())
        # the CPU plans by collective and size, with their label and the end of their records' names
        self._plans = groups.PlanCache(lambda: self._node, self._describe)
        self._wait_s = self._timeout.total_seconds() + 30  # the communicator fails first, within its timeout
        self._queue: queue.Queue = queue.Queue()
        self._records: list = []  # (name, bytes, plan, start_s, end_s) of recent native collectives
        self._paths: dict = {}  # (method, path) -> calls: which path each call took (path_counts)
        self.last_path: tuple | None = None  # (method, path) of this group's latest call
        self._thread = threading.Thread(target=self._complete_loop, name=f"fastar-backend-{group_id}",
                                        daemon=True)
        self._thread.start()
        log.debug("fastar backend for group %r: %s", group_id, self._topo)

    # -- construction -------------------------------------------------------------------------

    def _detect_topology(self) -> _topology.Topology:
        """The world group (all ranks of the job) gets the node structure, as fastar.init detects
        it: FASTAR_LOCAL_SIZE, torchrun's LOCAL_WORLD_SIZE, else host names swapped in the store.
        A subgroup is flat: one participant per rank, no local phase."""
        rank, size = self._rank, self._size
        is_world = self._default or (dist.is_initialized() and size == dist.get_world_size())
        if not is_world:
            return _topology.Topology(rank=rank, size=size, local_rank=0, local_size=1, node=rank,
                                      num_nodes=size, source="subgroup: flat")
        from_env = _topology.local_size_from_env()
        if from_env is not None:
            local_size, source = from_env
        else:
            self._store.set(f"fastar/host/{rank}", socket.gethostname())
            names = [self._store.get(f"fastar/host/{r}").decode() for r in range(size)]
            local_size, source = names.count(names[rank]), "host names"
            if names != sorted(names, key=names.index) or size % local_size:
                local_size, source = 1, "host names (ranks not laid out node by node: flat)"
        if local_size < 1 or size % local_size:
            raise ValueError(f"fastar backend: local_size={local_size} (from {source}) does not divide the "
                             f"world size {size}; every node must run the same number of ranks")
        return _topology.Topology(rank=rank, size=size, local_rank=rank % local_size, local_size=local_size,
                                  node=rank // local_size, num_nodes=size // local_size, source=source)

    def _make_communicator(self):
        topo, store, timeout = self._topo, self._store, self._timeout
        self._transport = ProcessGroupGloo(PrefixStore("fastar/transport/", store), topo.rank, topo.size, timeout)
        world = _wrap_gloo(self._transport, PrefixStore("fastar/world_pg/", store), topo.rank, topo.size)
        self._world_pg = world
        inter, inter_ranks = None, []
        if topo.num_nodes > 1 and topo.local_size > 1:
            # this rank's rail: the ranks with its local rank on every node (only members build it)
            inter_ranks = topo.inter_ranks(topo.local_rank)
            rstore = PrefixStore(f"fastar/rail{topo.local_rank}/", store)
            rail = ProcessGroupGloo(PrefixStore("gloo/", rstore), topo.node, topo.num_nodes, timeout)
            inter = _wrap_gloo(rail, PrefixStore("pg/", rstore), topo.node, topo.num_nodes)
            self._rail = rail
        self._inter_pg = inter
        world_ranks = list(range(topo.size))  # the communicator's ranks are this group's ranks

        def make(shm_name: str, create: bool, chunk_bytes: int):
            return groups.extension().Communicator(
                rank=topo.rank, size=topo.size, local_rank=topo.local_rank, local_size=topo.local_size,
                node=topo.node, num_nodes=topo.num_nodes, world=world, world_ranks=world_ranks,
                inter=inter, inter_ranks=inter_ranks, shm_name=shm_name, shm_create=create,
                shm_chunk_bytes=chunk_bytes, timeout_s=timeout.total_seconds())

        chunk = settings.shm_chunk_bytes()  # a bad FASTAR_SHM_CHUNK_MB fails here, on every rank alike
        self.shm_chunk_bytes = None  # the staged chunk of the node's arena (None: no arena, one rank per node)
        if topo.local_size == 1:
            return make("", False, chunk)
        # As fastar.init: when /dev/shm cannot hold the arena, the smaller chunks of
        # state.SHM_FALLBACK_CHUNKS in turn, with its warning; when not even the smallest fits,
        # the ShmSpaceError (how much was needed, how much is free, what to do) on every rank.
        chunks = state.shm_chunks(chunk)
        for i, c in enumerate(chunks):
            try:
                comm = self._node_segment(lambda name, create, c=c: make(name, create, c), i)
            except groups.ShmSpaceError as e:
                if i + 1 == len(chunks):
                    raise
                state.warn_shm_fallback('init_process_group("fastar")', e, chunks[i + 1])
                continue
            self.shm_chunk_bytes = c
            comm.probe_single_copy(settings.single_copy())  # the node's ranks together, after all mapped it
            return comm

    def _node_segment(self, make, attempt: int):
        """The node's shared-memory arena, as groups.node_segment makes it, with the store and this
        backend's internal Gloo group in place of torch.distributed calls (the group is still being
        built: torch.distributed cannot be called on it yet). Local rank 0 creates the segment, the
        others then open it; after each step every rank of the job learns every rank's outcome, so
        that a failure anywhere (a full /dev/shm on one node, a rank that cannot open) raises the same
        error, naming that rank, on every rank at once, and every node takes the same decision."""
        topo, store = self._topo, self._store
        key = f"fastar/shm/{attempt}"
        comm = None

        def step(what: str, mine: bool, act) -> None:
            nonlocal comm
            err = None
            if mine:
                try:
                    comm = act()
                except Exception as e:  # noqa: BLE001 - reported to every rank, raised below
                    err = e
            try:
                self._agree(f"{key}/{what}", err, what)
            except Exception:
                if comm is not None:
                    try:
                        comm.close()  # the creator's close removes the segment's name
                    except Exception:  # noqa: BLE001 - the set-up error is the one to report
                        pass
                raise

        def create():
            groups.extension().remove_stale_shm("fastar_")
            name = (f"/fastar_{os.getuid()}_{groups.job_id()}_be_n{topo.node}_{secrets.token_hex(4)}"
                    f"_ns{groups.extension().pid_namespace()}_p{os.getpid()}")
            c = make(name, True)
            store.set(f"{key}/name/{topo.node}", name)
            return c

        step("created", topo.local_rank == 0, create)
        step("opened", topo.local_rank != 0,
             lambda: make(store.get(f"{key}/name/{topo.node}").decode(), False))
        comm.unlink_shm()  # a no-op except on the creator: a crash now leaves nothing behind
        self._barrier_internal()
        return comm

    def _agree(self, key: str, err: Exception | None, what: str) -> None:
        """Collective over the internal Gloo group: every rank's outcome of a set-up step (0 ok,
        1 /dev/shm too small, 2 another error), the failing ranks' messages through the store. Raises
        on every rank alike when any rank failed: another error first (a smaller segment would not
        help), else ShmSpaceError, so that the caller retries smaller chunks on every rank."""
        topo = self._topo
        codes = torch.zeros(topo.size, dtype=torch.int32)
        if err is not None:
            self._store.set(f"{key}/{topo.rank}", str(err) or type(err).__name__)  # before the exchange
            codes[topo.rank] = 1 if "/dev/shm is too small" in str(err) else 2
        self._gloo.allreduce([codes], dist.AllreduceOptions()).wait(self._timeout)
        failed = codes.nonzero().flatten().tolist()
        if not failed:
            return
        others = [r for r in failed if codes[r] == 2]
        r = (others or failed)[0]
        msg = self._store.get(f"{key}/{r}").decode()
        cls = RuntimeError if others else groups.ShmSpaceError
        more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        this = ", this rank" if r == topo.rank else ""
        raise cls(f"fastar backend: the node's shared-memory segment could not be {what} on rank {r} "
                  f"(node {r // topo.local_size}{this}){more}: {msg}")

    def _barrier_internal(self):
        self._gloo.barrier(dist.BarrierOptions()).wait(self._timeout)

    @property
    def topology(self) -> _topology.Topology:
        return self._topo

    @property
    def communicator(self):
        return self._comm

    # What fastar.init adopts when this is the default group's backend (fastar/state.py).
    @property
    def timeout(self) -> timedelta:
        return self._timeout

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def transport_groups(self) -> tuple:
        """(world, rail): the c10d ProcessGroups the communicator sends over (rail: None on one node
        or with one rank per node). Not registered with torch.distributed: no dist.* call takes them."""
        return self._world_pg, self._inter_pg

    def set_timeout(self, timeout: timedelta) -> None:
        """The communicator's timeout from now on (fastar.set_timeout, when fastar.init adopted it)."""
        self._comm.set_timeout(timeout.total_seconds())
        self._wait_s = timeout.total_seconds() + 30

    def getBackendName(self) -> str:  # noqa: N802 - the trampoline's name
        return NAME

    # What the backend supports beyond the collectives, as Gloo answers. torch's trampoline reads these
    # Python attributes; left undefined, it finds the base class's property, which asks the trampoline
    # again (batch_isend_irecv died with a RecursionError).
    supports_coalescing = False
    supports_splitting = False
    supports_time_estimate = False
    supports_shrinking = False
    supports_reconfigure = False
    supports_window = False

    def _get_sequence_number_for_group(self) -> int:
        """How many collectives this rank has issued on the group (the same on every rank of a correct
        program); torch's ProcessGroupWrapper (TORCH_DISTRIBUTED_DEBUG=DETAIL) checks it."""
        return self._seq

    # -- the completion thread -----------------------------------------------------------------

    def _complete_loop(self):
        while True:
            pending = self._queue.get()
            if pending is None:
                return
            pending.complete(self._wait_s)

    def _record(self, rec, native) -> None:
        rec[3:] = [native.start_s, native.end_s]
        self._keep(rec)

    def _keep(self, rec) -> None:
        self._records.append(tuple(rec))
        if len(self._records) > 4096:
            del self._records[:2048]

    def _annotate(self, e: Exception) -> Exception:
        """The error, with the reports other ranks published (the rank that failed is named there)."""
        try:
            if dist.is_initialized():
                return diagnose.with_cause(e)
        except Exception:  # noqa: BLE001 - the original error matters more than its annotation
            pass
        return e

    def _native(self, flat: torch.Tensor, avg: bool, what: str, result, post=None, op: str | None = None) \
            -> FastarWork:
        """Queues one fastar allreduce of `flat` (contiguous, in place); `post` runs after it. op: the
        Backend method called (path_counts), `what` when None."""
        op = op or what
        if self._closed:
            raise RuntimeError("fastar backend: the process group was shut down")
        nbytes = flat.nbytes
        if flat.device.type == "cuda":
            self._ensure_cuda()
            plan = policy.plan(nbytes, flat.element_size(), self._node, hierarchy="flat", device="cuda")
            native, (label, suffix) = groups.native_plan(plan), self._describe(plan, nbytes)
        else:
            plan, native, (label, suffix) = self._plans.get("allreduce", nbytes, flat.itemsize)
        name = "fastar::" + what + suffix
        rec = [name, nbytes, label, 0.0, 0.0]
        latency = plan.protocol == "latency"

        def run() -> FastarWork:
            if latency:
                # The latency protocol runs inline when nothing is queued (the Work is complete when
                # returned; the same with the profiler on: the range then covers the call); behind
                # queued work the communicator queues it, and the Work completes it.
                t0 = time.monotonic()
                try:
                    work = self._comm.allreduce(flat, native, avg, self._validate, False)
                except RuntimeError as e:
                    self._count(op, "latency")
                    fut: torch.futures.Future = torch.futures.Future()
                    fut.set_exception(self._annotate(e))
                    return FastarWork(fut, result)
                if work is None:
                    return self._ran_inline(op, "latency", post, rec, t0, result)
                return self._launch(lambda: work, torch.futures.Future(), result, post, rec, op)
            return self._launch(lambda: self._comm.allreduce(flat, native, avg, self._validate, True),
                                torch.futures.Future(), result, post, rec, op)
        return self._profiled(name, run)

    def _ran_inline(self, op: str, path: str, post, rec, t0: float, result) -> FastarWork:
        """The Work of a collective the communicator ran inline (complete when it returned)."""
        self._count(op, path)
        if post is not None:
            post()
        rec[3:] = [t0, time.monotonic()]  # the native clock: steady_clock = CLOCK_MONOTONIC
        self._keep(rec)
        return FastarWork(None, result)

    def _launch(self, start, fut, result, post, rec, op: str) -> FastarWork:
        """Starts one native collective (`start()` returns fastar's work) and returns its Work."""
        self._count(op, "native")
        pending = _Pending(self, start(), fut, result, post, rec)
        # The completion thread takes only the works whose future someone may chain on (get_future:
        # DDP, comm hooks, and _profiled, so that a profiler range ends without a wait()); the
        # caller's wait() (or is_completed()) completes the others, post-step included: no second
        # thread wakes for a plain dist.all_reduce (that hand-off cost ~60 us a call on 2 busy cores).
        return FastarWork(fut, result, pending)

    # -- which path each call took, and its profiler range -------------------------------------

    def _count(self, op: str, path: str) -> None:
        key = (op, path)
        self._paths[key] = self._paths.get(key, 0) + 1
        self.last_path = key

    def path_counts(self) -> dict:
        """{(method, path): calls} since the group was created. method: the Backend method torch
        called (allreduce, allreduce_coalesced, reduce_scatter, reduce_scatter_single, allgather,
        all_gather_single, broadcast, barrier, send, ...); path: "latency" (fastar's latency path,
        complete when returned), "native" (a fastar collective on the communicator) or "delegated"
        (the internal Gloo/NCCL backend, fallbacks included)."""
        return dict(self._paths)

    @staticmethod
    def _profiled(name, start):
        """start() (which returns a Work, or None), inside a torch.profiler range named `name` (a
        string, or a function making it, called only while the profiler runs) that lasts until the
        Work's future completes (or until start returns, for a Work without a future). Every call
        of the backend, native, latency, delegated or fallback, goes through here: the path taken
        is the same with the profiler on or off."""
        if not torch.autograd.profiler._is_profiler_enabled:
            return start()
        with torch.profiler.record_function(name if isinstance(name, str) else name()) as rf:
            work = start()
            try:
                fut = work.get_future()  # a FastarWork's: the completion thread ends it without a wait()
            except Exception:  # noqa: BLE001 - no Work, or a Work without a future (Gloo's send/recv)
                fut = None
            if fut is not None:
                rf._call_end_callbacks_on_future(fut)
        return work

    def _delegated_call(self, op: str, tensors, call):
        """call(inner) on the internal backend for these tensors (Gloo for CPU, NCCL for CUDA):
        counted as op's "delegated" path, in a profiler range naming the backend it went to."""
        inner = self._delegate(tensors)
        self._count(op, "delegated")

        def name():
            nbytes = sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
            return f"fastar::{op} (delegated to {inner.name()}) {nbytes}B peers={self._size}"
        return self._profiled(name, lambda: call(inner))

    def _native_halves(self, scatter: bool, out: torch.Tensor, inp: torch.Tensor, avg: bool, what: str, result,
                       post=None, op: str | None = None) -> FastarWork:
        """fastar's reduce-scatter (scatter) or allgather of CPU tensors: the two halves of its
        allreduce. In shared memory on each node; between nodes, the rail runs the schedule's half
        (halving/doubling when the node count is a power of two, else ring)."""
        if self._closed:
            raise RuntimeError("fastar backend: the process group was shut down")
        if torch.autograd.profiler._is_profiler_enabled and not self._halves_run(scatter, out, inp):
            # the communicator would refuse them (ValueError) inside this call's range: the caller
            # delegates them, in one range of the delegated call's
            raise ValueError("fastar backend: tensors the communicator does not run")
        whole = inp if scatter else out
        nbytes = whole.nbytes
        plan, native, (label, suffix) = self._plans.get(what, nbytes, whole.itemsize)
        name = "fastar::" + what + suffix
        rec = [name, nbytes, label, 0.0, 0.0]
        # Small calls run at once in the caller's thread (no hand-off); large ones are queued, so
        # that the caller (FSDP's prefetch, a DDP-style overlap) goes on while they run. The same
        # with the profiler on.
        queued = nbytes > policy.HALVES_INLINE_BYTES
        op = op or what
        comm = self._comm
        if scatter:
            def start():
                return comm.reduce_scatter(out, inp, native, avg, self._validate, queued)
        else:
            def start():
                return comm.allgather(out, inp, native, self._validate, queued)
        def run() -> FastarWork:
            t0 = time.monotonic()
            try:
                work = start()
            except RuntimeError as e:  # an inline call failed (or the communicator had): the Work says so
                self._count(op, "native")
                fut: torch.futures.Future = torch.futures.Future()
                fut.set_exception(self._annotate(e))
                return FastarWork(fut, result)
            if work is None:  # ran inline
                return self._ran_inline(op, "native", post, rec, t0, result)
            return self._launch(lambda: work, torch.futures.Future(), result, post, rec, op)
        return self._profiled(name, run)

    def _describe(self, plan, nbytes: int) -> tuple[str, str]:
        """(label, suffix) of a native call: its plan as its record shows it, and the end of its
        record's and profiler range's name (after "fastar::<what>")."""
        if plan.collective == "allreduce":
            label = f"{plan.hierarchy}:{plan.algorithm}"
        else:
            label = f"{'shm+rail' if plan.hierarchy == 'rail' else 'flat'}:{plan.algorithm}"
        return label, f" {nbytes}B {label} peers={self._size}"

    def _enqueue(self, pending: _Pending) -> None:
        with self._lock:
            if not pending.queued:
                pending.queued = True
                self._queue.put(pending)

    def _ensure_cuda(self):
        """CUDA tensors: fastar's TensorAllreduce path over an NCCL backend of the same ranks."""
        if self._comm.has_tensor_groups("cuda"):
            return
        groups.check_cuda_path(torch.device("cuda"))
        nccl = self._nccl_backend()
        pg = ProcessGroup(PrefixStore("fastar/nccl_pg/", self._store), self._rank, self._size)
        pg._set_default_backend(ProcessGroup.BackendType.NCCL)
        pg._register_backend(torch.device("cuda"), ProcessGroup.BackendType.NCCL, nccl)
        self._nccl_pg = pg
        self._comm.set_tensor_groups("cuda", pg, None, None, list(range(self._size)), [])

    def _nccl_backend(self):
        if self._nccl is None:
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = self._timeout
            self._nccl = dist.ProcessGroupNCCL(PrefixStore("fastar/nccl/", self._store), self._rank, self._size,
                                               opts)
        return self._nccl

    def _delegate(self, tensors) -> object:
        """The internal backend for these tensors: NCCL for CUDA ones, Gloo otherwise."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cuda":
                return self._nccl_backend()
        return self._gloo

    @staticmethod
    def _native_ok(t: torch.Tensor) -> bool:
        return (t.dtype in collectives.SUPPORTED_DTYPES and t.layout == torch.strided and t.is_contiguous()
                and t.device.type in ("cpu", "cuda"))

    # -- native collectives --------------------------------------------------------------------

    def allreduce(self, tensors, opts):
        avg = _op_kind(opts.reduceOp)
        if any(t.layout != torch.strided for t in tensors):  # sparse: Gloo's own sparse allreduce
            return self._fallback_allreduce(tensors, opts, avg, "allreduce")
        if avg is not None and len(tensors) == 1 and self._native_ok(tensors[0]):
            return self._native(tensors[0], avg, "allreduce", list(tensors))
        if avg is not None and tensors:  # several tensors, or a non-contiguous one: packed
            return self._coalesced(tensors, avg, "allreduce")
        return self._fallback_allreduce(tensors, opts, avg, "allreduce")

    def allreduce_coalesced(self, tensors, opts):
        avg = _op_kind(opts.reduceOp)
        if avg is None or not tensors:
            return self._delegated_call("allreduce_coalesced", tensors, lambda g: g.allreduce_coalesced(tensors, opts))
        return self._coalesced(tensors, avg, "allreduce_coalesced")

    def _coalesced(self, tensors, avg: bool, what: str):
        """Several tensors (one dtype, one device) in one allreduce: packed into one flat buffer,
        unpacked after. Mixed dtypes, other dtypes and sparse tensors go to the fallback."""
        packable = all(t.dtype in collectives.SUPPORTED_DTYPES and t.layout == torch.strided
                       and t.device.type in ("cpu", "cuda") for t in tensors)
        if not packable or len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
            opts = dist.AllreduceCoalescedOptions()
            opts.reduceOp = dist.ReduceOp.AVG if avg else dist.ReduceOp.SUM
            return self._fallback_allreduce(tensors, opts, avg, what, coalesced=True)
        flat = torch.cat([t.reshape(-1) for t in tensors])

        def unpack():
            off = 0
            for t in tensors:
                n = t.numel()
                t.copy_(flat[off:off + n].view_as(t))
                off += n
        return self._native(flat, avg, what, list(tensors), unpack)

    def _fallback_allreduce(self, tensors, opts, avg, op: str, coalesced: bool = False):
        """Ops other than sum/avg, other dtypes, sparse tensors: the internal Gloo/NCCL backend.
        Gloo has no AVG: summed there, then divided."""
        def call(inner):
            nonlocal opts
            gloo_avg = avg is True and inner is self._gloo
            if gloo_avg:
                opts = dist.AllreduceCoalescedOptions() if coalesced else dist.AllreduceOptions()
                opts.reduceOp = dist.ReduceOp.SUM
            work = inner.allreduce_coalesced(tensors, opts) if coalesced else inner.allreduce(tensors, opts)
            if not gloo_avg:
                return work
            fut = work.get_future()
            size = self._size

            def divide(f):
                f.value()
                for t in tensors:
                    if t.is_floating_point() or t.is_complex():
                        t.div_(size)
                    else:
                        t.floor_divide_(size)
                return list(tensors)
            return FastarWork(fut.then(divide), list(tensors))
        return self._delegated_call(op, tensors, call)

    def _halves_run(self, scatter: bool, out: torch.Tensor, inp: torch.Tensor) -> bool:
        """Whether the communicator runs these halves (its own check, Communicator::halves, made
        here before a profiler range opens)."""
        whole, part = (inp, out) if scatter else (out, inp)
        return (self._halves_ok(out, inp) and whole.numel() == part.numel() * self._size
                and (not scatter or inp.dtype in collectives.SUPPORTED_DTYPES))

    def _halves_ok(self, *tensors) -> bool:
        """CPU tensors the native halves take: dense, contiguous, one dtype."""
        return (all(t.device.type == "cpu" and t.layout == torch.strided and t.is_contiguous() for t in tensors)
                and len({t.dtype for t in tensors}) == 1)

    def reduce_scatter_single(self, output, input, opts):  # noqa: A002 - torch's name
        avg = _op_kind(opts.reduceOp)
        if avg is not None:
            try:
                return self._native_halves(True, output, input, avg, "reduce_scatter", [output],
                                           op="reduce_scatter_single")
            except ValueError:  # the communicator does not run these tensors (checked before anything ran)
                pass
        return self._delegated_call("reduce_scatter_single", [input],
                                    lambda g: g.reduce_scatter_single(output, input, opts))

    def reduce_scatter(self, outputs, inputs, opts):
        avg = _op_kind(opts.reduceOp)
        n = self._size
        if avg is None or len(outputs) != 1 or len(inputs) != 1 or len(inputs[0]) != n \
                or outputs[0].dtype not in collectives.SUPPORTED_DTYPES \
                or not self._halves_ok(outputs[0], *inputs[0]) \
                or not all(t.shape == outputs[0].shape for t in inputs[0]):
            return self._delegated_call("reduce_scatter", outputs, lambda g: g.reduce_scatter(outputs, inputs, opts))
        flat = torch.cat([t.reshape(-1) for t in inputs[0]])
        return self._native_halves(True, outputs[0], flat, avg, "reduce_scatter", list(outputs))

    def all_gather_single(self, output, input, opts):  # noqa: A002 - torch's name
        try:
            return self._native_halves(False, output, input, False, "allgather", [output], op="all_gather_single")
        except ValueError:  # the communicator does not run these tensors (checked before anything ran)
            return self._delegated_call("all_gather_single", [input],
                                        lambda g: g.all_gather_single(output, input, opts))

    def allgather(self, outputs, inputs, opts):
        n = self._size
        if len(inputs) != 1 or len(outputs) != 1 or len(outputs[0]) != n \
                or not self._halves_ok(inputs[0], *outputs[0]) \
                or not all(t.shape == inputs[0].shape for t in outputs[0]):
            return self._delegated_call("allgather", inputs, lambda g: g.allgather(outputs, inputs, opts))
        inp, outs = inputs[0], outputs[0]
        flat = torch.empty(n * inp.numel(), dtype=inp.dtype)

        def unpack():
            for i, t in enumerate(outs):
                t.copy_(flat[i * inp.numel():(i + 1) * inp.numel()].view_as(t))
        return self._native_halves(False, flat, inp, False, "allgather", list(outputs), unpack)

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts):
        return self._delegated_call("reduce_scatter_single_coalesced", inputs,
                                    lambda g: g.reduce_scatter_single_coalesced(outputs, inputs, opts))

    # -- delegated collectives (more are made by _delegated, after the class) ------------------

    def barrier(self, opts):
        return self._delegated_call("barrier", [], lambda g: self._gloo.barrier(opts))

    def send(self, tensors, dst: int, tag: int):
        return self._delegated_call("send", tensors, lambda g: g.send(tensors, dst, tag))

    def recv(self, tensors, src: int, tag: int):
        return self._delegated_call("recv", tensors, lambda g: g.recv(tensors, src, tag))

    def recv_anysource(self, tensors, tag: int):
        return self._delegated_call("recv_anysource", tensors, lambda g: g.recv_anysource(tensors, tag))

    def monitored_barrier(self, opts, wait_all_ranks=False):
        # Gloo's Python binding takes the timeout, not the options (torch's trampoline passes the options)
        return self._delegated_call("monitored_barrier", [],
                                    lambda g: self._gloo.monitored_barrier(opts.timeout, wait_all_ranks))

    # -- records and shutdown ------------------------------------------------------------------

    def records(self) -> list[dict]:
        """The recent native collectives: name, bytes, plan, start and end (steady clock, seconds)."""
        return [{"name": n, "bytes": b, "plan": p, "start_s": s, "end_s": e} for n, b, p, s, e in self._records]

    def shutdown(self):
        if self._closed:
            return
        self._closed = True
        state.backend_closing(self)  # fastar.init's state over this communicator goes first
        self._queue.put(None)
        self._thread.join(self._timeout.total_seconds())
        try:
            self._comm.close()
        except Exception:  # noqa: BLE001 - shutting down after a failure: nothing more to say
            pass

    def abort(self):
        self.shutdown()


def _delegated(name: str):
    def call(self, *args):
        tensors = []
        for a in args:
            if isinstance(a, torch.Tensor):
                tensors.append(a)
            elif isinstance(a, (list, tuple)):
                for x in a:
                    tensors.extend(x if isinstance(x, (list, tuple)) else [x])
        return self._delegated_call(name, tensors, lambda inner: getattr(inner, name)(*args))
    call.__name__ = name
    call.__doc__ = "Delegated to the internal Gloo (CPU) or NCCL (CUDA) backend of the same ranks."
    return call


DELEGATED = ("broadcast", "allgather_coalesced", "all_gather_single_coalesced",
             "gather", "scatter", "reduce", "alltoall", "all_to_all_single", "allreduce_sparse")
for _n in DELEGATED:
    setattr(FastarBackend, _n, _delegated(_n))


def _counted(method):
    """The collective, after advancing the group's sequence number (what torch's ProcessGroupWrapper,
    under TORCH_DISTRIBUTED_DEBUG=DETAIL, compares across ranks before each collective)."""
    def call(self, *args):
        self._seq += 1
        return method(self, *args)
    call.__name__, call.__doc__ = method.__name__, method.__doc__
    return call


# Every collective, native or delegated, counts once, as on Gloo; send/recv do not.
COLLECTIVES = DELEGATED + ("allreduce", "allreduce_coalesced", "reduce_scatter_single", "reduce_scatter",
                           "reduce_scatter_single_coalesced", "all_gather_single", "allgather", "barrier",
                           "monitored_barrier")
for _n in COLLECTIVES:
    setattr(FastarBackend, _n, _counted(getattr(FastarBackend, _n)))
del _n


# Live backends, shut down at exit: a script may end without dist.destroy_process_group(), and
# the communicator's threads and retained Gloo works must go before the interpreter finalizes
# (without this, 5 of 100 processes of `bench/exit_stress.py --api backend` died with SIGABRT).
_LIVE: "weakref.WeakSet[FastarBackend]" = weakref.WeakSet()


def _shutdown_all() -> None:
    for be in list(_LIVE):
        try:
            be.shutdown()
        except Exception:  # noqa: BLE001 - exiting: nothing to report to
            pass


atexit.register(_shutdown_all)


def _create(dist_opts, pg_options=None) -> FastarBackend:
    """torch.distributed's creator (extended API): one FastarBackend per process group."""
    be = FastarBackend(dist_opts.store, dist_opts.group_rank, dist_opts.group_size, dist_opts.timeout,
                       list(dist_opts.global_ranks_in_group), str(dist_opts.group_id))
    _LIVE.add(be)
    # torch holds the C++ shim, which hands the Works this backend returns to torch whole: through
    # torch's own trampoline, is_completed() stayed False after wait() and a recv from any source had
    # no source rank (fastar/_C's BackendShim, csrc/torch/backend_shim.cpp).
    return _shim_class()(be)


def _shim_class():
    return groups.extension().BackendShim


def register() -> None:
    """Registers "fastar" for CPU and CUDA tensors (idempotent; `import fastar` calls it)."""
    if NAME.upper() in dist.Backend._plugins:
        return
    dist.Backend.register_backend(NAME, _create, extended_api=True, devices=["cpu", "cuda"])


def get_backend(group=None) -> FastarBackend:
    """The FastarBackend of a process group initialised with "fastar" (its CPU backend)."""
    pg = group if group is not None else dist.group.WORLD
    be = pg._get_backend(torch.device("cpu"))
    be = getattr(be, "impl", be)  # torch holds the C++ BackendShim around it
    if not isinstance(be, FastarBackend):
        raise ValueError(f"fastar.backend.get_backend: the group's CPU backend is {type(be).__name__}, not fastar")
    return be


def _default_open_backend() -> FastarBackend | None:
    """The default group's FastarBackend if it is one and still open; else None (what fastar.init adopts)."""
    try:
        be = get_backend()
    except Exception:  # noqa: BLE001 - another backend, or none for CPU tensors: not ours to adopt
        return None
    return None if be.closed else be


__all__ = ["FastarBackend", "FastarWork", "register", "get_backend", "NAME"]

register()
state.set_default_backend_lookup(_default_open_backend)
