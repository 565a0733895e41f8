"""Which ranks share a node, from torchrun's variables or an explicit local_size."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch.distributed as dist

from . import settings


@dataclass(frozen=True)
class Topology:
    rank: int
    size: int
    local_rank: int
    local_size: int
    node: int
    num_nodes: int
    source: str  # where local_size came from

    def node_ranks(self, node: int) -> list[int]:
        return list(range(node * self.local_size, (node + 1) * self.local_size))

    def inter_ranks(self, local_rank: int) -> list[int]:
        return [n * self.local_size + local_rank for n in range(self.num_nodes)]


def local_size_from_env() -> tuple[int, str] | None:
    """(ranks per node, where it came from) from FASTAR_LOCAL_SIZE, else torchrun's LOCAL_WORLD_SIZE;
    None when neither is set (the caller then groups ranks by host name)."""
    fastar_size = settings.local_size()
    if fastar_size is not None:
        return fastar_size, "FASTAR_LOCAL_SIZE"
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"]), "LOCAL_WORLD_SIZE (torchrun)"
    return None


def detect(local_size: int | None = None, group=None) -> Topology:
    """local_size: explicit override (lets one host play several nodes). Otherwise torchrun's
    LOCAL_WORLD_SIZE, otherwise ranks are grouped by host name. Ranks must be laid out node by node
    (rank = node * local_size + local_rank), which is what torchrun does."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    from_env = local_size_from_env() if local_size is None else None
    if local_size is not None:
        source = "fastar.init(local_size=...)"
    elif from_env is not None:
        local_size, source = from_env
    else:
        names: list = [None] * size
        dist.all_gather_object(names, socket.gethostname(), group=group)
        local_size = names.count(names[rank])
        if names != sorted(names, key=names.index) or size % local_size:
            raise RuntimeError(
                "fastar: ranks are not laid out node by node (rank = node * local_size + local_rank); "
                "launch with torchrun or pass fastar.init(local_size=...)")
        source = "host names"
    if local_size < 1 or size % local_size:
        raise ValueError(
            f"fastar: local_size={local_size} (from {source}) does not divide the world size {size}; "
            "every node must run the same number of ranks")
    return Topology(rank=rank, size=size, local_rank=rank % local_size, local_size=local_size,
                    node=rank // local_size, num_nodes=size // local_size, source=source)


def start_time(pid: int):
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])  # a zombie has exited
    except (OSError, IndexError, ValueError):
        return None


def this_process():
    """(host name, pid, start time): what fastar.init gathers from every rank."""
    return socket.gethostname(), os.getpid(), start_time(os.getpid())
