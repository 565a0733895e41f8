"""fastar's allreduce schedules as rounds of messages, built exactly as csrc/core/schedule.cpp builds
them (halving/doubling with binary blocks, ring). A round: (src, dst, nbytes, reduce) arrays over
virtual ranks 0..p-1, and how many times it repeats."""
from __future__ import annotations

import numpy as np

ALGORITHMS = ("halving_doubling", "ring")


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
