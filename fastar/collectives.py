"""fastar.all_reduce and the other public calls: the Python boundary of the compiled communicator.

Input checks live here, once, with messages that say what was wrong and what to do; the C++ side
re-checks cheaply (TORCH_CHECK) but Python users should never see its text for a mistake of theirs.
The rest lives by concern: fastar.state (init, shutdown, the timeout), fastar.groups (process
groups and the node's shared-memory rendezvous), fastar.policy (the route), fastar.diagnose (which
rank broke a collective); each name is imported from the module that defines it.
"""
from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from . import policy
from . import state as _state_mod
from . import topology as _topology
from .diagnose import reraise
from .groups import backend_of, ensure_device_groups, extension, group_comm, native_plan
from .state import LATENCY_PATH, current, get_state, require_dist, warn_once


log = logging.getLogger("fastar")

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
from .policy import ALGORITHMS, HIERARCHIES  # noqa: E402 - the public choices
# Gradient compression: the dtype on the wire; sums are accumulated in the tensor's own dtype.
COMPRESSIONS = {None: "", "none": "", "fp16": "fp16", "float16": "fp16", "bf16": "bf16", "bfloat16": "bf16"}


_REDUCE_OPS = {"sum": False, "avg": True, "mean": True}
# op -> avg, for the latency path (anything else takes the general path and its checks)
_FAST_OPS = {"sum": False, "avg": True, "mean": True, "SUM": False, "AVG": True,
             dist.ReduceOp.SUM: False, dist.ReduceOp.AVG: True}


def _parse_op(op, where: str = "fastar.all_reduce"):
    if isinstance(op, str):
        key = op.lower()
        if key in _REDUCE_OPS:
            return _REDUCE_OPS[key]
        raise ValueError(f"{where}: op={op!r} is not supported; use 'sum' or 'avg' "
                         f"(or torch.distributed.{where.split('.')[-1]} for max/min/product)")
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


class Work:
    """Handle of an asynchronous fastar.all_reduce (reduce_scatter_single, all_gather_single), like
    torch.distributed's Work."""

    def __init__(self, native, tensor, timeout_s: float):
        self._native, self._tensor, self._timeout = native, tensor, timeout_s

    def wait(self, timeout: timedelta | None = None) -> bool:
        t = timeout.total_seconds() if timeout is not None else self._timeout
        try:
            self._native.wait(t)
        except RuntimeError as e:
            reraise(e)
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


