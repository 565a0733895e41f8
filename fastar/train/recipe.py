"""The large-minibatch recipe of Goyal et al. (2017): learning rate, parameter groups, init.

Pure torch: nothing here needs the compiled extension, torchvision or torch.distributed.

Conventions, as in the paper:
  k   workers, n images per worker and per micro-batch, a gradient-accumulation steps
      (a stands in for a times as many workers: the global minibatch is B = k*n*a).
  lr  = base_lr * B / ref_batch           (linear scaling rule; base_lr 0.1, ref_batch 256)
  warmup (gradual): lr grows linearly per iteration from base_lr (the lr of the reference minibatch)
      to the scaled lr over `warmup_epochs` epochs; (constant): base_lr for `warmup_epochs` epochs.
      Warmup only ever ramps *up*: when the scaled lr is not above base_lr there is nothing to warm.
  decay (step): lr / 10 at each milestone epoch (30, 60, 80 of 90, scaled with the number of epochs);
      (poly): after warmup, lr = target * (1 - (t - w) / (T - w)) ** power, reaching 0 at the last
      iteration T (You et al.'s LARS and LAMB schedules use power 2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

# Paper: decay at epochs 30, 60, 80 of 90.
PAPER_EPOCHS = 90
PAPER_MILESTONE_FRACTIONS = (30 / 90, 60 / 90, 80 / 90)


def scaled_lr(base_lr: float, global_batch: int, ref_batch: int = 256) -> float:
    """Linear scaling rule: lr = base_lr * k*n / 256."""
    return base_lr * global_batch / ref_batch


def default_milestones(epochs: int) -> list[int]:
    """The paper's 30/60/80 of 90 scaled to `epochs` (rounded, kept strictly increasing and >= 1)."""
    if epochs == PAPER_EPOCHS:
        return [30, 60, 80]
    out: list[int] = []
    for f in PAPER_MILESTONE_FRACTIONS:
        m = max(1, int(round(epochs * f)))
        if out and m <= out[-1]:
            m = out[-1] + 1
        if m < epochs:
            out.append(m)
    return out


@dataclass
class LrSchedule:
    """Learning rate as a function of the iteration (optimizer step) index t, counted from 0.

    Instances are picklable callables, so torch.optim.lr_scheduler.LambdaLR can save them in its
    state_dict and a resumed run gets the very same schedule back.
    """

    target_lr: float  # the scaled lr, reached at the end of warmup
    iters_per_epoch: int
    warmup: str = "gradual"  # gradual | constant | none
    warmup_epochs: float = 5.0
    warmup_start_lr: float = 0.1  # base_lr: the lr of the reference minibatch
    milestones: Sequence[float] = field(default_factory=lambda: [30, 60, 80])
    gamma: float = 0.1
    decay: str = "step"  # step (milestones x gamma) | poly (power `power` to 0 at `epochs`)
    power: float = 2.0
    epochs: float | None = None  # the run's length: needed by poly

    def __post_init__(self):
        if self.warmup not in ("gradual", "constant", "none"):
            raise ValueError(f"warmup must be gradual, constant or none, not {self.warmup!r}")
        if self.decay not in ("step", "poly"):
            raise ValueError(f"decay must be step or poly, not {self.decay!r}")
        if self.decay == "poly" and not self.epochs:
            raise ValueError("decay poly needs the run's epochs")
        if self.iters_per_epoch < 1:
            raise ValueError(
                f"iters_per_epoch is {self.iters_per_epoch}: the global minibatch is larger than the "
                "training set; use fewer workers, a smaller --batch or less --accum")
        self.milestones = [float(m) for m in self.milestones]

    @property
    def warmup_iters(self) -> int:
        if self.warmup == "none" or self.warmup_start_lr >= self.target_lr:
            return 0
        return int(round(self.warmup_epochs * self.iters_per_epoch))

    def lr(self, t: int) -> float:
        w = self.warmup_iters
        if t < w:
            if self.warmup == "gradual":
                lr = self.warmup_start_lr + (self.target_lr - self.warmup_start_lr) * t / w
            else:  # constant
                lr = self.warmup_start_lr
        else:
            lr = self.target_lr
        if self.decay == "poly":
            if t < w:
                return lr
            total = int(round(self.epochs * self.iters_per_epoch))
            frac = min(1.0, (t - w) / max(total - w, 1))
            return lr * (1.0 - frac) ** self.power
        n_decays = sum(1 for m in self.milestones if t >= int(round(m * self.iters_per_epoch)))
        return lr * self.gamma ** n_decays

    def __call__(self, t: int) -> float:
        """LambdaLR's factor: lr(t) relative to the optimizer's initial lr (= target_lr)."""
        return self.lr(t) / self.target_lr if self.target_lr else 0.0


