"""The paper's data order: one random shuffle of the whole training set per epoch, identical on
every rank (seeded by seed + epoch), split among the k workers into disjoint shards that cover it.

With n images per micro-batch and a accumulation steps per iteration (block m = n*a per rank), the
global minibatch of iteration j is the consecutive slice perm[j*k*m : (j+1)*k*m], cut into k*a
chunks of n; rank r takes chunks r*a .. r*a+a-1 (one per micro-step). So the BN groups (the n
images normalised together) are the same whether the k*a "virtual workers" are real processes or
stood in for by accumulation: k=2, a=1 and k=1, a=2 take identical steps, which is what lets
bench/large_batch.py simulate workers on one process. The tail of the permutation that does not
fill a whole minibatch is dealt out round-robin so that the shards still cover the set; the loop
runs floor(N / (k*m)) iterations and leaves that tail out (a different one every epoch).

Unlike torch's DistributedSampler nothing is padded or repeated.
"""
from __future__ import annotations

from typing import Iterator

import torch


def epoch_permutation(n_samples: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    return torch.randperm(n_samples, generator=g)


class EpochShardSampler(torch.utils.data.Sampler):
    """Indices of this rank's shard of epoch `epoch` (call set_epoch before iterating).
    block: images per rank per iteration (n*a); 1 gives the plain round-robin perm[rank::k]."""

    def __init__(self, n_samples: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, block: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if block < 1:
            raise ValueError(f"block must be >= 1, not {block}")
        self.n, self.k, self.rank, self.seed, self.shuffle = n_samples, world_size, rank, seed, shuffle
        self.block = block
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard(self, epoch: int | None = None) -> torch.Tensor:
        epoch = self.epoch if epoch is None else epoch
        perm = epoch_permutation(self.n, self.seed, epoch) if self.shuffle else torch.arange(self.n)
        k, m = self.k, self.block
        full = self.n // (k * m)
        blocks = perm[:full * k * m].view(full, k, m)[:, self.rank, :].reshape(-1)
        tail = perm[full * k * m:][self.rank::k]
        return torch.cat([blocks, tail])

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard().tolist())

    def __len__(self) -> int:
        full = self.n // (self.k * self.block)
        return full * self.block + len(range(self.rank, self.n - full * self.k * self.block, self.k))


class MicroBatchSampler(torch.utils.data.Sampler):
    """A batch sampler: this rank's micro-batches of one epoch, `micro_batch` indices each,
    `n_micro` of them, starting at micro-batch `start` (to resume in the middle of an epoch).

    Yields lists of (epoch, index) pairs so that the dataset can seed its augmentation per sample
    and per epoch: the images a run sees do not depend on DataLoader workers or on a resume.
    """

    def __init__(self, sampler: EpochShardSampler, micro_batch: int, n_micro: int, start: int = 0):
        self.sampler, self.micro_batch, self.n_micro, self.start = sampler, micro_batch, n_micro, start
        if n_micro * micro_batch > len(sampler):
            raise ValueError(f"{n_micro} micro-batches of {micro_batch} exceed the shard of {len(sampler)}")

    def __iter__(self):
        shard = self.sampler.shard().tolist()
        e, b = self.sampler.epoch, self.micro_batch
        for j in range(self.start, self.n_micro):
            yield [(e, i) for i in shard[j * b:(j + 1) * b]]

    def __len__(self) -> int:
        return self.n_micro - self.start
