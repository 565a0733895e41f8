"""fastar's process groups and the node's shared-memory rendezvous: node_segment (a segment every
local rank maps, set up collectively so that a failure anywhere raises on every rank), the device
groups of the tensor path (NCCL for CUDA tensors, Gloo for compressed CPU tensors), and a flat
communicator over a user's group."""
from __future__ import annotations

import hashlib
import os
import secrets
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from . import policy, topology

if TYPE_CHECKING:
    from .state import State


def extension():
    """The compiled fastar._C, imported on first use so that the pure-Python parts load without it."""
    from . import _C  # noqa: PLC0415
    return _C


_ENUMS: dict = {}
_NATIVE_PLANS: dict = {}


def native_plan(plan) -> object:
    """A fastar.policy.Plan as the binding's fastar._C.Plan (its enums: _C.Collective, Algorithm,
    Hierarchy, Protocol, Wire): the plan crosses into C++ as these, never as strings. Cached: equal
    plans are one object."""
    key = (plan.collective, plan.algorithm, plan.hierarchy, plan.protocol, plan.chunk_bytes, plan.wire, plan.stream)
    native = _NATIVE_PLANS.get(key)
    if native is None:
        ext = extension()
        if not _ENUMS:
            for kind in (ext.Collective, ext.Algorithm, ext.Hierarchy, ext.Protocol, ext.Wire):
                _ENUMS.update({(kind.__name__, n): v for n, v in kind.__members__.items()})
        native = ext.Plan(_ENUMS[("Collective", plan.collective)], _ENUMS[("Algorithm", plan.algorithm)],
                          _ENUMS[("Hierarchy", plan.hierarchy)], _ENUMS[("Protocol", plan.protocol)],
                          plan.chunk_bytes, _ENUMS[("Wire", plan.wire or "none")], plan.stream)
        _NATIVE_PLANS[key] = native
    return native


class PlanCache:
    """fastar.policy.plan of one communicator's calls, by (collective, bytes, itemsize): each size is
    planned once per tuning, so that a call of fastar.reduce_scatter_single / all_gather_single, or of
    the backend's halves, costs a dict lookup instead of a plan. get() -> (Plan, its fastar._C.Plan,
    describe(Plan, nbytes) or None): describe, the caller's, makes what it shows of the call (the
    backend's record and profiler names) once per size too. policy.py still decides every plan; a
    tuning replaced by policy.set_tuning empties the cache."""

    LIMIT = 1024  # sizes kept; then it starts again (a job has a few dozen sizes)

    def __init__(self, node, describe=None):
        self._node = node  # () -> policy.Node of the communicator
        self._describe = describe
        self._tuning = None
        self._plans: dict = {}

    def get(self, collective: str, nbytes: int, itemsize: int) -> tuple:
        t = policy.tuning()
        if t is not self._tuning:
            self._tuning, self._plans = t, {}
        key = (collective, nbytes, itemsize)
        hit = self._plans.get(key)
        if hit is None:
            if len(self._plans) >= self.LIMIT:
                self._plans.clear()
            p = policy.plan(nbytes, itemsize, self._node(), collective=collective, t=t)
            hit = self._plans[key] = (p, native_plan(p), self._describe(p, nbytes) if self._describe else None)
        return hit


class ShmSpaceError(RuntimeError):
    """/dev/shm cannot hold a segment fastar needs (raised on every rank of the job alike)."""


def job_id() -> str:
    """8 hex digits naming this job (torchrun's run id, the master address and port): part of every
    shared-memory name, so that two jobs on one host never share a segment."""
    raw = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_ADDR", "") + os.environ.get("MASTER_PORT", "")
    return hashlib.sha1(raw.encode()).hexdigest()[:8]


def node_segment(topo: topology.Topology, group, make, kind: str, unlink, discard=None):
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
        extension().remove_stale_shm("fastar_")
        name = (f"/fastar_{os.getuid()}_{job_id()}_{kind}_n{topo.node}_{secrets.token_hex(4)}"
                f"_ns{extension().pid_namespace()}_p{os.getpid()}")
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