OPTIMIZERS = ("sgd", "lars", "lamb")
# weight decay when --weight-decay is not given: the paper's 1e-4 for SGD and LARS; LAMB adds it to
# an Adam step of unit scale (not to a gradient), where timm's default 0.01 is the usual value.
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "lars": 1e-4, "lamb": 1e-2}
LARS_TRUST_COEFF = 1e-3  # You et al.'s eta (timm's default)
# fastar-train's LARS lr when neither --base-lr nor --ref-batch is given: a global lr, not scaled with
# the minibatch. Measured on Fashion-MNIST (resnet8 width 16, kn = 64, 64 iterations, eta 0.001):
# 0.025 (SGD's 0.1*64/256) left the training loss at ln 10 (84.7 % test error), 10 reached 72.0 %.
LARS_DEFAULT_LR = 10.0


def make_optimizer(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                   nesterov: bool = True, wd_bias: bool = True, optimizer: str = "sgd",
                   trust_coeff: float = LARS_TRUST_COEFF, trust_clip: bool = False) -> torch.optim.Optimizer:
    """optimizer "sgd" (the paper's): SGD with Nesterov momentum; weight decay on conv/linear weights
    only (never on BN gamma/beta). torch.optim.SGD keeps lr outside the velocity (buf = m*buf + g;
    p -= lr*(g + m*buf) for Nesterov), so a change of lr needs no momentum correction: see
    docs/training.md.

    "lars" (You et al. 2017, timm.optim.Lars) and "lamb" (You et al. 2019, timm.optim.Lamb): the
    layer-wise trust ratio scales the update of each conv/linear weight; BN gamma/beta and every
    bias are left out of it (and of weight decay), as in You et al.: they get the plain momentum-SGD
    (LARS) or Adam (LAMB) step at the scheduled lr. See lars_lamb_groups. LARS takes plain momentum
    as published unless nesterov is asked for (the command line: --nesterov-lars). trust_clip:
    timm's clipping of the trust ratio (LARS: LARC's min(trust ratio / lr, 1); LAMB: at most 1).
    """
    if optimizer == "sgd":
        groups = param_groups(model, weight_decay, wd_bias=wd_bias)
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=0.0)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {optimizer!r}")
    try:
        from timm.optim import Lamb, Lars
    except ImportError as e:  # pragma: no cover - timm is in the train extra and the Makefile's DEPS
        raise ImportError(f"--optimizer {optimizer} needs timm (pip install timm): {e}") from e
    groups = lars_lamb_groups(model, weight_decay)
    if optimizer == "lars":
        return Lars(groups, lr=lr, momentum=momentum, nesterov=nesterov, trust_coeff=trust_coeff,
                    trust_clip=trust_clip)
    return Lamb(groups, lr=lr, betas=(momentum, 0.999), trust_clip=trust_clip)


