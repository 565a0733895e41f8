"""An alpha-beta-gamma cost model of fastar's allreduces and of a data-parallel training step.

    python -m fastar.simulate --nodes 32 --gpus-per-node 8 --model resnet50 --link-gbps 50 --json out.json
    python -m fastar.simulate --preset h100 --plot eff.png
    python -m fastar.simulate --calibrate bench/results/calib/*/allreduce_*.json

The model (docs/scaling.md says more):
  * A schedule is a list of synchronous rounds of point-to-point messages, built exactly as
    csrc/core/schedule.cpp builds them (halving/doubling with binary blocks, ring).
  * A round lasts as long as its slowest rank: alpha of the link it uses + bytes * beta + the bytes it
    receives and sums * gamma. Intra-node and inter-node links have their own alpha/beta/gamma; the
    inter-node beta is the larger of the rank's own NIC and its share of the node's NICs (several
    ranks of one node crossing the network in the same round share the node's NICs).
  * Hierarchies: "flat" runs the schedule over all N*G ranks (rank r lives on node r // G);
    "leader" = local reduce, schedule among the N leaders (one NIC), local broadcast; "rail" =
    local reduce-scatter, G concurrent schedules on 1/G shards among same-local-rank peers, local
    allgather. Both hierarchical modes are chunked so that the local phases overlap the network
    phase (as csrc/core/hierarchical.h does): a classic pipeline of three stages.
  * A training step: forward, then backward whose time is spread over the layers in proportion to
    their forward FLOPs; DDP buckets (1 MB first, then 25 MB, reverse parameter order) become ready
    when their last gradient is; one communication channel reduces buckets in order. Iteration =
    forward + backward + the communication still running when backward ends.
  * This host as a cluster (HostModel, calibrate_host): bench/allreduce_bw.py's processes of one
    2-core machine, loopback TCP, the shared-memory arena and the cores they all share, fitted on
    some configurations' rows and predicting the others (docs/scaling.md, "Calibration").
Only numpy (and torchvision for parameter shapes, matplotlib for --plot); never the extension.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import policy
from .policy import RAIL_ABOVE_BYTES, RING_ABOVE_BYTES_NON_POW2  # noqa: F401 - documented constants

HIERARCHIES = ("flat", "leader", "rail")
ALGORITHMS = ("halving_doubling", "ring")
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


# ---------------------------------------------------------------- schedules as rounds of messages
# A round: (src, dst, nbytes, reduce) arrays over virtual ranks 0..p-1, and how many times it repeats.

def _bit_reverse(v: int, bits: int) -> int:
    return int(format(v, f"0{bits}b")[::-1], 2) if bits else 0


def halving_doubling_rounds(p: int, nbytes: float):
    """Recursive halving/doubling; for p not a power of two the binary blocks of schedule.cpp."""
    if p <= 1:
        return []
    blocks, off = [], 0
    for k in range(p.bit_length() - 1, -1, -1):  # largest block first, at offset 0
        if p >> k & 1:
            blocks.append((off, k))
            off += 1 << k
    K = blocks[0][1]
    chunk = nbytes / (1 << K)
    rs = []
    for s in range(K):  # round s: every block still halving exchanges half of what it holds
        src = np.concatenate([o + np.arange(1 << k) for o, k in blocks if k > s])
        dst = np.concatenate([o + (np.arange(1 << k) ^ (1 << s)) for o, k in blocks if k > s])
        size = np.concatenate([np.full(1 << k, nbytes / 2 ** (s + 1)) for o, k in blocks if k > s])
        rs.append((src, dst, size))
    extra = []
    if len(blocks) > 1:
        # Each smaller-block rank sends every chunk it holds to block 0's owner of that chunk
        # (bit-reversed order: the owner of chunk c is bitreverse_K(c)); a block of one rank sends all.
        src, dst = [], []
        for o, k in blocks[1:]:
            per = 1 << (K - k)
            for j in range(1 << k):
                first = _bit_reverse(j, k) * per
                src += [o + j] * per
                dst += [_bit_reverse(c, K) for c in range(first, first + per)]
        extra = [(np.array(src), np.array(dst), np.full(len(src), chunk))]
    rounds = [(s, d, b, True, 1) for s, d, b in rs + extra]
    rounds += [(d, s, b, False, 1) for s, d, b in (rs + extra)[::-1]]  # the mirror, allgather
    return rounds


def ring_rounds(p: int, nbytes: float):
    """Ring: every round, rank r sends 1/p of the buffer to r+1; p-1 reducing rounds, p-1 copying."""
    if p <= 1:
        return []
    src = np.arange(p)
    dst, size = (src + 1) % p, np.full(p, nbytes / p)
    return [(src, dst, size, True, p - 1), (src, dst, size, False, p - 1)]


def schedule_rounds(algorithm: str, p: int, nbytes: float):
    if algorithm == "halving_doubling":
        return halving_doubling_rounds(p, nbytes)
    if algorithm == "ring":
        return ring_rounds(p, nbytes)
    raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {ALGORITHMS}")


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


# ---------------------------------------------------------------- the model being trained

@functools.lru_cache(maxsize=None)
def model_profile(name: str):
    """(param (name, bytes per element count) in parameter order, backward-cost share at which each
    parameter's gradient is ready (0..1), forward FLOPs per image). Built on the meta device: no
    memory, no weights, no download."""
    import torch
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    cost, owner = [], {}  # cost per executed leaf module; which execution owns each parameter

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Conv2d):  # multiply-adds per image
            c = out[0].numel() * mod.in_channels // mod.groups * math.prod(mod.kernel_size)
        elif isinstance(mod, torch.nn.Linear):
            c = mod.in_features * mod.out_features
        else:  # batch norm, relu, pooling: about one operation per output element
            c = out[0].numel() if torch.is_tensor(out) else 0
        cost.append(float(c))
        for prm in mod.parameters(recurse=False):
            owner.setdefault(id(prm), len(cost) - 1)

    hs = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    size = 299 if name.startswith("inception") else 224
    model.eval()
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    for h in hs:
        h.remove()
    cost = np.array(cost)
    # Backward runs the modules in reverse; module i's gradients exist once modules n-1..i are done.
    done_after = np.cumsum(cost[::-1])[::-1] / cost.sum()
    params = [(n, prm.numel()) for n, prm in model.named_parameters() if prm.requires_grad]
    ready = [float(done_after[owner[id(prm)]]) for _, prm in model.named_parameters() if prm.requires_grad]
    flops = 2 * sum(c for c in cost)  # forward FLOPs per image, mostly 2 * MACs
    return tuple(params), tuple(ready), flops


def buckets(name, grad_bytes=4, cap_mb=25.0, first_mb=1.0, ready_by="flops"):
    """DDP's bucketing: reverse parameter order, a bucket closes once it reaches its cap (1 MB for
    the first, 25 MB after). Returns [(bytes, ready fraction of backward)]."""
    params, ready, _ = model_profile(name)
    n = len(params)
    if ready_by == "params":  # alternative: time proportional to parameter count
        counts = np.array([c for _, c in params][::-1], float)
        ready = tuple((np.cumsum(counts) / counts.sum())[::-1])
    out, cur, cur_ready, cap = [], 0, 0.0, first_mb * MB
    for i in reversed(range(n)):
        cur += params[i][1] * grad_bytes
        cur_ready = max(cur_ready, ready[i])
        if cur >= cap or i == 0:
            out.append((cur, cur_ready))
            cur, cur_ready, cap = 0, 0.0, cap_mb * MB
    return out


def compute_ms(p: Preset, model: str, batch: int):
    """Forward and backward ms: the preset's ResNet-50 numbers scaled by FLOPs and batch size."""
    scale = model_profile(model)[2] / model_profile("resnet50")[2] * batch / 32
    return p.forward_ms * scale, p.backward_ms * scale


