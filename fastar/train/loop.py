"""The training loop of one worker: distributed set-up, the recipe, checkpoints, logs.

A worker is a process with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* in its environment (torchrun sets
them; __main__ does when it spawns workers itself) or a lone process (WORLD_SIZE unset: no
torch.distributed, no gradient averaging needed).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from . import recipe
from .data import build_datasets
from .models import build_model
from .sampler import EpochShardSampler, MicroBatchSampler

WRAP_ENV = "FASTAR_TRAIN_WRAP"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# Settings that fix the lr at every iteration and the data order: a resume must not change them.
RESUME_KEYS = ("model", "data", "image_size", "seed", "global_batch", "epochs", "base_lr", "ref_batch",
               "warmup", "warmup_epochs", "warmup_start_lr", "milestones", "momentum", "nesterov",
               "weight_decay", "wd_bias", "optimizer", "train_subset", "holdout", "decay", "poly_power",
               "trust_coeff", "trust_clip")

# what a checkpoint written before these keys existed ran with
RESUME_DEFAULTS = {"holdout": None, "decay": "step", "poly_power": 2.0, "trust_coeff": recipe.LARS_TRUST_COEFF,
                   "trust_clip": False}


# ---------------------------------------------------------------------------------------------
# distributed helpers

def setup_distributed(device: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the default process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(minutes=10))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    return 0, 1, local_rank


def wrap_model(model: nn.Module, args, world: int, device: torch.device) -> tuple[nn.Module, str]:
    """Gradient averaging over the workers: fastar.wrap (default) or torch DDP (--wrap ddp or
    FASTAR_TRAIN_WRAP=ddp, for comparisons). BN stays per worker either way: both get
    broadcast_buffers=False so that neither overwrites the workers' own running statistics."""
    how = args.wrap or os.environ.get(WRAP_ENV) or "fastar"
    if world == 1:
        return model, "none"
    if how == "ddp":
        return _ddp(model, device), "torch:ddp"
    if how == "fastar":
        import fastar  # lazily: the recipe modules must import without the compiled extension

        kw = {"broadcast_buffers": False}  # the paper's BN: every worker keeps its own statistics
        if args.bucket_mb is not None:
            kw["bucket_cap_mb"] = args.bucket_mb
        if args.algorithm is not None:
            kw["algorithm"] = args.algorithm
        if args.hierarchy is not None:
            kw["hierarchy"] = args.hierarchy
        if getattr(args, "compression", None):
            kw["compression"] = args.compression
        return fastar.wrap(model, **kw), "fastar"
    raise ValueError(f"--wrap / {WRAP_ENV} must be 'fastar' or 'ddp', not {how!r}")


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    import inspect

    ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    # no buffer broadcasts: BN statistics stay per worker (newer torch renames the flag; buffers
    # start equal on every rank anyway, from the same seed)
    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **kw)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def average_bn_statistics(module: nn.Module) -> None:
    """BN runs per worker (the paper: no cross-worker BN), so running statistics differ between
    workers. Before evaluating or saving, average them so that every rank holds the same model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    bufs = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var) if b is not None]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).double() for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


# ---------------------------------------------------------------------------------------------
# checkpoints and logs

def atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def rewrite_jsonl(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def recipe_config(args, global_batch: int) -> dict:
    return {
        "model": args.model, "data": args.data, "image_size": args.image_size, "seed": args.seed,
        "global_batch": global_batch, "epochs": args.epochs, "base_lr": args.base_lr,
        "ref_batch": args.ref_batch, "warmup": args.warmup, "warmup_epochs": args.warmup_epochs,
        "warmup_start_lr": args.warmup_start_lr, "milestones": args.milestones,
        "momentum": args.momentum,
        "nesterov": (getattr(args, "lars_nesterov", False) if getattr(args, "optimizer", "sgd") == "lars"
                     else not args.no_nesterov),
        "weight_decay": args.weight_decay, "wd_bias": not args.no_wd_bias,
        "optimizer": getattr(args, "optimizer", "sgd"), "train_subset": getattr(args, "train_subset", None),
        "amp": getattr(args, "amp", "none"), "holdout": getattr(args, "holdout", None),
        "decay": getattr(args, "decay", "step"), "poly_power": getattr(args, "poly_power", 2.0),
        "trust_coeff": getattr(args, "trust_coeff", None), "trust_clip": getattr(args, "trust_clip", False),
    }


def resolve_resume(args) -> str | None:
    if args.resume is None:
        return None
    path = os.path.join(args.out, CHECKPOINT) if args.resume == "auto" else args.resume
    if os.path.exists(path):
        return path
    if args.resume == "auto":
        return None  # nothing to resume yet: start from scratch (useful for pre-emptible jobs)
    raise FileNotFoundError(f"--resume {path}: no such checkpoint")


# ---------------------------------------------------------------------------------------------
# evaluation

def autocast(args, device):
    """--amp bf16: bfloat16 autocast (CPU or CUDA) around forward and loss; none: a no-op."""
    if getattr(args, "amp", "none") == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(module: nn.Module, loader, device, amp=contextlib.nullcontext) -> dict:
    was_training = module.training
    module.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    crit = nn.CrossEntropyLoss(reduction="sum")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with amp():
            out = module(x).float()
        loss_sum += crit(out, y).item()
        top = out.topk(min(5, out.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        count += len(y)
    module.train(was_training)
    loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    count = max(count, 1.0)
    return {"val_loss": loss_sum / count, "val_top1_err": 100.0 * (1 - correct1 / count),
            "val_top5_err": 100.0 * (1 - correct5 / count)}


# ---------------------------------------------------------------------------------------------
# the worker

class WithIndex(torch.utils.data.Dataset):
    """For --trace: also returns the index of each sample, to log the data order actually used."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        x, y = self.ds[key]
        return x, y, key[1]