def parse_compression(compression, where: str = "fastar.all_reduce") -> str:
    key = compression.lower() if isinstance(compression, str) else compression
    if key not in COMPRESSIONS:
        raise ValueError(f"{where}: compression={compression!r}; expected None, 'fp16' or 'bf16'")
    return COMPRESSIONS[key]


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
    st = _state_mod._state  # current(), without the call: this is the latency protocol's entry
    if st is not None and group is None and algorithm == "auto" and hierarchy == "auto" and not async_op \
            and compression is None and isinstance(tensor, torch.Tensor):
        # The latency protocol: every call up to policy.latency_limit has the one latency plan
        # (fastar.policy.plan, made once per tuning), run inline by the communicator's one entry.
        # A tensor fastar does not reduce (sparse, strided, another dtype) raises NotForFastar
        # before anything runs, and the general path below gives its message or fallback.
        fast = st.fast
        if fast[0] is not policy.tuning():
            fast = st.refresh_fast()
        try:
            avg = _FAST_OPS.get(op)
        except TypeError:  # an unhashable op
            avg = None
        if avg is not None and tensor.numel() * tensor.element_size() <= fast[1] and tensor.is_cpu:
            try:
                work = st.comm.allreduce(tensor, fast[2], avg, True, False)
                if work is not None:  # queued behind earlier work: wait for it
                    work.wait(st.timeout.total_seconds() + 30)
                st.choice_record = LATENCY_PATH
                return None
            except _NotForFastar():
                pass
            except RuntimeError as e:
                reraise(e)
    require_dist()
    check_tensor(tensor)
    wire = parse_compression(compression)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"fastar.all_reduce: algorithm={algorithm!r}; expected one of {ALGORITHMS}")
    if hierarchy not in HIERARCHIES:
        raise ValueError(f"fastar.all_reduce: hierarchy={hierarchy!r}; expected one of {HIERARCHIES}")
    avg = _parse_op(op)
    if avg is None or tensor.dtype not in SUPPORTED_DTYPES:
        what = f"op {op}" if avg is None else f"dtype {tensor.dtype}"
        warn_once(f"fallback:{what}", f"fastar reduces float32/float64/float16/bfloat16 with sum or avg; "
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
    comm, node = st.comm, st.node
    user_group = group is not None and group is not dist.group.WORLD and dist.get_world_size(group) != node.size
    if tensor.device.type == "cuda" and group is not None and group is not dist.group.WORLD \
            and "nccl" not in backend_of(group):
        raise ValueError(f"fastar.all_reduce: the tensor is on {tensor.device} but the group is a CPU-only "
                         f"({backend_of(group) or 'unknown'}) group; pass an NCCL group "
                         "(dist.new_group(ranks, backend='nccl')) or group=None, or move the tensor to the CPU")
    if user_group:
        comm, hierarchy = group_comm(st, group, tensor.device, wire), "flat"
        node = policy.Node(dist.get_world_size(group), 1)  # a flat communicator of the group's ranks
    elif tensor.device.type == "cuda" or wire:
        ensure_device_groups(st, tensor.device)
    nbytes = tensor.numel() * tensor.element_size()
    p = policy.plan(nbytes, tensor.element_size(), node, algorithm=algorithm, hierarchy=hierarchy,
                    device=tensor.device.type, wire=wire)
    st.last_choice = {"bytes": nbytes, "algorithm": p.algorithm, "hierarchy": p.hierarchy, "protocol": p.protocol,
                      "why": p.why, "requested": (algorithm, hierarchy), "device": str(tensor.device),
                      "compression": p.wire}
    if log.isEnabledFor(logging.DEBUG):
        log.debug("fastar.all_reduce %d B: %s (%s)", nbytes, p.label, p.why)
    return _run(lambda: comm.allreduce(tensor, native_plan(p), avg, validate, async_op), tensor, st, async_op)


def _run(start, tensor, st, async_op: bool):
    """start(): a communicator call (None when it ran inline and is complete, else its work). Returns
    what the public call returns: its Work with async_op, else None once the call is complete."""
    try:
        work = start()
    except RuntimeError as e:
        reraise(e)
    if async_op:
        return Work(work, tensor, st.timeout.total_seconds() + 30)
    if work is not None:  # queued behind earlier work
        Work(work, tensor, st.timeout.total_seconds() + 30).wait()
    return None


def reduce_scatter_single(output, input, op="sum", group=None, async_op=False, validate=True):  # noqa: A002
    """Reduce-scatter, like torch.distributed.reduce_scatter_single: `output` (n elements) on rank r
    gets the sum (op="avg": the mean) over ranks of input[r*n:(r+1)*n]; `input` holds world size x n
    elements. The first half of fastar's allreduce as a collective of its own: in shared memory on
    each node (the single-copy protocol where the node allows it, else the arena's slots), the
    schedule's half between nodes (halving/doubling for a power-of-two node count, else ring).
    CPU tensors of float32/float64/float16/bfloat16; CUDA tensors, other dtypes and other ops go
    through torch.distributed.reduce_scatter_single on the group (said once in a warning).
    validate: ranks check that they make the same call (else every rank raises)."""
    st = _state_mod._state
    if st is not None and group is None and not async_op:
        # The fast entry: this size's plan from the communicator's cache (policy.plan once per size),
        # run inline. A call fastar does not run (CUDA, strided, another dtype, a size that does not
        # match) raises NotForFastar or ValueError before anything runs: _halves then gives its
        # message or its fallback.
        try:
            avg = _FAST_OPS.get(op)
            if avg is not None:
                native = st.halves.get("reduce_scatter", input.nbytes, input.itemsize)[1]
                work = st.comm.reduce_scatter(output, input, native, avg, validate, False)
                if work is not None:  # queued behind earlier work: wait for it
                    Work(work, output, st.timeout.total_seconds() + 30).wait()
                return None
        except (AttributeError, TypeError, ValueError):  # not a tensor, an unhashable op, NotForFastar
            pass
        except RuntimeError as e:
            reraise(e)
    return _halves(True, output, input, op, group, async_op, validate)


def all_gather_single(output, input, group=None, async_op=False, validate=True):  # noqa: A002
    """Allgather, like torch.distributed.all_gather_single: `output` (world size x n elements) gets
    every rank's `input` (n elements) at the rank's place; any dtype (bytes are moved). The second
    half of fastar's allreduce as a collective of its own (see reduce_scatter_single). CUDA tensors
    go through torch.distributed.all_gather_single on the group."""
    st = _state_mod._state
    if st is not None and group is None and not async_op:  # the fast entry (reduce_scatter_single's)
        try:
            native = st.halves.get("allgather", output.nbytes, output.itemsize)[1]
            work = st.comm.allgather(output, input, native, validate, False)
            if work is not None:
                Work(work, output, st.timeout.total_seconds() + 30).wait()
            return None
        except (AttributeError, ValueError):
            pass
        except RuntimeError as e:
            reraise(e)
    return _halves(False, output, input, "sum", group, async_op, validate)


def _halves(scatter: bool, output, input, op, group, async_op: bool, validate: bool):  # noqa: A002
    """The general entry of the halves: checks with messages, fallbacks, user groups, async_op."""
    where = "fastar.reduce_scatter_single" if scatter else "fastar.all_gather_single"
    require_dist()
    check_tensor(output, where)
    check_tensor(input, where)
    avg = _parse_op(op, where) if scatter else False
    world = dist.get_world_size(group)
    whole, part = (input, output) if scatter else (output, input)
    if whole.numel() != part.numel() * world:
        raise ValueError(f"{where}: the {'input' if scatter else 'output'} must hold world size ({world}) x the "
                         f"{'output' if scatter else 'input'}'s {part.numel()} elements = {part.numel() * world}, "
                         f"not {whole.numel()}")
    if output.dtype != input.dtype:
        raise ValueError(f"{where}: the input is {input.dtype} and the output {output.dtype}; pass one dtype")
    if output.device != input.device:
        raise ValueError(f"{where}: the input is on {input.device} and the output on {output.device}; "
                         "pass tensors of one device")
    fallback = None
    if avg is None:
        fallback = f"op {op}"
    elif scatter and input.dtype not in SUPPORTED_DTYPES:
        fallback = f"dtype {input.dtype}"
    elif input.device.type != "cpu":
        fallback = f"{input.device.type} tensors"
    if fallback is not None:
        warn_once(f"fallback:{where}:{fallback}",
                  f"{where}: fastar runs CPU tensors" + (" of float32/float64/float16/bfloat16 with sum or avg"
                                                         if scatter else "") +
                  f"; {fallback} go through torch.distributed.{where.split('.')[-1]} instead")
        return _torch_halves(scatter, output, input, op, avg, group, async_op, world)
    st = get_state()
    comm, node = st.comm, None
    if group is not None and group is not dist.group.WORLD and world != st.topo.size:
        comm = group_comm(st, group, input.device, "")
        node = policy.Node(world, 1)  # a flat communicator of the group's ranks
    coll = "reduce_scatter" if scatter else "allgather"
    nbytes = whole.numel() * whole.element_size()
    if node is None:
        native = st.halves.get(coll, nbytes, whole.element_size())[1]
    else:
        native = native_plan(policy.plan(nbytes, whole.element_size(), node, collective=coll))
    if scatter:
        return _run(lambda: comm.reduce_scatter(output, input, native, avg, validate, async_op), output, st, async_op)
    return _run(lambda: comm.allgather(output, input, native, validate, async_op), output, st, async_op)


def _torch_halves(scatter: bool, output, input, op, avg, group, async_op: bool, world: int):  # noqa: A002
    """torch.distributed's reduce_scatter_single / all_gather_single (fastar's fallback)."""
    if not scatter:
        w = dist.all_gather_single(output, input, group=group, async_op=async_op)
        return _DoneWork(output, w) if async_op else None
    dop = op if avg is None else (dist.ReduceOp.AVG if avg else dist.ReduceOp.SUM)
    if dop == dist.ReduceOp.AVG and "gloo" in backend_of(group):  # Gloo has no AVG: a sum, then divided
        dist.reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=group)
        if output.is_floating_point() or output.is_complex():
            output.div_(world)
        else:
            output.floor_divide_(world)
        return _DoneWork(output) if async_op else None
    w = dist.reduce_scatter_single(output, input, op=dop, group=group, async_op=async_op)
    return _DoneWork(output, w) if async_op else None


def _NotForFastar():
    return extension().NotForFastar


def explain() -> str:
    """What fastar knows about the job and what it chose for the last allreduce, and why."""
    st = current()
    if st is None:
        return "fastar is not initialised (fastar.init() or any fastar.all_reduce does it)"
    t = st.topo
    lines = [f"rank {t.rank} of {t.size}: node {t.node} of {t.num_nodes}, local rank {t.local_rank} of "
             f"{t.local_size} (local size from {t.source})",
             f"intra-node phase: {'shared memory arena' if st.comm.has_shm() else 'none (one rank per node)'}"]
    if st.owner is not None:
        lines.append('communicator: the "fastar" default group\'s, adopted by fastar.init (one per process)')
    for kind, g in st.device_groups.items():
        lines.append(f"{kind} tensor path: {g['desc']}")
    if st.last_choice:
        c = st.last_choice
        lines.append(f"last allreduce: {c['bytes']} B -> {c['hierarchy']}:{c['algorithm']}"
                     f"{':' + c['protocol'] if c.get('protocol') else ''} because {c['why']}")
    return "\n".join(lines)
