"""Which rank broke a collective. A rank whose peer failed only sees that peer go away: the rank
that saw the real cause (a dead or disagreeing peer) publishes its error in the job's store, and a
dead process on this host is visible in /proc. with_cause() adds both to this rank's error."""
from __future__ import annotations

import os
import socket
import threading
import time

import torch.distributed as dist

from . import state
from .topology import start_time

_ERR_KEY = "fastar/error/{}"
# How the communicator's errors begin once it has failed (csrc/torch/communicator.cpp)
EARLIER_FAILURE = "fastar: an earlier collective failed"


def _store_call(fn, seconds: float = 2.0):
    """Runs a store operation on a daemon thread, bounded: the store may live in a dead process."""
    out: list = []

    def call():
        try:
            out.append(fn())
        except Exception:  # noqa: BLE001 - a dead store is an answer too: nothing
            pass
    th = threading.Thread(target=call, daemon=True)
    th.start()
    th.join(seconds)
    return out[0] if out else None


def exited_peers() -> list[tuple[int, int]]:
    """(rank, pid) of the ranks on this host whose process has exited since fastar.init: a collective
    that breaks cannot say which member broke it; a dead process on this host is the likely cause."""
    return [(r, pid) for r, pid, started in same_host_peers()
            if started is not None and start_time(pid) != started]


def same_host_peers() -> list[tuple[int, int, int | None]]:
    """(rank, pid, start time at fastar.init) of the other ranks on this host."""
    st = state.current()
    if st is None or not st.processes:
        return []
    host = socket.gethostname()
    return [(r, proc[1], proc[2]) for r, proc in enumerate(st.processes)
            if r != st.topo.rank and proc and proc[0] == host]


def exited_peers_settled(settle_s: float = 1.0) -> list[tuple[int, int]]:
    """exited_peers, asked again for up to settle_s while it finds none. A killed process closes
    its sockets before the kernel marks it exited: the peer that saw the connection reset (and the
    ranks it woke) can look at /proc inside that window and still see the process running."""
    same_host = bool(same_host_peers())
    gone = exited_peers()
    deadline = time.monotonic() + settle_s
    while same_host and not gone and time.monotonic() < deadline:
        time.sleep(0.02)
        gone = exited_peers()
    return gone


def _exchange_reports(msg: str) -> list[tuple[int, str]]:
    """Publishes this rank's error in the job's store; returns the errors other ranks published."""
    rank, size = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    _store_call(lambda: store.set(_ERR_KEY.format(rank), msg[:4000]))

    def others():
        found = []
        for r in range(size):
            k = _ERR_KEY.format(r)
            if r != rank and store.check([k]):
                found.append((r, store.get(k).decode(errors="replace")))
        return found
    return _store_call(others) or []


_annotated_for = None  # the communicator whose first error this process has annotated


def with_cause(err: BaseException) -> BaseException:
    """This rank's error with what the other ranks reported and which same-host peers have exited
    (and publishes this one), so that every rank's error names the rank that failed."""
    global _annotated_for
    msg = str(err)
    comm = getattr(state.current(), "comm", None)
    if msg.startswith(EARLIER_FAILURE) and comm is not None and _annotated_for is comm:
        return err  # an echo of the first error, which was annotated when this rank raised it
    # (else the first error reached this rank from another one, through the failure contract's
    # message, and was never raised here: its first echo gets the annotation)
    _annotated_for = comm
    try:
        gone = exited_peers_settled()
        # Without torchrun's agent (which hosts the store itself), the store lived in rank 0's
        # process: asking a dead one would only print torch's connection errors.
        store_gone = any(r == 0 for r, _ in gone) and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        reports = [] if store_gone else _exchange_reports(msg)
    except Exception:  # noqa: BLE001 - the original error matters more than its annotation
        return err
    if not reports and not gone:
        return err
    lines = [msg]
    lines += [f"rank {r} (pid {pid} on this host) has exited since fastar.init: the likely cause."
              for r, pid in gone]
    if reports:
        lines.append("Errors reported by other ranks (the first cause is usually among them):")
        lines += [f"  rank {r}: {m.splitlines()[0] if m else ''}" for r, m in reports]
    return RuntimeError("\n".join(lines))


def reraise(e: RuntimeError):
    """Raises with_cause(e), chained to e when it added something."""
    new = with_cause(e)
    if new is e:
        raise e
    raise new from e