@functools.lru_cache(maxsize=None)
def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (0 for n = 1), by quadrature."""
    if n <= 1:
        return 0.0
    x = np.linspace(-12, 12, 24001)
    pdf = np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    cdf = np.clip(np.cumsum(pdf) * (x[1] - x[0]), 0, 1)
    return float(np.sum(x * n * pdf * cdf ** (n - 1)) * (x[1] - x[0]))


def step(p: Preset, nodes, model="resnet50", batch=32, hierarchy="leader", algorithm="halving_doubling",
         gpus=None, ready_by="flops"):
    """One training iteration on nodes x gpus workers. Comm is one channel, buckets in order."""
    t = topo_of(p, nodes, gpus)
    fwd, bwd = compute_ms(p, model, batch)
    # Synchronous SGD waits for the slowest worker: with per-worker compute jitter of jitter_cv,
    # the iteration's compute is the expected maximum over the n workers (stragglers).
    slow = 1 + p.jitter_cv * expected_max_normal(nodes * t.gpus)
    fwd, bwd = fwd * slow, bwd * slow
    end = 0.0
    for nbytes, ready in buckets(model, p.grad_bytes, ready_by=ready_by):
        comm = 1e3 * allreduce_time(nbytes, hierarchy, algorithm, t) if t.nodes * t.gpus > 1 else 0.0
        end = max(end, ready * bwd) + comm
    exposed = max(0.0, end - bwd)
    it = fwd + bwd + exposed
    return {"iteration_ms": it, "exposed_comm_ms": exposed, "comm_end_ms": end, "straggler_ms": (slow - 1) * (fwd + bwd) / slow,
            "images_per_s": nodes * t.gpus * batch / it * 1e3}


def scaling(p: Preset, nodes, **kw):
    """Efficiency vs one node of the same kind (the paper's 8 -> 256 GPUs) and vs one GPU."""
    s = step(p, nodes, **kw)
    one_node = step(p, 1, **kw)
    one_gpu = step(p, 1, **{**kw, "gpus": 1})
    s["scaling_efficiency"] = s["images_per_s"] / (nodes * one_node["images_per_s"])
    s["scaling_efficiency_vs_1gpu"] = s["images_per_s"] / (nodes * (kw.get("gpus") or p.gpus_per_node)
                                                           * one_gpu["images_per_s"])
    if p.jitter_cv:  # the same without stragglers: what communication alone costs
        s["scaling_efficiency_comm_only"] = scaling(replace(p, jitter_cv=0.0), nodes, **kw)["scaling_efficiency"]
    else:
        s["scaling_efficiency_comm_only"] = s["scaling_efficiency"]
    return s


# ---------------------------------------------------------------- calibration on allreduce_bw.py rows

def parse_impl(impl: str):
    """'fastar:<hierarchy>:<algorithm>' -> (hierarchy, algorithm); baselines ('torch:gloo',
    'torch:nccl') are modelled as a flat ring, what both use for large buffers."""
    parts = impl.split(":")
    if parts[0] == "fastar" and len(parts) == 3 and parts[1] in HIERARCHIES and parts[2] in ALGORITHMS:
        return parts[1], parts[2]
    return "flat", "ring"


def features(impl, nbytes, world_size, local_size):
    """(steps, bytes on the critical path): the model's time is alpha*steps + beta*bytes exactly
    when every link has the same alpha and beta and gamma is folded into beta; unpipelined."""
    h, a = parse_impl(impl)
    L = max(1, local_size)
    unit = lambda al, be: Topo(world_size // L, L, L, al, be, 0.0, al, be, 0.0)
    return (allreduce_time(nbytes, h, a, unit(1.0, 0.0), pipelined=False),
            allreduce_time(nbytes, h, a, unit(0.0, 1.0), pipelined=False))


def _fit(X, y):
    """Least squares of relative error (rows weighted by 1/y), alpha and beta kept >= 0."""
    w = 1 / y
    best = None
    for cols in ([0, 1], [0], [1]):
        coef = np.zeros(2)
        coef[cols] = np.linalg.lstsq(X[:, cols] * w[:, None], y * w, rcond=None)[0]
        if (coef >= 0).all():
            err = float(np.sum(((X @ coef - y) * w) ** 2))
            if best is None or err < best[0]:
                best = (err, coef)
    return best[1]


def calibrate(bench: dict, shared=False, min_bytes=256 * KiB):
    """Fit alpha (s per step) and beta (s per byte) per impl (or one pair for all), predict every row."""
    W, L = int(bench["world_size"]), int(bench.get("local_size") or 1)
    rows = [r for r in bench["rows"] if r.get("time_us", 0) > 0]
    X = np.array([features(r["impl"], r["bytes"], W, L) for r in rows], float)
    y = np.array([r["time_us"] * 1e-6 for r in rows])
    impls = sorted({r["impl"] for r in rows})
    groups = {"*": np.arange(len(rows))} if shared else \
        {i: np.array([k for k, r in enumerate(rows) if r["impl"] == i]) for i in impls}
    fits, pred = {}, np.zeros(len(rows))
    for key, idx in groups.items():
        alpha, beta = _fit(X[idx], y[idx])
        pred[idx] = X[idx] @ np.array([alpha, beta])
        fits[key] = {"alpha_us": alpha * 1e6, "beta_s_per_byte": beta,
                     "GBps": (1 / beta / 1e9) if beta > 0 else math.inf}
    out_rows, max_err = [], {}
    for k, r in enumerate(rows):
        err = float(pred[k] / y[k] - 1)
        out_rows.append({"impl": r["impl"], "bytes": r["bytes"], "time_us": r["time_us"],
                         "pred_us": float(pred[k] * 1e6), "rel_err": err})
        if r["bytes"] >= min_bytes:
            for key in (r["impl"], "all"):
                max_err[key] = max(max_err.get(key, 0.0), abs(err))
    return {"world_size": W, "local_size": L, "shared": shared, "fits": fits, "rows": out_rows,
            "max_rel_err_ge_256KiB": max_err}


def synthetic_bench(alpha_beta: dict, sizes, world_size, local_size, noise=0.0, seed=0):
    """Rows as allreduce_bw.py writes them, from known (alpha s, beta s/B) per impl: for tests."""
    rng = np.random.default_rng(seed)
    rows = []
    for impl, (alpha, beta) in alpha_beta.items():
        for b in sizes:
            s, by = features(impl, b, world_size, local_size)
            t = (alpha * s + beta * by) * (1 + noise * rng.standard_normal())
            rows.append({"impl": impl, "bytes": b, "dtype": "float32", "time_us": t * 1e6,
                         "algbw_GBps": b / t / 1e9, "busbw_GBps": b / t / 1e9 * 2 * (world_size - 1) / world_size,
                         "wrong": 0})
    return {"world_size": world_size, "local_size": local_size, "memcpy_GBps": 0.0, "rows": rows}


# ---------------------------------------------------------------- this host as a cluster
# bench/allreduce_bw.py runs every rank as a process of one machine and groups them into "nodes" of
# local_size ranks. Its rows are fitted with the model below, whose parts follow what the code does
# on such a host (an alpha-beta fit per impl, calibrate() above, cannot tell the links apart):
#   tcp: every message of "flat", the inter-node phase of "leader"/"rail", and torch's own Gloo
#        allreduce go through Gloo send/recv over loopback TCP, also between ranks of one "node";
#   shm: the local phases of "leader"/"rail" go through the node's shared-memory arena, in chunks of
#        the arena's size (copy in, sum a 1/L slice of all slots, copy out), each chunk's inter-node
#        phase on a worker thread;
#   cores: all ranks of all "nodes" share the machine's cores (and memory bus), which do every copy
#        and sum, loopback TCP's included. So an allreduce lasts at least its critical path (each rank
#        on a core of its own) and at least the work of all ranks spread over the cores:
#        T = max(T_path, work / cores).

@dataclass(frozen=True)
class HostModel:
    tcp_alpha: float   # s per schedule step over Gloo send/recv
    tcp_beta: float    # s per byte a rank sends plus receives, on its critical path (they take turns)
    tcp_cpu: float     # core-s per byte sent + received (kernel copies on both ends, sums included)
    shm_alpha: float   # s per arena phase (a barrier among the local ranks)
    shm_beta: float    # core-s per buffer byte per rank for copy-in, slice sum and copy-out
    gloo_alpha: float  # s per step of torch.distributed's Gloo allreduce (modelled as a ring)
    cache_ratio: float = 1.0     # TCP's per-byte costs when the ranks' buffers fit in the cache, vs DRAM
    shm_cache_ratio: float = 1.0  # the same for the arena's copies and sums
    cache_bytes: float = 32 << 20  # how much of the ranks' buffers the cache holds (W * nbytes)
    step_cpu: float = 0.0   # core-s a rank spends per TCP step (syscalls, thread wake-ups)
    cores: int = 2
    chunk_bytes: int = 4 << 20   # fastar.collectives.SHM_CHUNK_BYTES: the arena's pipeline chunk
    small_bytes: int = 64 << 10  # hierarchical.h: one-phase path for a single small chunk


HOST_PARAMS = ("tcp_alpha", "tcp_beta", "tcp_cpu", "shm_alpha", "shm_beta", "gloo_alpha", "cache_ratio",
               "shm_cache_ratio", "cache_bytes", "step_cpu")
def auto_choice(nbytes, world_size, local_size):
    """(hierarchy, algorithm) that fastar picks for algorithm=hierarchy="auto" (fastar.policy, the
    library's own choice, imported rather than copied)."""
    a, h, _ = policy.choose(int(nbytes), "auto", "auto", world_size, local_size)
    return h, a


def cache_factor(m: HostModel, world_size, nbytes, ratio=None) -> float:
    """Per-byte costs relative to streaming from DRAM: the share of the W buffers of nbytes that
    the cache holds moves at `ratio` (default cache_ratio) times the DRAM cost."""
    hit = min(1.0, m.cache_bytes / max(1.0, world_size * float(nbytes)))
    return 1.0 - (1.0 - min(1.0, m.cache_ratio if ratio is None else ratio)) * hit


@functools.lru_cache(maxsize=None)
def _round_summary(algorithm: str, p: int):
    """Per round of the schedule on p ranks, for a 1-byte buffer: (repeat, ranks taking part, the most
    bytes one rank sends plus receives, bytes sent by all ranks)."""
    out = []
    for src, dst, size, _, repeat in schedule_rounds(algorithm, p, 1.0):
        moved = np.bincount(src, size, p) + np.bincount(dst, size, p)
        out.append((repeat, len(np.union1d(src, dst)), float(moved.max()), float(size.sum())))
    return tuple(out)


def _tcp(algorithm, p, nbytes, m: HostModel, alpha=None, copies=1, step_cpu=None):
    """(seconds, core-s of work) of a schedule on p ranks over loopback TCP, `copies` such schedules
    running at once on disjoint ranks (rail). Each round lasts at least its critical path (every rank
    on a core of its own; sends and receives take turns, both being CPU copies on loopback) and at
    least the work of all its ranks spread over the cores: step_cpu per rank and step, tcp_cpu per
    byte sent and received. With more ranks than cores the second bound is what makes small
    messages slower (4 ranks: about twice the latency of 2 on this host)."""
    alpha = m.tcp_alpha if alpha is None else alpha
    step_cpu = m.step_cpu if step_cpu is None else step_cpu
    total = work = 0.0
    for repeat, busy, moved, sent in _round_summary(algorithm, p):
        w = (m.tcp_cpu * 2 * sent * nbytes + step_cpu * busy) * copies  # all ranks of all copies
        total += repeat * max(alpha + m.tcp_beta * moved * nbytes, w / m.cores)
        work += repeat * w
    return total, work


def host_time(impl, nbytes, world_size, local_size, m: HostModel) -> float:
    """Seconds for one allreduce row of bench/allreduce_bw.py on this host."""
    W, L = world_size, max(1, local_size)
    N = W // L
    b = float(nbytes)
    extra = 0.0
    f, fs = cache_factor(m, W, b), cache_factor(m, W, b, m.shm_cache_ratio)
    m = replace(m, tcp_beta=m.tcp_beta * f, tcp_cpu=m.tcp_cpu * f, shm_beta=m.shm_beta * fs)
    if impl.startswith("torch:"):  # Gloo's allreduce: a ring over loopback, with its own step latency
        return _tcp("ring", W, b, m, alpha=m.gloo_alpha, step_cpu=0.0)[0]
    parts = impl.split(":")
    h, a = parts[1], parts[2]
    if h == "auto" or a == "auto":
        h, a = auto_choice(nbytes, W, L)
        if N > 1 or h == "flat":
            extra = m.tcp_alpha  # validate=True: one 32-byte header exchange with the peers first
    if h == "flat" or L == 1 or W == 1:
        return _tcp(a, W, b, m)[0] + extra
    # leader / rail: the arena's chunks. Per chunk every local rank copies in and sums its slice and
    # copies out on its calling thread; a worker thread runs the inter-node schedule. All W ranks do
    # their local phases at once, on the same cores. hierarchical.h overlaps a chunk's network phase
    # with the next chunk's local phase, but on this host the two compete for the same two cores: at
    # 2x2 a 4 MiB chunk took 3.2-5.1 ms in a run of 16 (64 MiB) and 4.2-6.4 ms alone, so the phases
    # are added, chunk after chunk (the shared-core bound still applies).
    k = max(1, math.ceil(b / m.chunk_bytes))
    c = b / k
    if N == 1 and k == 1 and b <= m.small_bytes:  # one phase: every rank sums all slots itself
        return max(m.shm_alpha + m.shm_beta * b, W * m.shm_beta * b / m.cores)
    local_work = W * m.shm_beta * c
    local = max(2 * m.shm_alpha + m.shm_beta * c, local_work / m.cores)
    if N == 1:  # one node: no network phase, the chunks go one after the other
        return k * local
    if h == "leader":  # the leaders allreduce the whole chunk, one per node
        net, net_work = _tcp(a, N, c, m)
    else:  # rail: every local rank allreduces its 1/L slice with its peers on the other nodes
        net, net_work = _tcp(a, N, c / L, m, copies=L)
    # Each chunk also goes from the calling thread to the worker thread and back, and the ranks that
    # wait for it sleep on a flag: one more thread wake-up per chunk, taken to cost what waking a
    # peer for a TCP step costs (an assumption: no separate parameter).
    net += m.tcp_alpha
    return max(k * (local + net), k * (local_work + net_work) / m.cores) + extra


def bench_label(bench: dict) -> str:
    """'<nodes>x<local_size>' of an allreduce_bw.py JSON (or of calibrate()'s result)."""
    W, L = int(bench["world_size"]), int(bench.get("local_size") or 1)
    return f"{W // L}x{L}"


def merge_runs(benches):
    """Several runs of one configuration ('<nodes>x<local>') become one: each (impl, bytes) row's time is
    the median over the runs that have it (a single run on this shared host strays by up to ~40% at
    some sizes; the median of three is what the model is fitted to and judged on)."""
    groups = {}
    for b in benches:
        groups.setdefault(bench_label(b), []).append(b)
    out = []
    for label, runs in groups.items():
        if len(runs) == 1:
            out.append(runs[0])
            continue
        times = {}
        for b in runs:
            for r in b["rows"]:
                if r.get("time_us", 0) > 0:
                    times.setdefault((r["impl"], int(r["bytes"])), []).append(float(r["time_us"]))
        rows = [{"impl": i, "bytes": n, "time_us": float(np.median(ts)), "time_us_runs": ts}
                for (i, n), ts in times.items()]
        out.append({**{k: v for k, v in runs[0].items() if k != "rows"}, "runs": len(runs), "rows": rows})
    return out


def _host_rows(benches):
    rows = []
    for f, bench in enumerate(benches):
        W, L = int(bench["world_size"]), int(bench.get("local_size") or 1)
        for r in bench["rows"]:
            if r.get("time_us", 0) > 0:
                rows.append({"file": f, "label": bench_label(bench), "impl": r["impl"], "bytes": int(r["bytes"]),
                             "world_size": W, "local_size": L, "time_us": float(r["time_us"]),
                             **({"time_us_runs": r["time_us_runs"]} if "time_us_runs" in r else {})})
    return rows


def _log_err(m: HostModel, rows) -> np.ndarray:
    return np.array([math.log(host_time(r["impl"], r["bytes"], r["world_size"], r["local_size"], m)
                              / (r["time_us"] * 1e-6)) for r in rows])


def _nelder_mead(f, x0, step=0.5, iters=600, tol=1e-10):
    """Minimises f over R^n (here log-parameters): the textbook simplex method, deterministic."""
    n = len(x0)
    pts = [np.array(x0, float)] + [np.array(x0, float) + step * np.eye(n)[i] for i in range(n)]
    vals = [f(x) for x in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) < tol:
            break
        cen = np.mean(pts[:-1], axis=0)
        xr = cen + (cen - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = cen + 2 * (cen - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = cen + 0.5 * (pts[-1] - cen)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best
                pts = [pts[0]] + [pts[0] + 0.5 * (x - pts[0]) for x in pts[1:]]
                vals = [vals[0]] + [f(x) for x in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


# The configurations fitted by default: one node (the arena alone; flat over loopback TCP) and one
# rank per node (TCP alone, 2, 3 and 4 ranks on the 2 cores). Several nodes of several ranks, where
# arena and network phases combine (every leader/rail impl with a network phase), are predicted.
DEFAULT_FIT_LABELS = ("1x2", "2x1", "3x1", "4x1")


def fit_host(rows, cores=2, x0=None) -> HostModel:
    """Least squares of log(predicted / measured) over the rows, every size weighted alike, all the
    HOST_PARAMS at once (Nelder-Mead in log space from a rough start, restarted until it settles)."""
    start = x0 or {"tcp_alpha": 200e-6, "tcp_beta": 1 / 1.5e9, "tcp_cpu": 1 / 6e9, "shm_alpha": 10e-6,
                   "shm_beta": 1 / 5e9, "gloo_alpha": 600e-6, "cache_ratio": 0.6, "shm_cache_ratio": 0.6,
                   "cache_bytes": 8 << 20, "step_cpu": 100e-6}
    base = HostModel(**start, cores=cores)
    used = [k for k in HOST_PARAMS if k != "gloo_alpha" or any(r["impl"].startswith("torch:") for r in rows)]
    if not any(r["local_size"] > 1 and ":flat:" not in r["impl"] and not r["impl"].startswith("torch:")
               for r in rows):
        used = [k for k in used if not k.startswith("shm_")]

    def model_of(x):
        return replace(base, **{k: float(math.exp(min(v, 0.0) if k.endswith("cache_ratio") else v))
                                for k, v in zip(used, x)})

    def loss(x):
        return float(np.sum(_log_err(model_of(x), rows) ** 2))

    x = np.log([getattr(base, k) for k in used])
    best = math.inf
    for _ in range(6):  # restarts: the max() makes the surface piecewise smooth
        x, val = _nelder_mead(loss, x)
        if best - val < 1e-9:
            break
        best = val
    return model_of(x)


def calibrate_host(benches, fit_labels=DEFAULT_FIT_LABELS, min_bytes=256 * KiB, cores=None, fit_min_bytes=None):
    """Fits a HostModel on the rows of the files whose '<nodes>x<local>' label is in fit_labels and
    predicts every row of every file. Returns the parameters, every row with its prediction and
    whether it was fitted ("fit") or predicted ("held_out"), and the largest |relative error| at
    sizes >= min_bytes per group (fit / held_out / all, per label, per impl)."""
    singles = list(benches)
    benches = merge_runs(singles)
    rows = _host_rows(benches)
    fit_min_bytes = min_bytes if fit_min_bytes is None else fit_min_bytes
    if cores is None:
        cores = int(min(b.get("cpus") or 2 for b in benches))
    train = [r for r in rows if r["label"] in fit_labels and r["bytes"] >= fit_min_bytes]
    if not train:
        raise ValueError(f"no rows to fit: no file is one of {fit_labels} (labels: "
                         f"{sorted({r['label'] for r in rows})})")
    m = fit_host(train, cores=cores)
    out, max_err = [], {}
    for r in rows:
        pred = host_time(r["impl"], r["bytes"], r["world_size"], r["local_size"], m)
        err = pred / (r["time_us"] * 1e-6) - 1
        role = "fit" if r["label"] in fit_labels else "held_out"
        out.append({**r, "pred_us": pred * 1e6, "rel_err": err, "role": role})
        if r["bytes"] >= min_bytes:
            for key in ("all", role, f"{r['label']}", f"{r['label']} {r['impl']}"):
                max_err[key] = max(max_err.get(key, 0.0), abs(err))
    # each single run against the model fitted to the medians: how far one run alone strays
    per_run = []
    for b in singles:
        errs = [abs(host_time(r["impl"], r["bytes"], int(b["world_size"]), int(b.get("local_size") or 1), m)
                    / (r["time_us"] * 1e-6) - 1) for r in b["rows"] if r.get("time_us", 0) > 0 and r["bytes"] >= min_bytes]
        per_run.append({"label": bench_label(b), "command": b.get("command", ""), "max_rel_err": max(errs, default=0.0)})
    return {"model": "host", "params": asdict(m), "fit_labels": list(fit_labels), "fit_min_bytes": fit_min_bytes,
            "runs": {lab: sum(bench_label(b) == lab for b in singles) for lab in sorted({bench_label(b) for b in singles})},
            "single_run_max_rel_err": per_run,
            "n_fit_rows": len(train), "labels": sorted({r["label"] for r in rows}), "rows": out,
            "max_rel_err_ge_256KiB": max_err, "min_bytes": min_bytes}


# ---------------------------------------------------------------- report, plot, CLI

def report(p: Preset, nodes, model, batch, hierarchy, algorithm, ready_by="flops"):
    kw = dict(model=model, batch=batch, ready_by=ready_by)
    grad = sum(c for _, c in model_profile(model)[0]) * p.grad_bytes
    t = topo_of(p, nodes)
    per = {i: scaling(p, nodes, hierarchy=i.split(":")[0], algorithm=i.split(":")[1], **kw) for i in IMPLS}
    head = per[f"{hierarchy}:{algorithm}"]
    fwd, bwd = compute_ms(p, model, batch)
    return {
        "config": {**asdict(p), "nodes": nodes, "model": model, "batch_per_gpu": batch,
                   "hierarchy": hierarchy, "algorithm": algorithm, "ready_by": ready_by,
                   "gradient_bytes": grad, "forward_ms_used": fwd, "backward_ms_used": bwd,
                   "buckets": [{"bytes": b, "ready_ms": r * bwd} for b, r in buckets(model, p.grad_bytes,
                                                                                      ready_by=ready_by)]},
        "iteration_ms": head["iteration_ms"],
        "images_per_s": head["images_per_s"],
        "scaling_efficiency": head["scaling_efficiency"],
        "scaling_efficiency_vs_1gpu": head["scaling_efficiency_vs_1gpu"],
        "allreduce_ms": {i: 1e3 * allreduce_time(grad, *i.split(":"), t) for i in IMPLS},
        "per_impl": per,
        "needed_nic_gbps": needed_gbps(grad, max(nodes, 2), bwd * 1e-3, p, algorithm),
    }


def plot(p: Preset, path, model="resnet50", batch=32, node_counts=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    node_counts = node_counts or [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    fig, ax = plt.subplots(figsize=(8, 5))
    for i in IMPLS:
        h, a = i.split(":")
        eff = [scaling(p, n, model=model, batch=batch, hierarchy=h, algorithm=a)["scaling_efficiency"]
               for n in node_counts]
        ax.plot([n * p.gpus_per_node for n in node_counts], eff, marker="o", ms=3,
                ls="-" if a == "halving_doubling" else "--", label=i)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel(f"scaling efficiency vs one node of {p.gpus_per_node}")
    ax.set_title(f"{model}, {batch} images/GPU, preset {p.name} "
                 f"({p.nics_per_node} x {p.nic_gbps:g} Gbit/s per node)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_host_calibration(res):
    P = res["params"]
    print(f"host model fitted on {', '.join(res['fit_labels'])} ({res['n_fit_rows']} rows >= "
          f"{res['fit_min_bytes'] // KiB} KiB), {P['cores']} cores:")
    print(f"  tcp: alpha {P['tcp_alpha'] * 1e6:.0f} us/step, path {1 / P['tcp_beta'] / 1e9:.2f} GB/s of sent+received "
          f"per rank; work {P['step_cpu'] * 1e6:.0f} core-us per rank and step + {1 / P['tcp_cpu'] / 1e9:.2f} GB/s per core")
    print(f"  shm: alpha {P['shm_alpha'] * 1e6:.1f} us/phase, {1 / P['shm_beta'] / 1e9:.2f} GB/s per rank "
          f"(copy-in, slice sum, copy-out); Gloo allreduce: alpha {P['gloo_alpha'] * 1e6:.0f} us/step")
    print(f"  cache: buffers within {P['cache_bytes'] / MB:.1f} MB (all ranks) move at {P['cache_ratio']:.2f}x "
          f"(TCP) and {P['shm_cache_ratio']:.2f}x (arena) the per-byte cost from DRAM")
    print(f"{'role':8s} {'NxL':4s} {'impl':32s} {'bytes':>9s} {'time_us':>9s} {'pred_us':>9s} {'err':>7s}")
    for r in res["rows"]:
        flag = "  > 30%" if r["bytes"] >= res["min_bytes"] and abs(r["rel_err"]) > 0.30 else ""
        print(f"{r['role']:8s} {r['label']:4s} {r['impl']:32s} {r['bytes']:9d} {r['time_us']:9.0f} "
              f"{r['pred_us']:9.0f} {r['rel_err']:+7.1%}{flag}")
    e = res["max_rel_err_ge_256KiB"]
    print(f"max |relative error|, sizes >= {res['min_bytes'] // KiB} KiB: fitted rows {e.get('fit', 0):.1%}, "
          f"held-out rows {e.get('held_out', 0):.1%}, all {e.get('all', 0):.1%}")
    print("  per configuration: " + ", ".join(f"{k} {e[k]:.1%}" for k in res["labels"] if k in e))
    if any(n > 1 for n in res["runs"].values()):
        single = {}
        for r in res["single_run_max_rel_err"]:
            single[r["label"]] = max(single.get(r["label"], 0.0), r["max_rel_err"])
        print("  (times are medians over " + ", ".join(f"{n} runs of {k}" for k, n in res["runs"].items()) +
              "; a single run's rows against the same model: up to " +
              ", ".join(f"{k} {v:.0%}" for k, v in sorted(single.items())) + ")")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastar.simulate", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--gpus-per-node", type=int)
    ap.add_argument("--model", default="resnet50", help="a torchvision.models constructor name")
    ap.add_argument("--batch-per-gpu", type=int, default=32)
    ap.add_argument("--link-gbps", type=float, help="NIC line rate, Gbit/s (overrides the preset)")
    ap.add_argument("--nics-per-node", type=int)
    ap.add_argument("--hierarchy", choices=HIERARCHIES, default="leader")
    ap.add_argument("--algorithm", choices=ALGORITHMS, default="halving_doubling")
    ap.add_argument("--jitter-cv", type=float, help="per-worker compute jitter (std/mean); 0: none")
    ap.add_argument("--ready-by", choices=("flops", "params"), default="flops",
                    help="gradient ready times proportional to backward FLOPs or parameter count")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--plot", help="PNG of scaling efficiency vs GPU count")
    ap.add_argument("--calibrate", metavar="BENCH_JSON", nargs="+",
                    help="fit the host model to bench/allreduce_bw.py outputs of this machine and predict every row")
    ap.add_argument("--fit-on", default=",".join(DEFAULT_FIT_LABELS),
                    help="with --calibrate: '<nodes>x<local>' configurations whose rows are fitted; the "
                         "other files' rows are only predicted (held out)")
    ap.add_argument("--per-impl", action="store_true",
                    help="with --calibrate: instead, the older fit of one alpha/beta per impl and file (in-sample)")
    ap.add_argument("--shared", action="store_true", help="with --per-impl: one alpha/beta for all impls")
    a = ap.parse_args(argv)

    if a.calibrate:
        benches = []
        for path in a.calibrate:
            with open(path) as f:
                benches.append(json.load(f))
        if a.per_impl:
            res = [calibrate(b, shared=a.shared) for b in benches]
            for path, r in zip(a.calibrate, res):
                print(f"# {path} ({bench_label(r)})")
                for k, v in r["fits"].items():
                    print(f"{k:32s} alpha {v['alpha_us']:9.2f} us  beta^-1 {v['GBps']:8.3f} GB/s")
                print(f"{'impl':32s} {'bytes':>10s} {'time_us':>10s} {'pred_us':>10s} {'err':>7s}")
                for row in r["rows"]:
                    print(f"{row['impl']:32s} {row['bytes']:10d} {row['time_us']:10.1f} {row['pred_us']:10.1f} "
                          f"{row['rel_err']:+7.1%}")
                print("max |relative error|, sizes >= 256 KiB:",
                      ", ".join(f"{k} {v:.1%}" for k, v in sorted(r["max_rel_err_ge_256KiB"].items())))
            res = res[0] if len(res) == 1 else {"files": a.calibrate, "results": res}
        else:
            res = calibrate_host(benches, fit_labels=tuple(x.strip() for x in a.fit_on.split(",") if x.strip()))
            print_host_calibration(res)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=1)
        return res

    p = PRESETS[a.preset]
    over = {k: v for k, v in (("gpus_per_node", a.gpus_per_node), ("nic_gbps", a.link_gbps),
                              ("nics_per_node", a.nics_per_node),
                              ("jitter_cv", a.jitter_cv)) if v is not None}
    p = replace(p, **over)
    res = report(p, a.nodes, a.model, a.batch_per_gpu, a.hierarchy, a.algorithm, a.ready_by)
    print(f"{a.nodes} nodes x {p.gpus_per_node} GPUs, {a.model} at {a.batch_per_gpu}/GPU, "
          f"{p.nics_per_node} x {p.nic_gbps:g} Gbit/s per node (preset {p.name})")
    print(f"{'impl':26s} {'allreduce_ms':>12s} {'iter_ms':>8s} {'exposed':>8s} {'img/s':>9s} {'eff':>6s}")
    for i, s in res["per_impl"].items():
        print(f"{i:26s} {res['allreduce_ms'][i]:12.2f} {s['iteration_ms']:8.1f} {s['exposed_comm_ms']:8.2f} "
              f"{s['images_per_s']:9.0f} {s['scaling_efficiency']:6.3f}")
    print(f"NIC rate for one halving/doubling allreduce of the gradients within backward: "
          f"{res['needed_nic_gbps']:.1f} Gbit/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.plot:
        plot(p, a.plot, a.model, a.batch_per_gpu)
    return res


if __name__ == "__main__":
    main()
