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

from dataclasses import dataclass, field, replace

ALGORITHMS = ("auto", "halving_doubling", "ring")
HIERARCHIES = ("auto", "flat", "leader", "rail")
RING_ABOVE_BYTES_NON_POW2 = 16 << 20
RAIL_ABOVE_BYTES = 8 << 20
# The torch.distributed backend runs a reduce-scatter/allgather of up to this many bytes at once in
# the caller's thread (no hand-off); larger ones are queued, so that the caller (FSDP's prefetch)
# goes on while they run.
HALVES_INLINE_BYTES = 1 << 20
# An allgather writes an output of at least this many bytes with streaming stores (no read for
# ownership of lines about to be overwritten; the slots stay cached): measured faster in session 7.
HALVES_STREAM_ABOVE_BYTES = 16 << 20


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


# ---- the plan: everything a call's route is, chosen here alone -------------------------------------
# A Plan crosses into C++ as fastar._C.Plan (csrc/core/plan.h): the C++ side runs it and refuses one
# it cannot run; it chooses nothing. The descriptor that ranks compare before any data moves is the
# plan plus the call, so ranks whose plans differ (different tuning) raise on every rank.

COLLECTIVES = ("allreduce", "reduce_scatter", "allgather")
PROTOCOLS = ("latency", "one_barrier", "chunked", "halves", "in_place", "network", "single_copy")
# The node arena's small regions hold this much per rank (ShmArena::kSmallBytes; test_plan.py
# checks it against fastar._C.LATENCY_MAX_BYTES): the latency protocol's ceiling.
LATENCY_MAX_BYTES = 64 << 10