def train(args) -> dict | None:
    """Runs one worker to the end (or to --stop-at-iter). Returns the summary on rank 0."""
    device_type = args.device
    if device_type == "auto":
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, local_rank = setup_distributed(device_type)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    main = rank == 0
    if main:
        os.makedirs(args.out, exist_ok=True)

    ds = build_datasets(args.data, args.image_size, seed=args.seed, synthetic_size=args.synthetic_size,
                        num_classes=args.num_classes, train_subset=getattr(args, "train_subset", None),
                        holdout=getattr(args, "holdout", None))
    opt_name = getattr(args, "optimizer", "sgd")
    if getattr(args, "weight_decay", None) is None:
        args.weight_decay = recipe.DEFAULT_WEIGHT_DECAY[opt_name]
    n, a = args.batch, args.accum
    global_batch = world * n * a
    iters_per_epoch = len(ds.train) // global_batch
    if args.base_lr is None and args.ref_batch is None and opt_name == "lars":
        # You et al. tune LARS's global lr per minibatch instead of scaling SGD's: the default is a
        # global lr (at 0.1*kn/256 LARS's step lr*eta*|w| barely moves the weights; see docs/training.md)
        args.base_lr, args.ref_batch = recipe.LARS_DEFAULT_LR, global_batch
    if args.base_lr is None:
        args.base_lr = 0.1
    if args.ref_batch is None:
        args.ref_batch = 256
    target_lr = recipe.scaled_lr(args.base_lr, global_batch, args.ref_batch)
    if args.warmup_start_lr is None:
        args.warmup_start_lr = args.base_lr
    if args.milestones is None:
        args.milestones = recipe.default_milestones(args.epochs)
    schedule = recipe.LrSchedule(target_lr, iters_per_epoch, args.warmup, args.warmup_epochs,
                                 args.warmup_start_lr, args.milestones, decay=getattr(args, "decay", "step"),
                                 power=getattr(args, "poly_power", 2.0), epochs=args.epochs)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    module = build_model(args.model, ds.num_classes, width=args.width,
                         zero_init_residual=not args.no_zero_gamma, bn_momentum=args.bn_momentum)
    module.to(device)
    nesterov = (getattr(args, "lars_nesterov", False) if opt_name == "lars" else not args.no_nesterov)
    optimizer = recipe.make_optimizer(module, target_lr, args.momentum, args.weight_decay,
                                      nesterov=nesterov, wd_bias=not args.no_wd_bias,
                                      optimizer=opt_name,
                                      trust_coeff=getattr(args, "trust_coeff", recipe.LARS_TRUST_COEFF),
                                      trust_clip=getattr(args, "trust_clip", False))
    amp = lambda: autocast(args, device)  # noqa: E731
    scheduler = recipe.make_scheduler(optimizer, schedule)

    config = recipe_config(args, global_batch)
    start_epoch, start_it, global_it = 0, 0, 0
    partial = {"loss_sum": 0.0, "iters": 0.0, "time": 0.0}  # of an epoch cut by a mid-epoch checkpoint
    ckpt_path = resolve_resume(args)
    if ckpt_path is not None:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = dict(RESUME_DEFAULTS, **ckpt["config"])  # checkpoints from before a key existed: its default
        diff = {k: (saved.get(k), config[k]) for k in RESUME_KEYS if saved.get(k) != config[k]}
        if diff:
            raise ValueError(f"rank {rank}: cannot resume {ckpt_path}: the recipe differs "
                             f"(saved, now): {diff}. Resume with the same settings or start a new --out.")
        module.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_it, global_it = ckpt["epoch"], ckpt["iter_in_epoch"], ckpt["global_iter"]
        if start_it >= iters_per_epoch:
            start_epoch, start_it = start_epoch + 1, 0
        else:
            partial = ckpt.get("partial_epoch", partial)

    model, impl = wrap_model(module, args, world, device)
    no_sync = model.no_sync if (world > 1 and hasattr(model, "no_sync")) else contextlib.nullcontext
    criterion = nn.CrossEntropyLoss()

    sampler = EpochShardSampler(len(ds.train), world, rank, args.seed, block=n * a)
    val_idx = list(range(rank, len(ds.val), world))
    workers = 0 if ds.in_memory else args.workers
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda",
                     persistent_workers=False)
    if hasattr(ds.train, "__getitems__") and hasattr(ds.val, "__getitems__"):  # batched fetch
        from .data import batch_collate

        loader_kw["collate_fn"] = batch_collate
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds.val, val_idx),
                                             batch_size=max(n, 256), shuffle=False, **loader_kw)
    test_loader = None  # with --holdout: the test set, read once after the last epoch
    if getattr(ds, "test", None) is not None and not getattr(args, "no_test", False):
        test_loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds.test, list(range(rank, len(ds.test), world))),
            batch_size=max(n, 256), shuffle=False, **loader_kw)

    metrics_path = os.path.join(args.out, METRICS)
    trace_path = os.path.join(args.out, f"trace.rank{rank}.jsonl")
    if main:
        rows = [r for r in read_jsonl(metrics_path) if r["epoch"] < start_epoch] if ckpt_path else []
        rewrite_jsonl(metrics_path, rows)
    if args.trace:
        rows = [r for r in read_jsonl(trace_path) if r["iter"] < global_it] if ckpt_path else []
        rewrite_jsonl(trace_path, rows)
    if main and not args.quiet:
        print(f"fastar.train: {args.model} on {args.data}, k={world} workers x n={n}"
              + (f" x accum {a}" if a > 1 else "") + f" = minibatch {global_batch}, "
              f"{opt_name} lr {target_lr:g} ("
              + (f"{args.warmup} warmup from {args.warmup_start_lr:g} over {schedule.warmup_iters} iters"
                 if schedule.warmup_iters else "no warmup") + (
                  f"), decay at epochs {args.milestones}, " if schedule.decay == "step" else
                  f"), polynomial decay (power {schedule.power:g}) to 0, ")
              + (f"validation on {len(ds.val)} held-out training images, " if getattr(args, "holdout", None) else "") +
              f"{iters_per_epoch} iters/epoch, {args.epochs} epochs, grads averaged by {impl}"
              + (f"; resuming at epoch {start_epoch} iter {start_it}" if ckpt_path else ""), flush=True)

    def save_checkpoint(epoch, it_in_epoch, epoch_stats=None):
        average_bn_statistics(module)
        part = None
        if epoch_stats is not None:  # mid-epoch: keep the epoch's loss so far (summed over ranks)
            loss_sum, iters, elapsed, wrong_, seen_ = epoch_stats
            loss_sum, iters, wrong_, seen_ = all_reduce_sum([loss_sum, iters, wrong_, seen_], device)
            part = {"loss_sum": loss_sum, "iters": iters, "time": elapsed, "wrong": wrong_, "seen": seen_}
        if main:
            atomic_save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "iter_in_epoch": it_in_epoch,
                         "global_iter": global_it, "config": config, "world_size": world,
                         "impl": impl, "partial_epoch": part}, os.path.join(args.out, CHECKPOINT))
        if dist.is_initialized():
            dist.barrier()

    show = main and not args.no_progress
    if show:
        from tqdm import tqdm
    model.train()
    stopped = False
    history = read_jsonl(metrics_path) if main else []
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        train_kw = dict(loader_kw)
        if args.trace:  # per sample, with its index
            train_kw.pop("collate_fn", None)
        loader = torch.utils.data.DataLoader(
            WithIndex(ds.train) if args.trace else ds.train, batch_sampler=MicroBatchSampler(sampler, n, iters_per_epoch * a, start_it * a),
            **train_kw)
        batches = iter(loader)
        bar = tqdm(total=iters_per_epoch, initial=start_it, desc=f"epoch {epoch + 1}/{args.epochs}",
                   leave=False, dynamic_ncols=True) if show else None
        loss_sum, iters_done, t0 = 0.0, 0, time.perf_counter() - partial["time"]
        if main:  # the part of this epoch run before a resume, already summed over ranks
            loss_sum, iters_done = partial["loss_sum"], partial["iters"]
        # training top-1 error of the epoch (the paper's Figures 2 and 4), from the training
        # forward passes themselves (augmented images, the weights of that moment), this rank's part
        wrong, seen_n = 0.0, 0.0
        if main:  # (checkpoints from before train_top1_err existed have no counts: 0)
            wrong, seen_n = partial.get("wrong", 0.0), partial.get("seen", 0.0)
        partial = {"loss_sum": 0.0, "iters": 0.0, "time": 0.0}
        trace_f = open(trace_path, "a") if args.trace else None
        for it in range(start_it, iters_per_epoch):
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            step_loss, seen = 0.0, []
            for s in range(a):
                if trace_f is not None:
                    x, y, idx = next(batches)
                    seen.extend(idx.tolist())
                else:
                    x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # per-worker loss averaged over n (and over the a micro-batches); the wrapper
                # averages gradients over the k workers: a loss normalised by k*n*a in all.
                with (no_sync() if s < a - 1 else contextlib.nullcontext()):
                    with amp():
                        out = model(x)
                        loss = criterion(out.float(), y) / a
                    loss.backward()
                wrong += (out.detach().argmax(1) != y).sum().item()
                seen_n += len(y)
                step_loss += loss.item()
            optimizer.step()
            scheduler.step()
            global_it += 1
            loss_sum += step_loss
            iters_done += 1
            if trace_f is not None:
                trace_f.write(json.dumps({"iter": global_it - 1, "epoch": epoch, "lr": lr, "rank": rank,
                                          "indices": seen}) + "\n")
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"rank {rank}: loss is {step_loss} at iteration {global_it - 1} "
                                         f"(lr {lr:g}): training diverged")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.4g}", refresh=False)
            if args.ckpt_every_iters and global_it % args.ckpt_every_iters == 0 and it + 1 < iters_per_epoch:
                save_checkpoint(epoch, it + 1, (loss_sum, iters_done, time.perf_counter() - t0, wrong, seen_n))
            if args.stop_at_iter is not None and global_it >= args.stop_at_iter:
                stopped = True
                break
        if trace_f is not None:
            trace_f.close()
        if bar is not None:
            bar.close()
        if stopped:
            break
        train_time = time.perf_counter() - t0
        start_it = 0
        loss_sum, iters_done, wrong, seen_n = all_reduce_sum([loss_sum, iters_done, wrong, seen_n], device)
        average_bn_statistics(module)
        row = {"epoch": epoch, "iteration": global_it, "train_loss": loss_sum / max(iters_done, 1),
               "train_top1_err": 100.0 * wrong / max(seen_n, 1.0),
               "lr": optimizer.param_groups[0]["lr"],
               "last_lr_used": schedule.lr(global_it - 1),
               "images_per_s": iters_done / world * global_batch / max(train_time, 1e-9),
               "epoch_time_s": train_time}
        if ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs
                or epoch >= args.epochs - getattr(args, "eval_last", 0)):
            row.update(evaluate(module, val_loader, device, amp))
        if test_loader is not None and epoch + 1 == args.epochs:  # the test set's one reading
            row.update({k.replace("val_", "test_"): v for k, v in evaluate(module, test_loader, device, amp).items()})
        save_checkpoint(epoch, iters_per_epoch)
        if main:
            history.append(row)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if not args.quiet:
                err = f", val top-1 err {row['val_top1_err']:.2f}%" if "val_top1_err" in row else ""
                print(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}{err}, "
                      f"lr {row['last_lr_used']:.4g}, {row['images_per_s']:.0f} img/s", flush=True)

    summary = None
    if main and not stopped:
        errs = [r["val_top1_err"] for r in history if "val_top1_err" in r]
        summary = {
            "config": config, "world_size": world, "batch_per_worker": n, "accum": a, "impl": impl,
            "iters_per_epoch": iters_per_epoch, "target_lr": target_lr,
            "warmup_iters": schedule.warmup_iters, "epochs_run": len(history),
            "final_val_top1_err": errs[-1] if errs else None,
            # the paper's reported figure: the median of the last 5 epochs' top-1 error
            "median_last5_val_top1_err": statistics.median(errs[-5:]) if errs else None,
            # with --holdout: val_* is the held-out split; the test set's one reading (None if --no-test)
            "holdout": getattr(args, "holdout", None),
            "test_top1_err": next((r["test_top1_err"] for r in reversed(history) if "test_top1_err" in r), None),
            "train_time_s": sum(r["epoch_time_s"] for r in history),
            "metrics": os.path.abspath(metrics_path), "checkpoint": os.path.abspath(os.path.join(args.out, CHECKPOINT)),
            "history": history,
        }
        if not args.no_plots:
            from .plots import plot_run

            summary["plots"] = plot_run(args.out, schedule, args.epochs, history)
        write_json_atomic(summary, os.path.join(args.out, SUMMARY))
    if dist.is_initialized():
        dist.barrier()
    return summary
