"""The one place that chooses a route for an allreduce: hierarchy and algorithm for "auto", and
whether a compressed wire is worth it. Torch-free (plain ints), so that fastar.simulate prices
exactly what the library runs, with the same thresholds (no copies).

Crossovers measured with bench/allreduce_bw.py (docs/results.md): halving/doubling sends the same
bytes as ring in 2*log2(p) steps instead of 2*(p-1), so it wins at every size for powers of two.
Binary blocks add an unbalanced extra step for other world sizes; ring overtakes it only for large
buffers. Between nodes a single leader per node moves the data (fewer, larger messages) below
RAIL_ABOVE_BYTES; above it every local rank drives its own shard ("rail"). Measured at 2 nodes x 2:
leader ahead up to 4 MiB, rail ahead from 16 MiB.
"""
from __future__ import annotations

ALGORITHMS = ("auto", "halving_doubling", "ring")
HIERARCHIES = ("auto", "flat", "leader", "rail")
RING_ABOVE_BYTES_NON_POW2 = 16 << 20
RAIL_ABOVE_BYTES = 8 << 20


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def choose(nbytes: int, algorithm: str, hierarchy: str, size: int, local_size: int) -> tuple[str, str, str]:
    """(algorithm, hierarchy, why) for a buffer of nbytes on size ranks, local_size per node.
    "auto" is resolved; an explicit choice is kept. The reason is what fastar.explain() prints."""
    num_nodes = size // local_size
    why = []
    if hierarchy == "auto":
        if local_size == 1:
            hierarchy = "flat"
            why.append("flat: one rank per node, no local phase")
        elif num_nodes == 1:
            hierarchy = "leader"
            why.append("leader: one node, the whole allreduce runs in shared memory")
        elif nbytes > RAIL_ABOVE_BYTES:
            hierarchy = "rail"
            why.append(f"rail: {nbytes} B > {RAIL_ABOVE_BYTES} B, every local rank drives a shard between nodes")
        else:
            hierarchy = "leader"
            why.append(f"leader: {nbytes} B <= {RAIL_ABOVE_BYTES} B, one message per node beats {local_size} small ones")
    p = size if hierarchy == "flat" else num_nodes
    if algorithm == "auto":
        if is_pow2(p) or nbytes <= RING_ABOVE_BYTES_NON_POW2:
            algorithm = "halving_doubling"
            why.append(f"halving_doubling: {p} inter-node participants, {nbytes} B "
                       f"({'power of two' if is_pow2(p) else 'binary blocks, below the ring crossover'})")
        else:
            algorithm = "ring"
            why.append(f"ring: {p} participants is not a power of two and {nbytes} B > {RING_ABOVE_BYTES_NON_POW2} B")
    return algorithm, hierarchy, "; ".join(why)


def nothing_to_compress(wire: str, device_type: str, size: int, num_nodes: int, hierarchy: str) -> bool:
    """On one CPU node with a hierarchical schedule nothing crosses a network: the node's phase sums
    in full precision either way (docs/architecture.md), and the shared-memory path does it far
    faster than the compressed path's Gloo groups. Compression is then dropped: full-precision
    sums, as the compressed path would have given too."""
    return bool(wire) and device_type == "cpu" and num_nodes == 1 and size > 1 and hierarchy != "flat"
