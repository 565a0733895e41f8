"""An alpha-beta-gamma cost model of fastar's allreduces and of a data-parallel training step.

    python -m fastar.simulate --nodes 32 --gpus-per-node 8 --model resnet50 --link-gbps 50 --json out.json
    python -m fastar.simulate --preset h100 --plot eff.png
    python -m fastar.simulate --calibrate python_tests/data/calib/*/allreduce_*.json

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

Modules: schedules (the rounds of messages), cost_model (links, hierarchies, allreduce_time),
step_model (a training step, scaling), calibration (alpha-beta fits on allreduce_bw.py rows, merging
runs), host_fit (HostModel, host_time, calibrate_host), cli (report, plot, main). Every public name
is re-exported here (`import fastar.simulate as sim; sim.calibrate(...)`).
"""
from __future__ import annotations

from ..policy import RAIL_ABOVE_BYTES, RING_ABOVE_BYTES_NON_POW2
from .calibration import bench_label, calibrate, features, merge_runs, parse_impl, synthetic_bench
from .cli import main, plot, print_host_calibration, report
from .cost_model import (HIERARCHIES, IMPLS, MB, PRESETS, KiB, Preset, Topo, allreduce_time, local_allgather,
                         local_bcast, local_reduce, local_reduce_scatter, needed_gbps, pipeline, rounds_time, topo_of)
from .host_fit import (DEFAULT_FIT_LABELS, HOST_PARAMS, HostModel, auto_choice, cache_factor, calibrate_host, fit_host,
                       host_time, tcp_time)
from .schedules import ALGORITHMS, halving_doubling_rounds, ring_rounds, schedule_rounds
from .step_model import buckets, compute_ms, expected_max_normal, model_profile, scaling, step

__all__ = [
    "RAIL_ABOVE_BYTES", "RING_ABOVE_BYTES_NON_POW2", "bench_label", "calibrate", "features", "merge_runs",
    "parse_impl", "synthetic_bench", "main", "plot", "print_host_calibration", "report", "HIERARCHIES",
    "IMPLS", "MB", "PRESETS", "KiB", "Preset", "Topo", "allreduce_time", "local_allgather", "local_bcast",
    "local_reduce", "local_reduce_scatter", "needed_gbps", "pipeline", "rounds_time", "topo_of",
    "DEFAULT_FIT_LABELS", "HOST_PARAMS", "HostModel", "auto_choice", "cache_factor", "calibrate_host",
    "fit_host", "host_time", "tcp_time", "ALGORITHMS", "halving_doubling_rounds", "ring_rounds",
    "schedule_rounds", "buckets", "compute_ms", "expected_max_normal", "model_profile", "scaling", "step",
]
