"""fastar: allreduce for large-minibatch data-parallel training (Goyal et al., 2017).

    import torch.distributed as dist, fastar
    dist.init_process_group("gloo")          # under torchrun
    model = fastar.wrap(model)               # gradients averaged while backward runs
    fastar.all_reduce(tensor, op="sum")      # or a single collective
    fastar.reduce_scatter_single(out, inp)   # and the allreduce's two halves
    fastar.all_gather_single(out, inp)
"""
from __future__ import annotations

from .collectives import all_gather_single, all_reduce, explain, reduce_scatter_single  # noqa: F401
from .state import init, is_initialized, set_timeout, shutdown  # noqa: F401
from . import backend, trace  # noqa: F401,E402 - importing backend registers dist.init_process_group("fastar")

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled extension was built with."""
    import torch

    from . import _C

    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda_compiled": bool(_C.cuda_built()),
        "cuda_available": torch.cuda.is_available(),
        "kernels": hasattr(_C, "kernels_pack"),
    }


def __getattr__(name):
    # wrap and the DDP comm hook pull in more of torch; load them on first use
    # (the module is data_parallel, not wrap: a submodule named like the function would shadow it)
    if name in ("wrap", "FastarModule", "comm_hook", "hook_state"):
        from . import data_parallel
        return getattr(data_parallel, name)
    raise AttributeError(f"module 'fastar' has no attribute {name!r}")