def backend_of(group) -> str:
    """The group's backend name in lower case ("" when torch cannot say)."""
    try:
        return str(dist.get_backend(group)).lower()
    except Exception:  # noqa: BLE001
        return ""


def check_cuda_path(device: torch.device) -> None:
    """CUDA tensors need fastar's CUDA build and torch's NCCL: a clear error otherwise."""
    if not extension().cuda_built():
        raise RuntimeError(f"fastar: the tensor is on {device}, but this fastar build has no CUDA support; "
                           "rebuild it where a CUDA toolkit is found (FASTAR_CUDA=1 pip install "
                           "--no-build-isolation -e .) or move the tensor to the CPU")
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        raise RuntimeError(f"fastar: the tensor is on {device}, but NCCL is not available in this torch "
                           "build, and fastar's GPU path moves CUDA tensors over NCCL")


def ensure_device_groups(st: State, device: torch.device) -> None:
    """Collective on first use: fastar's process groups for the TensorAllreduce path on `device`'s
    type: NCCL groups (world, each node's local ranks, each rail) for CUDA tensors; Gloo groups for
    CPU tensors sent compressed. Every rank creates every group, in the same order."""
    kind = device.type
    if kind in st.device_groups:
        return
    topo, timeout = st.topo, st.timeout
    if kind == "cuda":
        check_cuda_path(device)
        backend = "nccl"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"fastar: tensors on {device} are not supported; use CPU or CUDA tensors")
    if kind == "cuda":
        world = dist.new_group(ranks=list(range(topo.size)), backend=backend, timeout=timeout)
        rails = [dist.new_group(ranks=topo.inter_ranks(lr), backend=backend, timeout=timeout)
                 if topo.num_nodes > 1 else None for lr in range(topo.local_size)]
        inter = rails[topo.local_rank]
    else:
        world, inter = st.transport()  # the communicator's own groups (the backend's, when adopted)
    local = None
    if topo.local_size > 1:
        locals_ = [dist.new_group(ranks=topo.node_ranks(n), backend=backend, timeout=timeout)
                   for n in range(topo.num_nodes)]
        local = locals_[topo.node]
    if kind == "cuda":
        # NCCL makes a communicator on a group's first collective, which every member must join:
        # do it now, together, so that later batched sends and receives find it ready.
        with torch.cuda.device(device):
            for g in (world, local, inter):
                if g is not None:
                    dist.all_reduce(torch.zeros(1, device=device), group=g)
            torch.cuda.synchronize(device)
    st.comm.set_tensor_groups(kind, world, local, inter, list(range(topo.size)),
                              topo.inter_ranks(topo.local_rank) if inter is not None else [])
    st.device_groups[kind] = {
        "world": world,
        "desc": f"{backend} groups: world {topo.size}, local {topo.local_size if local else '-'}, "
                f"rails {topo.num_nodes if inter is not None else '-'}"}


def group_comm(st: State, group, device: torch.device, wire: str):
    """A flat communicator over a user's process group (its traffic shares that group)."""
    ranks = dist.get_process_group_ranks(group)
    # Keyed by torch's unique group name: id() of a destroyed group is reused by Python.
    key = (dist.distributed_c10d._get_process_group_name(group), tuple(ranks))
    if key not in st.group_comms:
        r, n = dist.get_rank(group), len(ranks)
        st.group_comms[key] = extension().Communicator(
            rank=r, size=n, local_rank=0, local_size=1, node=r, num_nodes=n, world=group, world_ranks=ranks,
            inter=None, inter_ranks=[], shm_name="", shm_create=False, shm_chunk_bytes=1 << 20,
            timeout_s=st.timeout.total_seconds())
    comm = st.group_comms[key]
    if (device.type == "cuda" or wire) and not comm.has_tensor_groups(device.type):
        if device.type == "cuda":
            check_cuda_path(device)
        comm.set_tensor_groups(device.type, group, None, None, ranks, [])
    return comm
