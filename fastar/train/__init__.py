"""fastar.train: the large-minibatch recipe of Goyal et al. (2017) on top of fastar.wrap.

The recipe modules (recipe, sampler, models, data) import torch only; the compiled extension is
imported when a multi-worker run wraps its model (loop.wrap_model).
"""
from .recipe import (LrSchedule, PaperSGD, default_milestones, init_model, make_optimizer,
                     make_scheduler, param_groups, scaled_lr)
from .sampler import EpochShardSampler, MicroBatchSampler, epoch_permutation

__all__ = ["LrSchedule", "PaperSGD", "default_milestones", "init_model", "make_optimizer",
           "make_scheduler", "param_groups", "scaled_lr", "EpochShardSampler", "MicroBatchSampler",
           "epoch_permutation", "run"]


def run(argv=None):
    """fastar.train.run(["--data", "digits", ...]): the command line as a function."""
    from .cli import run as _run

    return _run(argv)