@dataclass(frozen=True)
class Tuning:
    """The plan's thresholds (process-wide: set_tuning). Every rank of a job must use the same:
    ranks that plan a call differently raise on every rank (never a wrong sum)."""
    # A one-chunk call of at most this many bytes takes one barrier (every rank sums all slots;
    # on one node the latency protocol, up to LATENCY_MAX_BYTES). DeepSpeed's small-message path.
    small_bytes: int = 64 << 10
    # The one-node pipeline's chunk: slots and result area stay in cache (between nodes the arena's
    # chunk, FASTAR_SHM_CHUNK_MB, is the unit of the network pipeline instead). Session 12, 1x4 (four
    # ranks on two cores), fastar.all_reduce, best of three: 128 KiB against 512 KiB took 233 against
    # 271 us at 512 KiB, 426 against 485 at 1 MiB, 755-773 against 866 at 2 MiB, 27.0 against 31.0 ms
    # at 64 MiB (64 KiB: 226 and 821 us at 512 KiB and 2 MiB); at 1x2 level (128 KiB-64 MiB).
    local_chunk_bytes: int = 128 << 10
    # The latency protocol's smallest block: each block costs the peers one more flag line. 1 KiB
    # blocks took 0.95 us at 4 KiB when the cores shared a cache and 2.3 us when they did not; one
    # 4 KiB block 1.07 and 1.8 (docs/results.md, session 8).
    latency_block_bytes: int = 4096
    # The allreduce writes its result back with streaming stores from this size: never by default.
    # On session 8's host cached stores measured 10-20 % faster at 16 MiB and no slower at 64 and
    # 256 MiB, with the cores sharing a cache or not (docs/results.md).
    stream_above_bytes: int = 1 << 62
    # One node whose ranks may read each other's memory (Node.single_copy): an allreduce of
    # single_copy_min_bytes to single_copy_max_bytes takes the single-copy protocol (each rank reads
    # its peers' parts of its slice straight from their buffers and sums in place, then reads their
    # summed slices: the peers' bytes cross once, where the slots copy them twice). Measured against
    # the slots in one process, alternately (docs/results.md, session 11): 0.72-0.79 of their time
    # at 4-32 MiB at 1x2 and 0.86-0.89 at 4-16 MiB at 1x4; 1.1-1.6x at 128 KiB-1 MiB (the kernel pins
    # every 4 KiB page it copies), level at 2 MiB, and at 64 MiB level (1x2) or 1.1x (1x4).
    single_copy_min_bytes: int = 4 << 20
    single_copy_max_bytes: int = 32 << 20
    # Its chunk: how much of each peer's part is read into a scratch (kept in cache) before it is summed.
    single_copy_chunk_bytes: int = 64 << 10
    # The halves (reduce-scatter, allgather; bytes of the whole buffer) on such a node take the
    # single-copy protocol too (each rank reads its peers' inputs: one copy) from
    # halves_single_copy_pair_min_bytes with two ranks a node (one peer to read), from
    # halves_single_copy_min_bytes with more, up to halves_single_copy_max_bytes. Measured against
    # the slots (bench/protocol_ab.py, docs/results.md session 11): 1x2 0.61-0.98 of their time at
    # 16 KiB-32 MiB, 1.09-1.28x at 64 MiB; 1x4 (four ranks on two cores) 1.08-1.20x up to 256 KiB, the
    # reduce-scatter 0.89-0.93 at 1-4 MiB but the allgather 1.01-1.23x at 1-16 MiB: never by default.
    halves_single_copy_min_bytes: int = 1 << 62
    halves_single_copy_pair_min_bytes: int = 16 << 10
    halves_single_copy_max_bytes: int = 32 << 20
    # The single-copy allgather's piece: each rank copies its own input into place a piece at a time
    # beside its reads of the peers' (so a peer reads each piece while it is in the cache its owner
    # just ran through). 16 MiB at 1x2 (session 12): 1.16-1.19 ms in pieces of 1 MiB, 1.30-1.42 ms
    # in pieces of 64 KiB, 1.31 ms whole (Open MPI's MPI_Allgather: 1.21-1.30 ms). At most the slot.
    single_copy_gather_bytes: int = 1 << 20

    def __post_init__(self):
        if self.small_bytes < 0:
            raise ValueError(f"fastar: Tuning.small_bytes must be at least 0, not {self.small_bytes}")
        if self.local_chunk_bytes < 4096:
            raise ValueError(f"fastar: Tuning.local_chunk_bytes must be at least 4096, not {self.local_chunk_bytes}")
        if self.single_copy_chunk_bytes < 4096 or self.single_copy_chunk_bytes % 64:
            raise ValueError("fastar: Tuning.single_copy_chunk_bytes must be a multiple of 64 bytes of at least "
                             f"4096, not {self.single_copy_chunk_bytes}")
        if self.single_copy_gather_bytes < 4096:
            raise ValueError("fastar: Tuning.single_copy_gather_bytes must be at least 4096, not "
                             f"{self.single_copy_gather_bytes}")
        if self.latency_block_bytes < 64 or self.latency_block_bytes % 64:
            raise ValueError("fastar: Tuning.latency_block_bytes must be a multiple of 64 bytes, not "
                             f"{self.latency_block_bytes}")


_tuning = Tuning()


def tuning() -> Tuning:
    """The process's tuning (the object is replaced, never changed: `is` tells a change)."""
    return _tuning


def set_tuning(**changes) -> Tuning:
    """Changes the process's tuning (fields of Tuning); returns the previous one. Give every rank the
    same: the ranks' descriptors carry the plan, and ranks that disagree raise."""
    global _tuning
    old, _tuning = _tuning, replace(_tuning, **changes)
    return old


@dataclass(frozen=True)
class Node:
    """What a plan needs to know of the communicator that runs it."""
    size: int
    local_size: int
    arena_chunk_bytes: int = 0  # the node arena's slot; 0: no arena (one rank per node, a user's group)
    # The node's ranks may read each other's memory (the probe at init, FASTAR_SINGLE_COPY): the
    # single-copy protocol can run.
    single_copy: bool = False

    @property
    def num_nodes(self) -> int:
        return self.size // self.local_size


