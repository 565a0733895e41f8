import torch

from mp_utils import run_workers


def _sum_worker(rank, n):
    import fastar
    t = torch.full((10,), float(rank + 1))
    fastar.all_reduce(t)
    return t.tolist()


def test_two_ranks_sum():
    out = run_workers(_sum_worker, 2, timeout=120)
    assert out[0] == out[1] == [3.0] * 10
