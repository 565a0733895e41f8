"""A data-parallel training step: forward, then backward whose time is spread over the layers in
proportion to their forward FLOPs; DDP buckets (1 MB first, then 25 MB, reverse parameter order)
become ready when their last gradient is; one communication channel reduces buckets in order.
Iteration = forward + backward + the communication still running when backward ends."""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np

from .cost_model import MB, Preset, allreduce_time, topo_of


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