@dataclass(frozen=True)
class Plan:
    collective: str
    algorithm: str
    hierarchy: str
    protocol: str
    chunk_bytes: int  # the pipeline's chunk (chunked, halves), the latency protocol's block, else 0
    wire: str  # "" (the tensor's dtype), "fp16" or "bf16"
    why: str = field(default="", compare=False)
    stream: bool = False  # the result written with streaming stores (not compared between ranks)

    @property
    def label(self) -> str:
        return f"{self.hierarchy}:{self.algorithm}" + (f":{self.wire}" if self.wire else "") + f":{self.protocol}"


def _pipeline_chunk(node: Node, itemsize: int, t: Tuning) -> int:
    chunk = node.arena_chunk_bytes if node.num_nodes > 1 else min(node.arena_chunk_bytes, t.local_chunk_bytes)
    return chunk // itemsize * itemsize


def _single_copy_chunk(node: Node, itemsize: int, t: Tuning) -> int:
    """The single-copy protocol's scratch per peer: whole elements, at most the arena's slot."""
    return min(t.single_copy_chunk_bytes, node.arena_chunk_bytes) // itemsize * itemsize


def plan(nbytes: int, itemsize: int, node: Node, *, collective: str = "allreduce", algorithm: str = "auto",
         hierarchy: str = "auto", device: str = "cpu", wire: str = "", in_place: bool = False,
         t: Tuning | None = None) -> Plan:
    """The plan of one call of `collective` over nbytes (elements of itemsize bytes) on `node`.
    reduce_scatter/allgather: nbytes is the whole buffer (world size x a shard). device: "cpu" or
    "cuda". in_place: the buffer is a bucket in wrap's bucket arena. "auto" is resolved; an explicit
    choice is kept unless the node cannot run it (said in why)."""
    t = t or _tuning
    if collective != "allreduce":
        return _plan_halves(collective, nbytes, itemsize, node, algorithm, t)
    algorithm, hierarchy, why = choose(nbytes, algorithm, hierarchy, node.size, node.local_size)
    why = [why]
    if wire and nothing_to_compress(wire, device, node.size, node.num_nodes, hierarchy):
        wire = ""
        why.append("one node: no network to compress for, summed in shared memory in full precision")
    if hierarchy != "flat" and (node.local_size == 1 or (device == "cpu" and not wire and not in_place
                                                          and not node.arena_chunk_bytes)):
        hierarchy = "flat"
        why.append("flat: no local phase here (one rank per node)")
    if device != "cpu" or wire:
        why.append(f"{device} tensor" + (f", {wire} on the wire" if wire else "") +
                   " -> torch ops and c10d collectives on fastar's groups")
        return Plan("allreduce", algorithm, hierarchy, "network", 0, wire, "; ".join(why))
    if hierarchy == "flat":
        return Plan("allreduce", algorithm, hierarchy, "network", 0, "", "; ".join(why))
    if in_place:
        return Plan("allreduce", algorithm, hierarchy, "in_place", 0, "", "; ".join(why + ["in place in wrap's bucket arena"]))
    chunk = _pipeline_chunk(node, itemsize, t)
    nchunks = -(-nbytes // chunk)
    small = nbytes == 0 or (nchunks == 1 and nbytes <= t.small_bytes and (node.num_nodes == 1 or hierarchy == "leader"))
    if small and node.num_nodes == 1 and nbytes <= LATENCY_MAX_BYTES:
        why.append(f"latency protocol: {nbytes} B <= {min(t.small_bytes, LATENCY_MAX_BYTES)} B on one node "
                   "(the arena's small regions, in blocks; no header exchange)")
        return Plan("allreduce", algorithm, hierarchy, "latency", t.latency_block_bytes, "", "; ".join(why))
    single_copy_chunk = _single_copy_chunk(node, itemsize, t)
    if node.single_copy and node.num_nodes == 1 and t.single_copy_min_bytes <= nbytes <= t.single_copy_max_bytes \
            and single_copy_chunk:
        why.append(f"single copy: {t.single_copy_min_bytes} B <= {nbytes} B <= {t.single_copy_max_bytes} B on one "
                   f"node whose ranks may read each other's memory (chunks of {single_copy_chunk} B per peer)")
        return Plan("allreduce", algorithm, hierarchy, "single_copy", single_copy_chunk, "", "; ".join(why))
    if small:
        why.append(f"one barrier: {nbytes} B <= {t.small_bytes} B in one chunk")
        return Plan("allreduce", algorithm, hierarchy, "one_barrier", 0, "", "; ".join(why))
    why.append(f"chunked: {nchunks} chunks of {chunk} B through the slots")
    stream = nbytes >= t.stream_above_bytes
    if stream:
        why.append(f"streaming stores: {nbytes} B >= {t.stream_above_bytes} B")
    return Plan("allreduce", algorithm, hierarchy, "chunked", chunk, "", "; ".join(why), stream)


def _plan_halves(collective: str, nbytes: int, itemsize: int, node: Node, algorithm: str, t: Tuning) -> Plan:
    if collective not in COLLECTIVES:
        raise ValueError(f"fastar: collective={collective!r}; expected one of {COLLECTIVES}")
    arena = bool(node.arena_chunk_bytes) and node.local_size > 1
    p = node.num_nodes if arena else node.size
    hierarchy = "rail" if arena else "flat"
    why = [f"{hierarchy}: " + ("the node's ranks through the arena's slots, the same local rank of every node "
                               "between nodes" if arena else "no arena: the schedule's half among all ranks")]
    if algorithm == "ring" or not is_pow2(p):
        why.append(f"ring: {p} participants" + ("" if algorithm == "ring" else " is not a power of two"))
        algorithm = "ring"
    else:
        algorithm = "halving_doubling"
        why.append(f"halving_doubling: {p} participants, a power of two")
    if not arena:
        return Plan(collective, algorithm, hierarchy, "network", 0, "", "; ".join(why))
    single_copy_chunk = _single_copy_chunk(node, itemsize, t) if collective == "reduce_scatter" \
        else min(t.single_copy_gather_bytes, node.arena_chunk_bytes)  # an allgather's piece (bytes)
    least = t.halves_single_copy_pair_min_bytes if node.local_size == 2 else t.halves_single_copy_min_bytes
    if node.single_copy and node.num_nodes == 1 and least <= nbytes <= t.halves_single_copy_max_bytes \
            and single_copy_chunk:
        why.append(f"single copy: {least} B <= {nbytes} B <= {t.halves_single_copy_max_bytes} B on one node of "
                   f"{node.local_size} ranks that may read each other's memory (" +
                   (f"chunks of {single_copy_chunk} B per peer)" if collective == "reduce_scatter"
                    else f"in pieces of {single_copy_chunk} B)"))
        return Plan(collective, algorithm, hierarchy, "single_copy", single_copy_chunk, "", "; ".join(why))
    stream = collective == "allgather" and nbytes >= HALVES_STREAM_ABOVE_BYTES
    if stream:
        why.append(f"streaming stores: an output of {nbytes} B >= {HALVES_STREAM_ABOVE_BYTES} B")
    return Plan(collective, algorithm, hierarchy, "halves", _pipeline_chunk(node, 1, t), "", "; ".join(why), stream)


def latency_limit(node: Node, t: Tuning | None = None) -> int:
    """The largest allreduce (bytes) that plan() gives the latency protocol on this node with the
    default route, for every itemsize up to 8; -1 when it gives none. fastar.all_reduce's fast entry
    takes calls up to it with the one latency plan, without planning each call again."""
    t = t or _tuning
    if node.num_nodes != 1 or node.local_size == 1 or not node.arena_chunk_bytes:
        return -1
    return min(t.small_bytes, LATENCY_MAX_BYTES, min(node.arena_chunk_bytes, t.local_chunk_bytes) // 8 * 8)
