"""`python -m fastar.demo` (make demo): a short real data-parallel training run on this machine.

Two worker processes train a small CIFAR-style ResNet-20 on scikit-learn's bundled handwritten
digits (no download) with the paper's recipe: per-worker minibatch n=32, gradients averaged by
fastar.wrap, the linear scaling rule, gradual warmup, step decay, no weight decay on BN, zero-init
residual gammas. The reference minibatch is scaled down with the data set: lr 0.1 for 32 images,
so k*n = 64 trains at 0.2 after a 2-epoch warmup from 0.1. A minute or two on two CPU cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def _wrap_available() -> str | None:
    try:
        import fastar

        fastar.wrap  # noqa: B018  (resolves the lazy attribute: imports the extension)
        return None
    except Exception as e:  # the demo must still run: say so, and use DDP
        return f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--progress", action="store_true", help="show the per-epoch progress bar")
    args = p.parse_args(argv)

    why = _wrap_available()
    if why is not None and not os.environ.get("FASTAR_TRAIN_WRAP"):
        print(f"fastar.demo: fastar.wrap is not usable here ({why}); averaging gradients with torch DDP "
              "instead. Build the extension (make build) to use fastar.", file=sys.stderr)
        os.environ["FASTAR_TRAIN_WRAP"] = "ddp"

    from fastar.train.cli import run

    train_args = [
        "--nproc", str(args.nproc), "--data", "digits", "--image-size", "16", "--model", "resnet20",
        "--batch", "32", "--epochs", str(args.epochs), "--base-lr", "0.1", "--ref-batch", "32",
        "--warmup", "gradual", "--warmup-epochs", "2", "--threads", "1", "--seed", "0",
        "--out", args.out,
    ] + ([] if args.progress else ["--no-progress"])
    t0 = time.perf_counter()
    summary = run(train_args)
    wall = time.perf_counter() - t0
    if summary is None:
        print("fastar.demo: the run produced no summary", file=sys.stderr)
        return 1
    print()
    print(f"fastar.demo: {args.nproc} workers ({summary['impl']}) trained resnet20 on digits for "
          f"{summary['epochs_run']} epochs in {wall:.0f} s ({summary['train_time_s']:.0f} s of training steps)")
    print(f"  validation top-1 error: {summary['final_val_top1_err']:.2f}% "
          f"(median of the last 5 epochs, as the paper reports: {summary['median_last5_val_top1_err']:.2f}%; "
          f"chance is 90%)")
    print(f"  per-epoch JSON lines: {summary['metrics']}")
    print(f"  plots:                {', '.join(summary.get('plots', []))}")
    print(f"  checkpoint:           {summary['checkpoint']}  (continue with --resume)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