def lars_lamb_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Groups for timm's Lars/Lamb. Both apply the trust ratio to a group when its weight_decay is
    not 0 or its always_adapt is set, so:
      {"adapt"}: conv/linear weights, weight_decay, always_adapt=True (adapted even with wd 0);
      {"no_adapt"}: BN (any norm layer) gamma/beta and all biases, weight_decay 0, always_adapt=False.
    """
    g = param_groups(model, weight_decay, wd_bias=False)
    g[0].update(name="adapt", always_adapt=True)
    g[1].update(name="no_adapt", always_adapt=False, weight_decay=0.0)
    return g


_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float, wd_bias: bool = True) -> list[dict]:
    """Two groups: {"decay"} with weight_decay, {"no_decay"} with 0.

    BN (any normalisation layer) gamma and beta go to no_decay, as in the paper; biases of other
    layers go to no_decay only when wd_bias is False (--no-wd-bias).
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORM_TYPES) or (name == "bias" and not wd_bias):
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: LrSchedule):
    """A per-iteration LambdaLR: call .step() after every optimizer step."""
    for g in optimizer.param_groups:
        g["lr"] = schedule.target_lr
        g["initial_lr"] = schedule.target_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def residual_blocks(model: nn.Module) -> Iterable[nn.Module]:
    """Residual blocks of torchvision ResNets (BasicBlock, Bottleneck) and of fastar's CIFAR ResNet."""
    for m in model.modules():
        if hasattr(m, "last_bn_name") or type(m).__name__ in ("BasicBlock", "Bottleneck"):
            yield m


def last_bn(block: nn.Module) -> nn.modules.batchnorm._BatchNorm:
    """The BN that ends a block's residual branch (before the addition)."""
    name = getattr(block, "last_bn_name", None)
    if name is None:
        name = "bn3" if hasattr(block, "bn3") else "bn2"
    return getattr(block, name)


def paper_bn_momentum_to_torch(paper_momentum: float) -> float:
    """Caffe2/paper: running = m*running + (1-m)*batch, m = 0.9.
    PyTorch:       running = (1-momentum)*running + momentum*batch.
    So the paper's 0.9 is PyTorch's 0.1 (its default)."""
    return 1.0 - paper_momentum


def init_model(model: nn.Module, fc_std: float = 0.01, zero_init_residual: bool = True,
               bn_momentum: float = 0.9) -> nn.Module:
    """The paper's init: gamma = 0 in the last BN of every residual block (each block starts as
    the identity), FC weights N(0, fc_std), FC bias 0; BN running-average momentum (paper
    convention) `bn_momentum`. Conv weights keep He (kaiming) init from the model constructor."""
    if zero_init_residual:
        for block in residual_blocks(model):
            nn.init.zeros_(last_bn(block).weight)
    fc = final_linear(model)
    if fc is not None:
        nn.init.normal_(fc.weight, mean=0.0, std=fc_std)
        if fc.bias is not None:
            nn.init.zeros_(fc.bias)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = paper_bn_momentum_to_torch(bn_momentum)
    return model


def final_linear(model: nn.Module) -> nn.Linear | None:
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model.fc
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


class PaperSGD:
    """The paper's (Caffe2's) form of momentum SGD, with lr inside the velocity, for the tests and
    docs only:

        v <- m*v + lr*g                     w <- w - v                  (plain momentum)
        v <- m*v + lr*g                     w <- w - (lr*g + m*v)       (Nesterov)

    with g including weight decay. When lr changes from lr_old to lr_new, the paper's momentum
    correction scales v by lr_new/lr_old first (`correction=True`).
    """

    def __init__(self, params, momentum=0.9, weight_decay=0.0, nesterov=False, correction=True):
        self.params = list(params)
        self.m, self.wd, self.nesterov, self.correction = momentum, weight_decay, nesterov, correction
        self.v = [torch.zeros_like(p) for p in self.params]
        self.prev_lr = None

    @torch.no_grad()
    def step(self, lr: float):
        c = 1.0
        if self.correction and self.prev_lr is not None and self.prev_lr != lr:
            c = lr / self.prev_lr
        self.prev_lr = lr
        for p, v in zip(self.params, self.v):
            g = p.grad + self.wd * p
            v.mul_(self.m * c).add_(g, alpha=lr)
            if self.nesterov:
                p.sub_(lr * g + self.m * v)
            else:
                p.sub_(v)


def epochs_to_iters(epochs: float, iters_per_epoch: int) -> int:
    return int(math.floor(epochs * iters_per_epoch))
