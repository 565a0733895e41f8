"""Command line of fastar.train (torchrun -m fastar.train / fastar-train --nproc K)."""
from __future__ import annotations

import argparse
import os
import socket
import time

from .models import MODELS
from .recipe import DEFAULT_WEIGHT_DECAY, LARS_TRUST_COEFF, OPTIMIZERS


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()] if s else []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastar-train",
        description="Large-minibatch SGD (Goyal et al. 2017) with fastar's allreduce. Run under "
                    "torchrun (torchrun --nproc-per-node K -m fastar.train ...; multi-node through "
                    "torchrun's own flags) or alone with --nproc K to spawn K local workers.")
    a = p.add_argument
    g = p.add_argument_group("workers")
    g.add_argument("--nproc", type=int, default=1, help="local workers to spawn when not under torchrun")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--wrap", choices=("fastar", "ddp"), default=None,
                   help="gradient averaging: fastar.wrap (default) or torch DDP; env FASTAR_TRAIN_WRAP")
    g.add_argument("--bucket-mb", type=float, default=None, help="fastar.wrap bucket_cap_mb")
    g.add_argument("--algorithm", default=None, help="fastar.wrap algorithm (auto|halving_doubling|ring)")
    g.add_argument("--hierarchy", default=None, help="fastar.wrap hierarchy (auto|flat|leader|rail)")
    g.add_argument("--compression", default=None, choices=["fp16", "bf16"],
                   help="fastar.wrap: gradients on the wire in this dtype, summed in fp32")
    g.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores/local workers)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader processes per worker (image folders only)")

    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="synthetic",
                   help="an ImageNet-layout folder (train/, val/), 'fashion-mnist' (the IDX files of Debian's "
                        "dataset-fashion-mnist in /usr/share/datasets/fashion-mnist), 'fashion-mnist=PATH' "
                        "(the IDX files, gzipped or not, in PATH), 'digits' or 'synthetic'")
    g.add_argument("--image-size", type=int, default=None, help="default 224 (32 for digits, 28 for fashion-mnist)")
    g.add_argument("--train-subset", type=int, default=None,
                   help="train on a fixed subset of this many training images (the same for every seed; "
                        "stratified by class for fashion-mnist); validation stays whole")
    g.add_argument("--holdout", type=int, default=None,
                   help="fashion-mnist: hold out this many training images (a fixed stratified draw, the same "
                        "for every seed, disjoint from training and from any --train-subset) as the validation "
                        "split of every epoch; the test set is then read once, after the last epoch")
    g.add_argument("--no-test", action="store_true",
                   help="with --holdout: never read the test set (tuning runs)")
    g.add_argument("--synthetic-size", type=int, default=1024, help="training images of --data synthetic")
    g.add_argument("--num-classes", type=int, default=None, help="classes of --data synthetic (default 1000)")
    g.add_argument("--model", choices=MODELS, default="resnet50")
    g.add_argument("--width", type=int, default=16, help="first-stage width of the CIFAR-style resnets")

    g = p.add_argument_group("recipe (the paper's defaults)")
    g.add_argument("--batch", type=int, default=32, help="n: images per worker per iteration (per micro-batch)")
    g.add_argument("--accum", type=int, default=1,
                   help="gradient-accumulation steps: stands in for accum times as many workers")
    g.add_argument("--epochs", type=int, default=90)
    g.add_argument("--base-lr", type=float, default=None,
                   help="lr of a minibatch of --ref-batch images (default 0.1; with --optimizer lars and neither "
                        "--base-lr nor --ref-batch given: LARS's global lr, recipe.LARS_DEFAULT_LR, not scaled)")
    g.add_argument("--ref-batch", type=int, default=None, help="lr = base_lr * k*n*accum / ref_batch (default 256)")
    g.add_argument("--warmup", choices=("gradual", "constant", "none"), default="gradual")
    g.add_argument("--warmup-epochs", type=float, default=5.0)
    g.add_argument("--warmup-start-lr", type=float, default=None, help="default: --base-lr")
    g.add_argument("--milestones", type=_floats, default=None,
                   help="epochs at which lr /= 10, comma separated (default: 30,60,80 scaled to --epochs)")
    g.add_argument("--decay", choices=("step", "poly"), default="step",
                   help="step: lr /10 at --milestones (the paper's); poly: after warmup lr * (1 - progress) ** "
                        "--poly-power down to 0 at the last iteration (You et al.'s LARS and LAMB)")
    g.add_argument("--poly-power", type=float, default=2.0)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--no-nesterov", action="store_true")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd: the paper's Nesterov SGD; lars / lamb: timm's Lars / Lamb with layer-wise trust "
                        "ratios on conv/linear weights only (BN and biases left out, as in You et al.); "
                        "the same warmup and decay schedule. LAMB takes an Adam-scale lr: set --base-lr")
    g.add_argument("--trust-coeff", type=float, default=LARS_TRUST_COEFF, help="LARS trust coefficient eta")
    g.add_argument("--trust-clip", action="store_true",
                   help="clip the trust ratio (timm's trust_clip: LARS as LARC, min(ratio / lr, 1); LAMB at 1)")
    g.add_argument("--lars-nesterov", action="store_true",
                   help="LARS with Nesterov momentum (default: plain momentum, as You et al. publish it)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="never applied to BN gamma/beta; default "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_WEIGHT_DECAY.items()))
    g.add_argument("--no-wd-bias", action="store_true", help="no weight decay on biases either")
    g.add_argument("--bn-momentum", type=float, default=0.9,
                   help="BN running-average momentum in the paper's convention (0.9 = PyTorch's 0.1)")
    g.add_argument("--no-zero-gamma", action="store_true",
                   help="do not zero-init the last BN gamma of residual blocks (ablation)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="bf16: bfloat16 autocast (CPU or CUDA) for forward and loss; weights, gradients, "
                        "optimizer and allreduce stay fp32")

    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/fastar-train", help="metrics.jsonl, checkpoint.pt, summary.json, *.png")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from --out/checkpoint.pt (or the given path); same lr and data order")
    g.add_argument("--ckpt-every-iters", type=int, default=0, help="also checkpoint mid-epoch every N iterations")
    g.add_argument("--stop-at-iter", type=int, default=None,
                   help="stop (as if pre-empted) once this many iterations are done: for tests")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    g.add_argument("--eval-last", type=int, default=0,
                   help="also validate after each of the last N epochs (e.g. 5 for the paper's median)")
    g.add_argument("--trace", action="store_true", help="log every iteration's lr and sample indices per rank")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--quiet", action="store_true")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.train_subset is not None and args.train_subset < 1:
        raise SystemExit("fastar-train: --train-subset must be >= 1")
    if args.holdout is not None and args.holdout < 1:
        raise SystemExit("fastar-train: --holdout must be >= 1")
    if args.no_test and args.holdout is None:
        raise SystemExit("fastar-train: --no-test needs --holdout (without it the test set is the validation set)")
    for name in ("nproc", "batch", "accum", "epochs", "eval_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"fastar-train: --{name.replace('_', '-')} must be >= 1")
    return args


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_worker(local_rank: int, nproc: int, port: int, args) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0"})
    _run_worker(args)


def _run_worker(args):
    import torch.distributed as dist

    from .loop import train

    try:
        return train(args)
    finally:
        import fastar  # its communicator first: its threads use the groups torch is about to shut down
        fastar.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()
            # A Gloo worker thread drops its last finished work (here the final barrier, which holds
            # earlier works and their Python tensors) a moment after wait() returned. If the process
            # is finalizing by then, the decref's GIL acquire exits the thread through a noexcept
            # destructor: "terminate called without an active exception" (seen in a core dump, 1 run
            # in ~10 on this 2-core host). Yielding the core briefly lets that thread finish first.
            time.sleep(0.2)


def run(argv=None) -> dict | None:
    """Parses argv and trains: under torchrun this process is one worker; otherwise it spawns
    --nproc local workers (or trains in-process when --nproc is 1). Returns the summary dict
    (None on ranks other than 0 and after --stop-at-iter)."""
    args = parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # under torchrun (or a launcher that set the variables)
        return _run_worker(args)
    if args.nproc == 1:
        return _run_worker(args)
    import json

    import torch.multiprocessing as mp

    from .loop import SUMMARY

    summary_path = os.path.join(args.out, SUMMARY)
    if os.path.exists(summary_path):
        os.remove(summary_path)
    mp.spawn(_spawned_worker, args=(args.nproc, free_port(), args), nprocs=args.nproc, join=True)
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return json.load(f)
    return None
