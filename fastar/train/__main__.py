"""torchrun --nproc-per-node K -m fastar.train ...   or   fastar-train --nproc K ..."""
import sys

from .cli import run


def main(argv=None) -> int:
    from .data import FashionMNISTMissing

    try:
        summary = run(argv)
    except FashionMNISTMissing as e:  # a set-up problem, not a bug: say what to install, no traceback
        print(f"fastar-train: error: {e}", file=sys.stderr)
        return 2
    if summary is not None:
        err = summary.get("median_last5_val_top1_err")
        print(f"fastar.train: done in {summary['train_time_s']:.1f} s of training; val top-1 error "
              f"{summary['final_val_top1_err']:.2f}% (median of last 5 epochs {err:.2f}%); "
              f"metrics {summary['metrics']}"
              + (f"; plots {', '.join(summary['plots'])}" if summary.get("plots") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
