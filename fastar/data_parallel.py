"""fastar.wrap(model): gradients averaged over all workers by allreduces that run while backward
is still going, in buckets, through the compiled BucketEngine; and fastar.comm_hook for users who
keep DDP.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
import warnings
import weakref

import torch
import torch.distributed as dist
from torch import nn

from . import collectives, policy
from .diagnose import reraise
from .groups import ShmSpaceError, ensure_device_groups, extension, native_plan, node_segment
from .state import get_state, require_dist, warn_once

log = logging.getLogger("fastar")


def _check_same_across_ranks(module: nn.Module, group) -> None:
    """Parameter names, shapes and dtypes must agree on every rank: an error names the first
    mismatching parameter and rank."""
    mine = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in module.named_parameters()]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    ref = everyone[0]
    for rank, theirs in enumerate(everyone):
        if theirs == ref:
            continue
        for i in range(max(len(ref), len(theirs))):
            a = ref[i] if i < len(ref) else None
            b = theirs[i] if i < len(theirs) else None
            if a != b:
                raise RuntimeError(
                    f"fastar.wrap: the models differ across ranks: parameter #{i} is {a} on rank 0 but {b} on rank "
                    f"{rank} (name, shape, dtype, requires_grad). Build the same model on every rank before wrapping.")


class FastarModule(nn.Module):
    """What fastar.wrap returns: forward passes through; after backward() every parameter's .grad
    holds the average over all workers (each worker's loss is its own mean over n images; summing
    over k workers and dividing by k equals a loss normalised by k*n, as in the paper)."""

    def __init__(self, module: nn.Module, bucket_cap_mb: float = 25, first_bucket_mb: float = 1,
                 algorithm: str = "auto", hierarchy: str = "auto", find_unused_parameters: bool = False,
                 broadcast_from_rank0: bool = True, check_finite: bool = False,
                 gradient_as_bucket_view: bool = True, shm_buckets: bool = True, compression=None,
                 broadcast_buffers: bool | None = None, forward_sync_buffers: bool | None = None):
        super().__init__()
        require_dist()
        _refuse_wrapped(module)
        if algorithm not in policy.ALGORITHMS:
            raise ValueError(f"fastar.wrap: algorithm={algorithm!r}; expected one of {policy.ALGORITHMS}")
        if hierarchy not in policy.HIERARCHIES:
            raise ValueError(f"fastar.wrap: hierarchy={hierarchy!r}; expected one of {policy.HIERARCHIES}")
        wire = collectives.parse_compression(compression, "fastar.wrap")
        self.module = module
        st = get_state()
        self._state = st
        self._algorithm, self._hierarchy = algorithm, hierarchy
        self.find_unused_parameters = find_unused_parameters
        self.check_finite = check_finite
        group = st.world_group
        _check_same_across_ranks(module, group)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # frozen ones are skipped
        for n, p in named:
            if p.layout != torch.strided:
                raise ValueError(f"fastar.wrap: parameter {n} is {p.layout}; fastar reduces dense gradients")
            if p.dtype not in collectives.SUPPORTED_DTYPES:
                raise TypeError(f"fastar.wrap: parameter {n} has dtype {p.dtype}; fastar reduces "
                                "float32/float64/float16/bfloat16 (keep it frozen, or cast the model)")
        devices = sorted({str(p.device) for _, p in named})
        if len(devices) > 1:
            raise ValueError(f"fastar.wrap: the model's parameters are on several devices ({', '.join(devices)}); "
                             "fastar.wrap, like DDP, takes a model on one device: move it with model.to(device)")
        device = named[0][1].device if named else torch.device("cpu")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"fastar.wrap: the model is on {device}; fastar reduces CPU and CUDA gradients")
        if policy.nothing_to_compress(wire, device.type, st.topo.size, st.topo.num_nodes, hierarchy):
            warn_once("wrap:one-node-compression",
                      f"fastar.wrap: compression={compression!r} on a single node: no gradient "
                      "crosses a network, so the buckets are summed in shared memory in full "
                      "precision, as without compression (the compressed path would give the same "
                      "full-precision sums, slower); compression applies between nodes")
            wire = ""
        if device.type == "cuda" or wire:
            ensure_device_groups(st, device)  # NCCL (or compressed Gloo) groups, collective
        self._bgroup = st.device_groups["cuda"]["world"] if device.type == "cuda" else group
        self.forward_sync_buffers, init_sync_buffers = _buffer_sync(broadcast_buffers, forward_sync_buffers)
        if broadcast_from_rank0 and st.topo.size > 1:
            with torch.no_grad():
                for t in list(module.parameters()) + (list(module.buffers()) if init_sync_buffers else []):
                    dist.broadcast(t.data, src=0, group=self._bgroup)
        self._require_forward_sync = True  # DDP's require_forward_param_sync
        self.compression = wire or None
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        order = list(reversed(range(len(self._params))))  # gradients appear roughly in reverse order
        self._engine = extension().BucketEngine(
            st.comm, self._params, order, int(bucket_cap_mb * (1 << 20)),
            int(first_bucket_mb * (1 << 20)), gradient_as_bucket_view)  # waits read the communicator's timeout
        self._wire = wire
        if st.topo.local_size > 1 and shm_buckets and device.type == "cpu" and not wire:
            # Buckets live in the node's shared memory: the local phase reads them where they are.
            engine = self._engine
            try:
                node_segment(st.topo, group, engine.attach_arena, "buckets",
                                         lambda _: engine.unlink_arena(), lambda _: engine.detach_arena())
            except ShmSpaceError as e:  # every rank alike: the same buckets everywhere
                warn_once("wrap:shm-buckets", f"fastar.wrap: {e}\nThe buckets stay in private "
                          "memory and go through the staged shared-memory path instead (slower "
                          "local phase; same results).")
        self._apply_choices()  # after the buckets found their memory: moving them lays them out anew
        self._sync = True
        self._rebuilt = False
        self._callback_queued = False
        self._ranges = None  # this backward's torch.profiler ranges, only while the profiler is on
        self._iteration = 0
        self._bwd_first = self._bwd_end = 0.0
        self._last_stats: list = []
        self._spare = None
        self._keep_spare = device.type == "cpu"  # CUDA's caching allocator keeps freed blocks itself
        # The hooks hold this wrapper weakly and go with it: a dropped wrapper leaves a plain model.
        me = weakref.ref(self)
        self._handles = [p.register_post_accumulate_grad_hook(_grad_hook(me, i)) for i, p in enumerate(self._params)]
        for p in self._params:
            _OWNERS[id(p)] = (weakref.ref(p), me)
        weakref.finalize(self, _release, self._handles, self._params, me)

    def _apply_choices(self):
        node, in_place = self._state.node, self._engine.has_arena()
        for b in range(self._engine.num_buckets()):
            idx = self._engine.bucket_params(b)
            p0 = self._params[idx[0]] if len(idx) else None
            itemsize = p0.element_size() if p0 is not None else 4
            wire = self._wire if p0 is not None and p0.dtype in (torch.float32, torch.float64) else ""
            plan = policy.plan(self._engine.bucket_bytes(b), itemsize, node, algorithm=self._algorithm,
                               hierarchy=self._hierarchy, device=p0.device.type if p0 is not None else "cpu",
                               wire=wire, in_place=in_place)
            self._engine.set_plan(b, native_plan(plan))

    @property
    def broadcast_buffers(self) -> bool:
        """DDP's older name of forward_sync_buffers (as DDP keeps it: an alias)."""
        return self.forward_sync_buffers

    @broadcast_buffers.setter
    def broadcast_buffers(self, value: bool) -> None:
        self.forward_sync_buffers = value

    def forward(self, *args, **kwargs):
        if self._callback_queued and torch._C._current_graph_task_id() == -1:
            # The last backward raised (autograd then drops its callbacks, so _finalize never ran):
            # its iteration is over. Wait for the buckets it launched and start clean, or the next
            # backward's gradients would meet the old ones ("arrived twice").
            self._callback_queued = False
            self._ranges = None
            self._engine.abandon()
        self._spare = None  # last backward's own gradients: their memory now serves this forward
        if self.forward_sync_buffers and self._require_forward_sync:
            self._sync_buffers()
        out = self.module(*args, **kwargs)
        # As DDP: the next forward syncs buffers when this one may be followed by a synced backward.
        self._require_forward_sync = torch.is_grad_enabled() and self._sync
        return out

    def _sync_buffers(self):
        """DDP's forward_sync_buffers: rank 0's buffers (BN running statistics, counters) everywhere."""
        bufs = list(self.module.buffers())
        if bufs and self._state.topo.size > 1:
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tuple(bufs)):
                dist._broadcast_coalesced(self._bgroup, bufs, 250 * (1 << 20), 0)

    @contextlib.contextmanager
    def no_sync(self):
        """Gradients accumulate locally inside this block; the first backward outside it syncs them."""
        old = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad(self, i: int, param):
        if not self._sync:
            return
        if not self._callback_queued:
            owner = self._state.owner
            if owner is not None and owner.closed:
                raise RuntimeError(
                    "fastar.wrap: this model's gradients went through the communicator of the \"fastar\" "
                    "default process group, which has been destroyed (dist.destroy_process_group()); "
                    "after a new init_process_group, wrap the bare model again")
            self._callback_queued = True
            self._bwd_first = time.monotonic()
            self._ranges = _BucketRanges(self) if torch.autograd.profiler._is_profiler_enabled else None
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
        self._engine.mark_ready(i, param.grad)
        if self._ranges is not None:
            self._ranges.ready(i)

    def _finalize(self):
        self._callback_queued = False
        ranges, self._ranges = self._ranges, None
        try:
            self._finalize_buckets(ranges)
        finally:
            if ranges is not None:
                ranges.close()
        self._last_stats = self._engine.stats()
        self._iteration += 1
        if self.check_finite:
            self._check_finite()
        if not self._rebuilt:
            self._rebuild_from_observed_order()

    def _finalize_buckets(self, ranges):
        """Waits for every bucket and points .grad at the averages (or raises for a missing gradient)."""
        missing = self._engine.missing()
        if missing and not self.find_unused_parameters:
            self._engine.abandon()  # the next backward starts clean
            names = ", ".join(self._names[i] for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise RuntimeError(
                f"fastar.wrap: rank {self._state.topo.rank}: these parameters got no gradient in this iteration: "
                f"{names}{more}. If some parameters are legitimately unused, wrap with find_unused_parameters=True "
                "(their gradients are then treated as zeros); if they should never train, set requires_grad=False.")
        self._bwd_end = time.monotonic()
        # finalize points .grad at the bucket views; on the CPU the gradients autograd allocated this
        # backward (after zero_grad(set_to_none=True)) are kept until the next forward, as DDP keeps
        # them until zero_grad: freed here, ~100 MB at once (ResNet-50) went back to the system and
        # were faulted in again every step (2 nodes x 1: 10-15k page faults a step, 6-7% slower).
        spare = [p.grad for p in self._params] if self._keep_spare else None
        if ranges is not None and self.find_unused_parameters:
            ranges.launch_rest()  # finalize launches the buckets that unused parameters held back
        try:
            self._engine.finalize(self.find_unused_parameters)
        except RuntimeError as e:  # a dead or disagreeing peer: name it, with the others' reports
            reraise(e)
        self._spare = spare

    def _rebuild_from_observed_order(self):
        # After the first iteration, lay buckets out in the order gradients really became ready, so
        # that each bucket fills as early as possible. Rank 0's order is used everywhere, so that
        # every rank builds identical buckets.
        self._rebuilt = True
        order = [self._engine.ready_order()]
        dist.broadcast_object_list(order, src=0, group=self._state.world_group)
        order = list(order[0])
        seen = set(order)
        order += [i for i in reversed(range(len(self._params))) if i not in seen]  # unused ones last
        self._engine.rebuild(order)
        self._apply_choices()

    def _check_finite(self):
        for n, p in zip(self._names, self._params):
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise FloatingPointError(
                    f"fastar.wrap: the averaged gradient of {n} has NaN or Inf (iteration {self._iteration}); "
                    "some worker's loss diverged: lower the learning rate or check the data")

    def comm_stats(self) -> dict:
        """Per bucket of the last synchronised iteration: bytes, when it became ready, when its
        allreduce started and ended (seconds after the first gradient), and the overlap: the share
        of communication time that ran before backward ended. For CUDA buckets, start and end are
        when fastar's thread enqueued the bucket's work on its CUDA stream (the GPU runs it later,
        ordered by events), so the figures describe the CPU side only."""
        t0, end = self._bwd_first, self._bwd_end
        buckets, total, hidden = [], 0.0, 0.0
        for nbytes, ready, start, stop, algo in self._last_stats:
            dur = max(0.0, stop - start)
            total += dur
            hidden += max(0.0, min(stop, end) - start) if start < end else 0.0
            buckets.append({"bytes": nbytes, "ready_s": ready - t0, "start_s": start - t0, "end_s": stop - t0,
                            "algorithm": algo})
        return {"iteration": self._iteration, "backward_s": end - t0, "comm_s": total,
                "overlap": hidden / total if total > 0 else 0.0, "buckets": buckets,
                "bucket_params": [[self._names[i] for i in self._engine.bucket_params(b)]
                                  for b in range(self._engine.num_buckets())]}



class _BucketRanges:
    """torch.profiler ranges for one synchronised backward of fastar.wrap, one per bucket, named
    `fastar::bucket <i> <bytes>B <hierarchy>:<algorithm> peers=<world size>` (as the backend names
    its collectives). Made only when the profiler is on as the backward's first gradient arrives:
    without it, fastar.wrap pays one flag test per backward and one `is None` per gradient.

    A range opens at the bucket's launch: the engine queues a bucket on the communicator inside
    the mark_ready call that brings its last gradient, once every earlier bucket has gone (buckets
    launch strictly in order); this class keeps the same count in Python and opens the range as
    that mark_ready returns. The range closes when finalize returns, i.e. when fastar.wrap has
    waited for every bucket at the end of backward: the engine does not report a single bucket's
    completion to Python, so a bucket that finished earlier still shows until then. Its own start
    and end on the communicator's thread are in comm_stats()["buckets"] (and fastar.trace)."""

    __slots__ = ("bucket_of", "pending", "names", "next", "open")

    def __init__(self, module: FastarModule):
        engine = module._engine
        self.bucket_of: dict = {}
        self.pending: list = []
        for b in range(engine.num_buckets()):
            params = engine.bucket_params(b)
            for p in params:
                self.bucket_of[p] = b
            self.pending.append(len(params))
        peers = module._state.topo.size
        self.names = [f"fastar::bucket {b} {nbytes}B {plan} peers={peers}"
                      for b, (nbytes, _, _, _, plan) in enumerate(engine.stats())]
        self.next = 0
        self.open: list = []

    def ready(self, param: int) -> None:
        """After mark_ready(param): opens the ranges of the buckets the engine has just launched."""
        self.pending[self.bucket_of[param]] -= 1
        while self.next < len(self.pending) and self.pending[self.next] == 0:
            self._open()

    def launch_rest(self) -> None:
        while self.next < len(self.pending):
            self._open()

    def _open(self) -> None:
        rf = torch.autograd.profiler.record_function(self.names[self.next])
        rf.__enter__()
        self.open.append(rf)
        self.next += 1

    def close(self) -> None:
        for rf in self.open:
            rf.__exit__(None, None, None)
        self.open = []


def _grad_hook(wrapper_ref, i: int):
    def hook(param):
        wrapper = wrapper_ref()
        if wrapper is not None:
            wrapper._on_grad(i, param)
    return hook


def _release(handles, params, wrapper_ref) -> None:
    """Runs when a wrapper is collected: its hooks and marks leave the parameters."""
    for h in handles:
        h.remove()
    for p in params:
        if _OWNERS.get(id(p), (None, None))[1] is wrapper_ref:
            del _OWNERS[id(p)]


# id(parameter) -> (weak reference to it, weak reference to the wrapper whose hooks it carries).
# Not an attribute of the parameter (a deepcopy of the model, for an EMA say, must not copy it),
# nor a WeakKeyDictionary (its lookups compare tensors with ==).
_OWNERS: dict = {}


def _refuse_wrapped(module: nn.Module) -> None:
    for n, p in module.named_parameters():
        param_ref, ref = _OWNERS.get(id(p), (None, None))
        if param_ref is not None and param_ref() is p and ref() is not None:
            raise RuntimeError(
                f"fastar.wrap: parameter {n} already belongs to a fastar.wrap wrapper (a model wrapped twice, "
                "or a module shared with another wrapped model): its gradients would be averaged twice. Wrap "
                "the bare model once; to re-wrap, drop the old wrapper first (del wrapped; gc.collect()).")


def wrap(model: nn.Module, bucket_cap_mb: float = 25, first_bucket_mb: float = 1, algorithm: str = "auto",
         hierarchy: str = "auto", find_unused_parameters: bool = False, check_finite: bool = False,
         gradient_as_bucket_view: bool = True, compression=None, broadcast_buffers: bool | None = None,
         forward_sync_buffers: bool | None = None) -> FastarModule:
    """model = fastar.wrap(model): data parallel training over fastar's hierarchical allreduce.

    The model may live on the CPU (Gloo between nodes, shared memory inside a node) or on one GPU
    per rank (NCCL; buckets packed by one kernel and reduced on fastar's own CUDA stream, ordered
    against backward's with events). compression: None | "fp16" | "bf16": gradients cross the
    wire in that dtype and are summed in fp32 (the averaged gradient is rounded to it once).

    gradient_as_bucket_view: after each synchronised backward, .grad is a view into fastar's bucket
    (no copy back; like DDP's option of that name). A .grad kept across iterations is then
    overwritten by the next synchronised backward; set False to get separate gradient tensors.
    On the CPU the tensors autograd allocated for .grad in that backward (after
    zero_grad(set_to_none=True)) are held until the next forward, as DDP holds its gradients until
    zero_grad: their memory then serves that forward instead of going back to the system.
    compression on a single CPU node is dropped (nothing crosses a network; a warning says so).
    check_finite: raise, naming the parameter, when an averaged gradient holds NaN or Inf.
    forward_sync_buffers: as DDP's (and its default, True): rank 0's buffers (BN running statistics)
    are broadcast to every rank at the start of each forward that follows a synchronised one; they
    are broadcast once at wrap time either way. False keeps every worker's own buffers from then on
    (the paper's per-worker BN).
    broadcast_buffers: DDP's older name, kept with DDP's meaning: the same as forward_sync_buffers,
    except that False also leaves the buffers out of the broadcast at wrap time (fastar.train passes
    it). When both are given, forward_sync_buffers wins and a warning says so, as in DDP.
    A model whose parameters already belong to a live wrapper is refused; a wrapper that is
    dropped takes its gradient hooks with it. Under torch.profiler each bucket of a synchronised
    backward is a range `fastar::bucket <i> <bytes>B <plan> peers=<N>`, from its launch to the end
    of backward's finalize (_BucketRanges says exactly what it spans); none without the profiler.
    On a "fastar" default group the buckets go through the backend's communicator (fastar.init)."""
    return FastarModule(model, bucket_cap_mb=bucket_cap_mb, first_bucket_mb=first_bucket_mb, algorithm=algorithm,
                        hierarchy=hierarchy, find_unused_parameters=find_unused_parameters, check_finite=check_finite,
                        gradient_as_bucket_view=gradient_as_bucket_view, compression=compression,
                        broadcast_buffers=broadcast_buffers, forward_sync_buffers=forward_sync_buffers)


def _buffer_sync(broadcast_buffers: bool | None, forward_sync_buffers: bool | None) -> tuple[bool, bool]:
    """(sync buffers at each forward, sync them at wrap time), as torch 2.14's DDP derives them from its
    two names: forward_sync_buffers wins and always syncs at wrap time; the older broadcast_buffers
    (default True) sets both."""
    if forward_sync_buffers is not None:
        if broadcast_buffers is not None:
            warnings.warn("fastar.wrap: both broadcast_buffers and forward_sync_buffers were given; "
                          "broadcast_buffers (DDP's older name) is ignored, as DDP ignores it", stacklevel=4)
        return bool(forward_sync_buffers), True
    sync = True if broadcast_buffers is None else bool(broadcast_buffers)
    return sync, sync


class _HookState:
    def __init__(self, algorithm: str, hierarchy: str, compression):
        self.algorithm, self.hierarchy, self.compression = algorithm, hierarchy, compression
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastar-hook")


def hook_state(algorithm: str = "auto", hierarchy: str = "auto", compression=None) -> _HookState:
    """State for fastar.comm_hook: ddp.register_comm_hook(fastar.hook_state(), fastar.comm_hook).
    compression: None | "fp16" | "bf16", as for fastar.wrap."""
    collectives.parse_compression(compression, "fastar.hook_state")
    st = get_state()
    if compression:
        ensure_device_groups(st, torch.device("cpu"))  # collective, like DDP's construction
    return _HookState(algorithm, hierarchy, compression)


def comm_hook(state, bucket):  # no annotations: DDP compares them as objects, and this file postpones them
    """A DDP communication hook that averages DDP's bucket with fastar's allreduce."""
    buf = bucket.buffer()
    work = collectives.all_reduce(buf, op="avg", algorithm=state.algorithm, hierarchy=state.hierarchy,
                                  async_op=True, validate=False, compression=state.compression)
    fut: torch.futures.Future = torch.futures.Future()

    def complete():
        try:
            work.wait()
            fut.set_result(buf)
        except Exception as e:  # noqa: BLE001 - handed to DDP through the future
            fut.set_exception(e)

    state.pool.submit(complete)
    return fut
