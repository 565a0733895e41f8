"""The alpha-beta-gamma cost of fastar's allreduces on a cluster: links per hierarchy level (Preset,
Topo), a schedule's rounds priced on them (a round lasts as long as its slowest rank), and the
"leader" and "rail" hierarchies as a three-stage pipeline of local and network phases."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from .schedules import ALGORITHMS, schedule_rounds

HIERARCHIES = ("flat", "leader", "rail")
IMPLS = [f"{h}:{a}" for h in HIERARCHIES for a in ALGORITHMS]
KiB, MB = 1024, 1e6


@dataclass(frozen=True)
class Preset:
    name: str
    gpus_per_node: int
    intra_GBps: float      # per-GPU intra-node bandwidth one way (NVLink / shared memory)
    intra_alpha_us: float  # per-step latency inside a node (kernel launch + sync)
    nic_gbps: float        # one NIC's line rate, Gbit/s
    nics_per_node: int
    nic_alpha_us: float    # per-step latency across nodes (network + software stack)
    intra_gamma_GBps: float  # rate at which a rank sums bytes received over the intra-node link
    nic_gamma_GBps: float    # ... and bytes received over the network (where they land decides)
    backward_ms: float     # ResNet-50 backward at 32 images per GPU; other models scale by FLOPs
    forward_ms: float
    jitter_cv: float = 0.03  # per-worker compute time varies this much (std/mean) iteration to iteration
    grad_bytes: int = 4    # fp32 gradients


PRESETS = {
    # Goyal et al. 2017, "Big Basin": 8 P100 over NVLink, one 50 Gbit Ethernet NIC per server,
    # Gloo over TCP. NCCL reaches ~20 GB/s on P100 NVLink (hybrid cube mesh). Gloo's TCP path lands
    # data in host memory and sums it on the CPU (~8 GB/s), and a TCP round trip with Gloo's
    # per-step bookkeeping and the CUDA syncs around it costs tens to a hundred microseconds: 100 us
    # is an assumption (docs/scaling.md shows the sensitivity).
    "paper": Preset("paper", 8, 20.0, 10.0, 50.0, 1, 100.0, 200.0, 8.0, 120.0, 60.0),
    # A current node: 8 H100 on NVLink 4 (~450 GB/s one way), one 400 Gbit NIC per GPU (RDMA),
    # sums on the GPU. ResNet-50 at 32 images/GPU with AMP: ~2,400 img/s per GPU -> ~13 ms/step.
    "h100": Preset("h100", 8, 450.0, 5.0, 400.0, 8, 8.0, 1000.0, 1000.0, 9.0, 4.5),
}


@dataclass(frozen=True)
class Topo:
    """Links of one hierarchy level, in seconds and seconds per byte."""
    nodes: int
    gpus: int           # ranks per node
    nics: int           # NICs per node shared by its ranks
    a_in: float
    b_in: float
    g_in: float
    a_net: float
    b_net: float
    g_net: float
    duplex: bool = True  # False: a rank's sends and receives take turns (loopback TCP: both are CPU copies)


def topo_of(p: Preset, nodes: int, gpus: int | None = None) -> Topo:
    g = p.gpus_per_node if gpus is None else gpus
    return Topo(nodes, g, min(p.nics_per_node, g), p.intra_alpha_us * 1e-6, 1 / (p.intra_GBps * 1e9),
                1 / (p.intra_gamma_GBps * 1e9), p.nic_alpha_us * 1e-6, 8 / (p.nic_gbps * 1e9),
                1 / (p.nic_gamma_GBps * 1e9))


def rounds_time(rounds, t: Topo) -> float:
    """Seconds for the rounds on topology t (rank r lives on node r // t.gpus). A round lasts as long
    as its slowest rank; a rank's intra-node and network transfers proceed at the same time."""
    total = 0.0
    for src, dst, size, reduce, repeat in rounds:
        n = int(max(src.max(), dst.max())) + 1
        net = (src // t.gpus) != (dst // t.gpus)
        link = {}
        for name, mask in (("in", ~net), ("net", net)):
            sent = np.bincount(src, size * mask, n)
            got = np.bincount(dst, size * mask, n)
            busy = (np.bincount(src, mask.astype(float), n) + np.bincount(dst, mask.astype(float), n)) > 0
            link[name] = (sent, got, busy)
        sent_in, got_in, busy_in = link["in"]
        sent_net, got_net, busy_net = link["net"]
        both = np.add if not t.duplex else np.maximum
        b_in = both(sent_in, got_in)  # full duplex: the larger direction counts
        # The node's NICs are shared by its ranks, each direction on its own (full duplex: one rank
        # sending while another receives do not compete): a rank gets at best its share of the node's
        # bytes in the busier direction.
        node = np.arange(n) // t.gpus
        node_out = np.bincount(node, sent_net, node.max() + 1)
        node_in = np.bincount(node, got_net, node.max() + 1)
        b_net = np.maximum(both(sent_net, got_net), both(node_out, node_in)[node] / t.nics)
        t_in = np.where(busy_in, t.a_in + b_in * t.b_in, 0.0)
        t_net = np.where(busy_net, t.a_net + b_net * t.b_net, 0.0)
        t_sum = (got_in * t.g_in + got_net * t.g_net) if reduce else 0.0
        total += repeat * float(np.max(np.maximum(t_in, t_net) + t_sum))
    return total


# ---------------------------------------------------------------- hierarchies
# Local phases in closed form over the intra-node link (a pipelined chain for reduce/broadcast,
# a ring for reduce-scatter/allgather, like NCCL's).

def local_reduce(b, t):
    return 0.0 if t.gpus == 1 else (t.gpus - 1) * t.a_in + b * (t.b_in + t.g_in)


def local_bcast(b, t):
    return 0.0 if t.gpus == 1 else (t.gpus - 1) * t.a_in + b * t.b_in


def local_reduce_scatter(b, t):
    return (t.gpus - 1) * (t.a_in + b / t.gpus * (t.b_in + t.g_in))


def local_allgather(b, t):
    return (t.gpus - 1) * (t.a_in + b / t.gpus * t.b_in)


def pipeline(stages, nbytes, min_chunk=64 * KiB, max_chunks=64):
    """Three stages on different links, chunked: fill + (k-1) * slowest stage, best k (power of 2)."""
    best = math.inf
    k = 1
    while k <= max_chunks and (k == 1 or nbytes / k >= min_chunk):
        ts = [f(nbytes / k) for f in stages]
        best = min(best, sum(ts) + (k - 1) * max(ts))
        k *= 2
    return best


@functools.lru_cache(maxsize=65536)
def allreduce_time(nbytes, hierarchy, algorithm, t: Topo, pipelined=True) -> float:
    """Seconds to allreduce nbytes on every one of t.nodes * t.gpus ranks."""
    N, G = t.nodes, t.gpus
    if hierarchy == "flat" or G == 1:
        return rounds_time(schedule_rounds(algorithm, N * G, nbytes), t)
    if hierarchy == "leader":
        # Leaders form a one-rank-per-node group that uses one NIC (nics=1) at full rate.
        lt = replace(t, gpus=1, nics=1)
        stages = [lambda c: local_reduce(c, t),
                  lambda c: rounds_time(schedule_rounds(algorithm, N, c), lt),
                  lambda c: local_bcast(c, t)]
    elif hierarchy == "rail":
        # G schedules at once, local rank l of node n is physical rank n*G + l; they share the
        # node's NICs when there are fewer NICs than GPUs.
        def rail(c):
            rounds = schedule_rounds(algorithm, N, c / G)
            return rounds_time([(np.concatenate([s * G + l for l in range(G)]),
                                 np.concatenate([d * G + l for l in range(G)]),
                                 np.tile(b, G), r, k) for s, d, b, r, k in rounds], t)
        stages = [lambda c: local_reduce_scatter(c, t), rail, lambda c: local_allgather(c, t)]
    else:
        raise ValueError(f"unknown hierarchy {hierarchy!r}; expected one of {HIERARCHIES}")
    if not pipelined:
        return sum(f(nbytes) for f in stages)
    return pipeline(stages, nbytes)


def needed_gbps(nbytes, nodes, window_s, p: Preset, algorithm="halving_doubling") -> float:
    """NIC line rate (Gbit/s) at which allreducing nbytes among `nodes` servers fits in window_s.
    Time = A + B/bw is linear in 1/bw, so two evaluations give it exactly."""
    t1 = allreduce_time(nbytes, "flat", algorithm, topo_of(replace(p, nic_gbps=1.0), nodes, 1))
    t2 = allreduce_time(nbytes, "flat", algorithm, topo_of(replace(p, nic_gbps=2.0), nodes, 1))
    per_inv_gbps = 2 * (t1 - t2)  # seconds per (1/Gbps)
    fixed = t1 - per_inv_gbps
    return per_inv_gbps / (window_s - fixed) if window_s > fixed else math.inf
